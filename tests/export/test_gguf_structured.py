"""GGUF export of structurally pruned models (`heads`, `neurons`, `layers`, and per-block sizes) on a tiny
random Llama: blocks of one size are written as arch `llama` at that size, blocks of different sizes as
arch `deci` with per-layer arrays (the llama.cpp graph that sizes each block by its own counts); other
architectures are refused. gguf-py reads every tensor back at its block's shape, llama.cpp runs the file."""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf.quants import dequantize
from torch import nn

from slimformer.context import StepContext
from small_vocab import llama_cpp_logits, small_bpe, windows

from slimformer.data.sources import load_data
from slimformer.errors import UserError
from slimformer.export.gguf import export_gguf
from slimformer.models.structure import block_parts, keep_heads, keep_neurons
from slimformer.prune.structured import HeadsConfig, LayersConfig, NeuronsConfig, heads, layers, neurons
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.rtn import RTNConfig, rtn

VOCAB = 512
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
LLAMA_CPP_MIN_COSINE = 0.999
# case -> (GGUF arch, per-block (heads, kv_heads, ffn))
WANT = {
    "unpruned": ("llama", [(4, 2, 128)] * 3),
    "neurons": ("llama", [(4, 2, 64)] * 3),
    "heads": ("llama", [(2, 1, 128)] * 3),
    "layers": ("llama", [(4, 2, 128)] * 2),
    "per_block": ("deci", [(4, 2, 64), (2, 1, 128), (2, 2, 96)]),
    "per_block_q4": ("deci", [(4, 2, 64), (2, 1, 128), (2, 2, 96)]),
}


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    return small_bpe(VOCAB, slice(20, 200))


@pytest.fixture(scope="module")
def ids(tokenizer) -> torch.Tensor:
    return windows(tokenizer)  # (2, 64)


