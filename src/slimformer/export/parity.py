"""The one check every export runs before its file is renamed into place: the exported model's
outputs against PyTorch's on real inputs (the built-in evaluation text)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from slimformer.data.sources import load_data
from slimformer.data.windows import lm_windows
from slimformer.errors import UserError
from slimformer.layers import emulate_int_mm
from slimformer.models.loading import ModelBundle


def parity_inputs(bundle: ModelBundle) -> tuple[Tensor, Tensor]:
    """Real token ids and mask for the export check (UserError without a tokenizer)."""
    if bundle.tokenizer is None:
        raise UserError(f"model '{bundle.name}' has no tokenizer: the export check needs one.")
    if bundle.kind == "decoder":
        ids = lm_windows(bundle.tokenizer, load_data("lee-news", "eval").joined(), 128, 2)
        return ids, torch.ones_like(ids)
    enc = bundle.tokenizer(list(load_data("tweets", "eval").texts[:16]), padding=True, truncation=True,
                           max_length=128, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.inference_mode()
def output_parity(reference: nn.Module, other: Any, kind: str, ids: Tensor, mask: Tensor) -> dict[str, float]:
    """How closely `other` (a PyTorch model read back from an export, or an onnxruntime session)
    reproduces `reference` on (ids, mask): cosine of the flattened outputs, max and mean absolute
    error, over the positions the mask keeps. Logits for decoders, last hidden states for encoders;
    W8A8 layers of `reference` run their exact integer products in fp32 (`emulate_int_mm`)."""
    field = "logits" if kind == "decoder" else "last_hidden_state"
    with emulate_int_mm(reference):
        ref = getattr(reference(input_ids=ids, attention_mask=mask), field).float()[mask.bool()]
    got = getattr(other(input_ids=ids, attention_mask=mask), field).float()[mask.bool()]
    ref, got = ref.double(), got.double()  # float32 sums over millions of values read cosines above 1
    err = (got - ref).abs()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    return {"cosine": round(float(cosine), 6), "max_abs_err": float(err.max()), "mean_abs_err": float(err.mean())}
