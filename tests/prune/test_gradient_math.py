"""Gradient and Taylor scores against hand-computed values on a tiny linear layer."""

from __future__ import annotations

import torch

from slimformer.prune.gradient_math import accumulate_score, batch_score, output_energy


def test_taylor_and_gradient_scores_match_hand_computation() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2, bias=False)
    xs = [torch.randn(4, 3), torch.randn(4, 3)]
    totals = {c: torch.zeros(2, 3) for c in ("taylor", "gradient")}
    expected = {c: torch.zeros(2, 3) for c in totals}
    for x in xs:
        layer.zero_grad()
        loss = 0.5 * layer(x).pow(2).sum()
        loss.backward()
        g_hand = (x @ layer.weight.detach().t()).t() @ x  # dL/dW = y^T x for L = |y|^2 / 2
        assert torch.allclose(layer.weight.grad, g_hand, atol=1e-5)
        expected["taylor"] += (layer.weight.detach() * g_hand).abs() / 2
        expected["gradient"] += g_hand.abs() / 2
        for c, total in totals.items():
            accumulate_score(total, layer.weight.data, layer.weight.grad, c, batches=2)
    for c in totals:
        assert torch.allclose(totals[c], expected[c], atol=1e-5), c
    w, g = torch.tensor([[2.0, -3.0]]), torch.tensor([[-0.5, 0.25]])
    assert batch_score(w, g, "taylor").tolist() == [[1.0, 0.75]]
    assert batch_score(w, g, "gradient").tolist() == [[0.5, 0.25]]


def test_output_energy_ignores_padding() -> None:
    h = torch.tensor([[[3.0, 4.0], [100.0, 0.0]]])  # token 2 is padding
    assert float(output_energy(h, torch.tensor([[1, 0]]))) == 12.5
    assert float(output_energy(h[:, :1])) == 12.5