def _base(config_class: type = transformers.LlamaConfig) -> nn.Module:
    """The tiny random model, weights scaled up so that logits differ visibly between tokens."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**CONFIG)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5) if p.dim() == 2 else p.add_(0.1 * torch.randn_like(p))
    return model


def _per_block(model: nn.Module) -> nn.Module:
    """Different sizes per block: 64 neurons | 2 heads on 1 key/value head | 2 heads on 2, 96 neurons."""
    parts = block_parts(model)
    keep_neurons(parts[0], range(0, 128, 2))
    keep_heads(parts[1], [0, 1])
    keep_heads(parts[2], [0, 2])
    keep_neurons(parts[2], range(96))
    return model


def _pruned(case: str, tokenizer) -> nn.Module:
    """The base model pruned by slimformer's own structured methods (scope `layer`: the same sizes in
    every block), or per block with models.structure."""
    model = _base()
    if case == "neurons":
        neurons(model, NeuronsConfig(sparsity=0.5, score="magnitude"))
    elif case == "heads":
        heads(model, HeadsConfig(sparsity=0.5, score="magnitude"))
    elif case == "layers":
        ctx = StepContext(tokenizer=tokenizer, calib=load_data("lee-news", "eval"), progress=False)
        layers(model, LayersConfig(num_layers=1, num_samples=2, seq_len=32), ctx)
    elif case.startswith("per_block"):
        _per_block(model)
    if case == "per_block_q4":  # attention as Q4_0 (g32), the MLP as Q8_0 (per channel)
        rtn(model, RTNConfig(bits=4, group_size=32, symmetric=True, targets=("re:self_attn",)))
        rtn(model, RTNConfig(bits=8, group_size=-1, symmetric=True, targets=("re:mlp",)))
    return model


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory) -> dict:
    out = {}
    for case in WANT:
        model = _pruned(case, tokenizer)
        path = tmp_path_factory.mktemp(case) / "m.gguf"
        info = export_gguf(model, tokenizer, path)
        out[case] = (model, path, info, gguf.GGUFReader(path))
    return out


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (as transformers' GGUF loader does)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _weight(module: nn.Module) -> np.ndarray:
    w = module.dequantized_weight() if isinstance(module, QuantLinear) else module.weight.detach().float()
    return w.numpy()


@pytest.mark.parametrize("case", list(WANT))
def test_sizes_and_tensors_read_back(exported, case) -> None:
    """The keys hold one size, or one per block where blocks differ; every block's tensors have that block's
    shape and its weights bit for bit (q/k rows permuted by the block's own head counts)."""
    model, path, info, reader = exported[case]
    arch, sizes = WANT[case]
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == arch and fields[f"{arch}.block_count"] == len(sizes)
    for i, key in enumerate(("attention.head_count", "attention.head_count_kv", "feed_forward_length")):
        column = [s[i] for s in sizes]
        assert fields[f"{arch}.{key}"] == (column if len(set(column)) > 1 else column[0]), key
    assert fields.get(f"{arch}.attention.key_length", 16) == 16  # written wherever 64 / heads of layer 0 is not 16
    tensors = {t.name: t for t in reader.tensors}
    for b, (n_q, n_kv, ffn) in enumerate(sizes):
        block = model.model.layers[b]
        for leaf, hf, shape, permute in (("attn_q", "self_attn.q_proj", (16 * n_q, 64), n_q),
                                         ("attn_k", "self_attn.k_proj", (16 * n_kv, 64), n_kv),
                                         ("attn_v", "self_attn.v_proj", (16 * n_kv, 64), 0),
                                         ("attn_output", "self_attn.o_proj", (64, 16 * n_q), 0),
                                         ("ffn_gate", "mlp.gate_proj", (ffn, 64), 0),
                                         ("ffn_up", "mlp.up_proj", (ffn, 64), 0),
                                         ("ffn_down", "mlp.down_proj", (64, ffn), 0)):
            t = tensors[f"blk.{b}.{leaf}.weight"]
            assert tuple(int(n) for n in t.shape[::-1]) == shape, t.name  # gguf-py lists ggml's ne: columns first
            got = dequantize(t.data, t.tensor_type).reshape(shape)
            assert np.array_equal(_unpermute(got, permute) if permute else got, _weight(block.get_submodule(hf)))
    assert info["layers_from_codes"] == (7 * len(sizes) if case.endswith("q4") else 0)


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", list(WANT))
def test_llama_cpp_runs_pruned_file(exported, ids, case) -> None:
    """llama.cpp's logits on real text match transformers' for the pruned model (F32 files: only its
    summation order differs; Q4/Q8: it rounds activations to 8 bits per block), and are far from the
    unpruned model's (so the threshold tells the pruned sizes were used); pruned files are smaller."""
    model, path, info, _ = exported[case]
    got = llama_cpp_logits(path, ids)
    cos, control = (_cosine(got, _logits(m, ids)) for m in (model, exported["unpruned"][0]))
    print(f"\n{case}: llama.cpp vs transformers cosine {cos:.7f} (unpruned model: {control:.4f}), "
          f"{info['bytes']} bytes")
    assert cos >= LLAMA_CPP_MIN_COSINE
    if case != "unpruned":
        assert control < LLAMA_CPP_MIN_COSINE and info["bytes"] < exported["unpruned"][2]["bytes"]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.double()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_per_block_sizes_refused_where_llama_cpp_takes_one(tokenizer, tmp_path) -> None:
    """qwen2's graph sizes every block by layer 0's counts: per-block sizes are a UserError, nothing written;
    the same sizes in every block export."""
    model = _per_block(_base(transformers.Qwen2Config))
    with pytest.raises(UserError, match=r"blocks \[1, 2\] differ.*llama.cpp's qwen2 builds every block.*--format onnx"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []
    uniform = _base(transformers.Qwen2Config)
    neurons(uniform, NeuronsConfig(sparsity=0.25, score="magnitude"))
    info = export_gguf(uniform, tokenizer, tmp_path / "u.gguf")
    assert gguf.GGUFReader(info["path"]).fields["qwen2.feed_forward_length"].contents() == 96


def test_block_without_neurons_refused(tokenizer, tmp_path) -> None:
    """A block with no FFN neurons (slimformer's pruning always keeps one; a hand-made model may not)."""
    model = _base()
    mlp = model.model.layers[1].mlp
    with warnings.catch_warnings():  # torch warns that initializing a zero-element tensor does nothing
        warnings.simplefilter("ignore")
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = (nn.Linear(64, 0, bias=False), nn.Linear(64, 0, bias=False),
                                                        nn.Linear(0, 64, bias=False))
    with pytest.raises(UserError, match="block 1 has 4 attention heads, 2 key/value heads and 0 FFN neurons"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []
