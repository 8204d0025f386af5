"""The one export check: outputs of an exported model against PyTorch's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from slimformer.errors import UserError
from slimformer.export.parity import output_parity, parity_inputs
from slimformer.models.loading import ModelBundle


class _Fixed(torch.nn.Module):
    """A reference model or an exported one read back: always the same decoder logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


def test_parity_cosine_never_reads_above_one() -> None:
    # (1, 64, 49152): as many logits as one real parity window; summed in float32 their cosine read 1.00005
    logits = torch.randn(1, 64, 49152, generator=torch.Generator().manual_seed(0)) * 5 + 3
    ids, mask = torch.zeros(1, 64, dtype=torch.long), torch.ones(1, 64, dtype=torch.long)
    same = output_parity(_Fixed(logits), _Fixed(logits), "decoder", ids, mask)
    assert same == {"cosine": 1.0, "max_abs_err": 0.0, "mean_abs_err": 0.0}
    near = output_parity(_Fixed(logits), _Fixed(logits + 1e-3 * torch.randn_like(logits)), "decoder", ids, mask)
    assert 0.99999 < near["cosine"] <= 1.0 and 0 < near["mean_abs_err"] < near["max_abs_err"] < 1e-2


def test_parity_needs_a_tokenizer() -> None:
    with pytest.raises(UserError, match="has no tokenizer"):
        parity_inputs(ModelBundle(torch.nn.Linear(2, 2), None, "decoder", "tiny"))
