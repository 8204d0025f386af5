"""The second built-in decoder (`gemma3-270m`, Gemma 3: not the Llama family, BOS-first windows)
and the second evaluation text (`shakespeare`, drama and verse: not news).

Perplexities were measured here (fp32, CPU); the ranges allow a few percent for other CPUs.
"""

from __future__ import annotations

import json

import pytest
import torch

from slimformer.data.sources import load_data
from slimformer.data.windows import lm_windows, prepends_bos
from slimformer.evaluate.perplexity import perplexity
from slimformer.models.loading import ModelBundle, load_bundle
from slimformer.models.zoo import MODEL_ALIASES, resolve_alias

GEMMA_PARAMS = 268_098_176  # google/gemma-3-270m: 170M of them the 262144 x 640 (tied) embedding
# measured fp32 perplexities (first windows of each alias' eval split, batch_size=1)
PPL = {
    ("gemma3-270m", "lee-news", 1, 128): 26.393,
    ("gemma3-270m", "lee-news", 4, 512): 20.098,
    ("gemma3-270m", "shakespeare", 4, 512): 46.706,
    ("smollm2-135m", "shakespeare", 4, 512): 42.156,
}
REL = 0.03


@pytest.fixture(scope="module")
def gemma() -> ModelBundle:
    return load_bundle("gemma3-270m")  # converted once from the chunked GGUF, then cached


def _ppl(bundle: ModelBundle, data: str, n: int, seq_len: int) -> float:
    windows = lm_windows(bundle.tokenizer, load_data(data, "eval").joined(), seq_len, max_windows=n)
    assert windows.shape == (n, seq_len)
    out = perplexity(bundle.model, windows, batch_size=1, progress=False)
    assert out["windows"] == n and out["tokens"] == n * (seq_len - 1)
    return out["ppl"]


# --- the text -------------------------------------------------------------------------------------

def test_shakespeare_splits() -> None:
    calib, ev = load_data("shakespeare", "calib"), load_data("shakespeare", "eval")
    assert (len(calib), len(ev)) == (31, 32)  # every 25th of the 783 scenes, from 12 and from 0
    assert not set(calib.texts) & set(ev.texts)
    assert load_data("shakespeare", "train").texts == calib.texts
    assert load_data("shakespeare", "test").texts == ev.texts
    assert calib.labels is None and ev.labels is None
    assert 150_000 < len(ev.joined()) < 250_000  # about lee-news' eval size
    plays = {t.split(", ACT")[0] for t in ev.texts}
    assert len(plays) > 25 and "Othello" in plays  # drawn across the plays
    assert ev.texts[0].startswith("A Midsummer Night's Dream, ACT I, SCENE I. Athens. The palace of THESEUS.\n\n"
                                  "Enter THESEUS, HIPPOLYTA, PHILOSTRATE, and Attendants\n\nTHESEUS\n"
                                  "Now, fair Hippolyta, our nuptial hour\n")
    joined = calib.joined() + ev.joined()
    for markup in ("**", "_", "*", "\\", "#", "  \n"):  # Markdown is gone; the words stay
        assert markup not in joined


@pytest.mark.slow  # the first use converts the 253 MB GGUF (about 2 minutes on a fresh machine)
def test_shakespeare_windows_shape_without_and_with_bos(gemma: ModelBundle) -> None:
    from transformers import AutoTokenizer

    text = load_data("shakespeare", "eval").joined()
    smol = AutoTokenizer.from_pretrained(resolve_alias("smollm2-135m"), trust_remote_code=False)
    plain = lm_windows(smol, text, 512)
    assert plain.dtype == torch.long and plain.shape[1] == 512 and plain.shape[0] >= 100
    assert not prepends_bos(smol) and (plain[:, 0] != smol.bos_token_id).any()
    bos = lm_windows(gemma.tokenizer, text, 512, max_windows=8)
    assert bos.shape == (8, 512) and (bos[:, 0] == 2).all() and not (bos[:, 1:] == 2).any()


# --- the model ------------------------------------------------------------------------------------

@pytest.mark.slow  # the first use converts the 253 MB GGUF (about 2 minutes on a fresh machine)
def test_gemma_alias_is_a_plain_fp32_folder(gemma: ModelBundle) -> None:
    from transformers import AutoConfig

    assert "gemma3-270m" in MODEL_ALIASES
    folder = resolve_alias("gemma3-270m")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(folder.glob("*.gguf")) and not list(folder.glob("*.py"))
    raw = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in raw and "auto_map" not in raw
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    assert config.model_type == "gemma3_text" and config.architectures == ["Gemma3ForCausalLM"]
    assert type(gemma.model).__name__ == "Gemma3ForCausalLM" and gemma.kind == "decoder"
    assert sum(p.numel() for p in gemma.model.parameters()) == GEMMA_PARAMS
    assert all(p.dtype == torch.float32 for p in gemma.model.parameters())


@pytest.mark.slow  # the first use converts the 253 MB GGUF (about 2 minutes on a fresh machine)
def test_gemma_tokenizer_prepends_bos(gemma: ModelBundle) -> None:
    tok = gemma.tokenizer
    assert tok.bos_token == "<bos>" and tok.bos_token_id == 2
    assert prepends_bos(tok)
    assert tok("To be, or not to be").input_ids[0] == 2
    assert tok("To be, or not to be", add_special_tokens=False).input_ids[0] != 2


@pytest.mark.slow  # the first use converts the 253 MB GGUF (about 2 minutes on a fresh machine)
def test_gemma_fp32_ppl_one_short_window(gemma: ModelBundle) -> None:
    ppl = _ppl(gemma, "lee-news", 1, 128)
    assert ppl == pytest.approx(PPL[("gemma3-270m", "lee-news", 1, 128)], rel=REL)


@pytest.mark.slow
@pytest.mark.parametrize("data", ["lee-news", "shakespeare"])
def test_gemma_fp32_ppl_four_windows(gemma: ModelBundle, data: str) -> None:
    ppl = _ppl(gemma, data, 4, 512)
    assert ppl == pytest.approx(PPL[("gemma3-270m", data, 4, 512)], rel=REL)


@pytest.mark.slow
def test_smollm_fp32_ppl_on_shakespeare(smollm_bundle: ModelBundle) -> None:
    ppl = _ppl(smollm_bundle, "shakespeare", 4, 512)
    assert ppl == pytest.approx(PPL[("smollm2-135m", "shakespeare", 4, 512)], rel=REL)
