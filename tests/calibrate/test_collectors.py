"""What the calibration engine feeds layer inputs to: shared inputs, sink-weighted Hessians, the
step context's calibration windows."""

from __future__ import annotations

import pytest
import torch

from slimformer.calibrate.collectors import ColumnNorms, HessianCollector
from slimformer.calibrate.engine import calibration_inputs
from slimformer.context import StepContext
from slimformer.errors import UserError


def test_collector_shares_hessians_of_identical_inputs() -> None:
    hc = HessianCollector("gptq", seq_len=4, sink_weight=10.0)
    x, y = torch.randn(8, 3), torch.randn(8, 3)
    for name, t in (("q", x), ("k", x), ("o", y)):
        hc(name, t)
    assert hc.alias == {"k": "q"} and torch.equal(hc.get("k"), hc.get("q"))
    w = torch.tensor([10.0, 1, 1, 1] * 2).unsqueeze(1)
    assert torch.allclose(hc.get("o"), 2 * (y * w).T @ y / 8, atol=1e-5)


def test_column_norms_alias_shared_inputs_and_refuse_nan() -> None:
    norms = ColumnNorms("wanda")
    x = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    norms("up", x)
    norms("gate", x)  # the very same tensor: aliased, not observed twice
    assert norms.alias == {"gate": "up"} and torch.equal(norms.norm("gate"), torch.tensor([5.0, 1.0]))
    with pytest.raises(UserError, match="non-finite activations"):
        norms("down", torch.tensor([[float("nan"), 1.0]]))


def test_calibration_windows_need_text_and_tokenizer() -> None:
    with pytest.raises(UserError, match="gptq needs calibration data"):
        calibration_inputs(None, 4, 16, "gptq")
    with pytest.raises(UserError, match="awq needs calibration data"):
        StepContext(tokenizer=object()).calibration_windows(4, 16, "awq")
