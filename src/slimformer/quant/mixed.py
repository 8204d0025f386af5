"""`mixed`: per-layer bit widths chosen by measured sensitivity to meet a size target.

Two sensitivity measures:
- `fisher` (decoders): one backward pass per calibration window gives the diagonal Fisher of the
  language-model loss; each layer's loss increase at each bit width follows without rerunning the model.
- `measured` (decoders and encoders): quantize one layer at a time at each bit width and measure the
  change of the model's output on the calibration windows (KL of next-token distributions for
  decoders, 1 - cosine of mean-pooled embeddings for encoders). Exact but one forward pass per
  layer and bit width.
Every layer is then quantized round-to-nearest at its chosen width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from slimformer.calibrate.engine import calibration_inputs
from slimformer.config import TargetedConfig, check_positive
from slimformer.context import StepContext, track
from slimformer.errors import UserError
from slimformer.evaluate.divergence import output_divergence
from slimformer.models.grads import only_trainable
from slimformer.models.layout import select_linears, weight_view
from slimformer.quant.mixed_math import allocate_bits, fisher_sensitivity, layer_cost_bits
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import check_scheme, fake_quantize
from slimformer.registry import register


@dataclass(frozen=True)
class MixedConfig(TargetedConfig):
    """Give exactly one target: `avg_bits` (mean code bits per weight of the target layers, scales
    included in the budget as for uniform quantization at that width) or `size_bytes` (bytes of the
    target layers' codes + scales + zeros). `choices`: the bit widths a layer may get."""

    avg_bits: float | None = None
    size_bytes: int | None = None
    choices: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    group_size: int = 128
    symmetric: bool = False
    sensitivity: Literal["fisher", "measured"] = "fisher"
    num_samples: int = 8
    seq_len: int = 512

    def __post_init__(self) -> None:
        if (self.avg_bits is None) == (self.size_bytes is None):
            raise UserError("mixed: give exactly one of avg_bits or size_bytes.")
        if not self.choices:
            raise UserError("mixed: choices must list at least one bit width.")
        for bits in self.choices:
            check_scheme(bits, self.group_size, "mixed")
        if self.avg_bits is not None and not min(self.choices) <= self.avg_bits <= max(self.choices):
            raise UserError(f"mixed: avg_bits must lie within choices [{min(self.choices)}, {max(self.choices)}], "
                            f"got {self.avg_bits}.")
        if self.size_bytes is not None and self.size_bytes < 1:
            raise UserError(f"mixed: size_bytes must be positive, got {self.size_bytes}.")
        check_positive("mixed", self, "num_samples", "seq_len")


def _fisher(model: nn.Module, layers: dict[str, nn.Module], windows: torch.Tensor, ctx: StepContext | None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher (mean squared gradient of the LM loss per window), (out, in) per layer."""
    params = {name: (m.weight, isinstance(m, nn.Linear)) for name, m in layers.items()}
    fisher = {name: torch.zeros_like(weight_view(m)) for name, m in layers.items()}
    with only_trainable(model, [weight for weight, _ in params.values()]):
        for window in track(ctx, windows, "fisher", windows.shape[0]):
            model.zero_grad(set_to_none=True)
            ids = window.unsqueeze(0)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise UserError("mixed: the calibration loss is not finite (NaN/inf); check the model and data.")
            loss.backward()
            for name, (weight, plain) in params.items():
                g = weight.grad if plain else weight.grad.t()  # Conv1D stores (in, out)
                fisher[name] += g.pow(2) / windows.shape[0]
    return fisher


def _output_change(model: nn.Module, windows: torch.Tensor, kind: str):
    """A function measuring how far the model's current outputs are from its outputs now."""
    def outputs() -> torch.Tensor:
        with torch.inference_mode():
            if kind == "decoder":
                return F.log_softmax(model(input_ids=windows, use_cache=False).logits.float(), dim=-1)
            hidden = model(input_ids=windows, attention_mask=torch.ones_like(windows)).last_hidden_state
            return hidden.float().mean(dim=1)

    reference = outputs()

    def change() -> float:
        return output_divergence(reference, outputs(), kind)

    return change


def _measured(model: nn.Module, layers: dict[str, nn.Module], windows: torch.Tensor, config: MixedConfig,
              kind: str, ctx: StepContext | None) -> torch.Tensor:
    change = _output_change(model, windows, kind)
    scores = torch.zeros(len(layers), len(config.choices))
    for i, layer in enumerate(track(ctx, layers.values(), "sensitivity", len(layers))):
        w = weight_view(layer)
        original = w.clone()
        try:
            for j, bits in enumerate(config.choices):
                w.copy_(fake_quantize(original, bits, config.group_size, config.symmetric)[0])
                scores[i, j] = change()
        finally:
            w.copy_(original)
    return scores


@register("mixed", MixedConfig, stage="quant", placement="model")
def mixed(model: nn.Module, config: MixedConfig, ctx: StepContext | None = None) -> dict[str, Any]:
    """Score every target layer at every bit width, allocate bits under the budget, quantize (RTN)."""
    layers = select_linears(model, config.targets, config.ignore)
    kind = ctx.kind if ctx is not None else "decoder"
    if config.sensitivity == "fisher" and kind != "decoder":
        raise UserError("mixed: sensitivity 'fisher' needs a language-model loss; use sensitivity: measured for encoders.")
    windows = calibration_inputs(ctx, config.num_samples, config.seq_len, "mixed")
    if config.sensitivity == "fisher":
        fisher = _fisher(model, layers, windows, ctx)
        scores = torch.tensor([
            [fisher_sensitivity(weight_view(m), fisher[name], b, config.group_size, config.symmetric) for b in config.choices]
            for name, m in layers.items()
        ])
    else:
        scores = _measured(model, layers, windows, config, kind, ctx)

    shapes = {name: tuple(weight_view(m).shape) for name, m in layers.items()}
    costs = torch.tensor([[float(layer_cost_bits(*shapes[n], b, config.group_size)) for b in config.choices] for n in layers])
    if config.avg_bits is not None:
        # the budget uniform quantization at avg_bits would take (cost is linear in the bit width)
        budget = sum(layer_cost_bits(*shapes[n], 0, config.group_size) for n in layers) + config.avg_bits * (
            sum(layer_cost_bits(*shapes[n], 1, config.group_size) - layer_cost_bits(*shapes[n], 0, config.group_size)
                for n in layers))
    else:
        budget = 8.0 * config.size_bytes
    try:
        choice = allocate_bits(scores, costs, budget)
    except ValueError:
        smallest = int(costs.min(dim=1).values.sum()) // 8
        raise UserError(f"mixed: size_bytes {config.size_bytes} is below the smallest possible size of the target "
                        f"layers ({smallest} bytes at {min(config.choices)} bits).") from None

    chosen: dict[str, int] = {}
    with torch.no_grad():
        for (name, module), j in zip(layers.items(), choice.tolist()):
            bits = config.choices[j]
            chosen[name] = bits
            model.set_submodule(name, QuantLinear.from_float(
                module, bits=bits, group_size=config.group_size, symmetric=config.symmetric))
    n_weights = sum(shapes[n][0] * shapes[n][1] for n in layers)
    rows = torch.arange(len(layers))
    return {
        "layers": len(layers), "sensitivity": config.sensitivity, "calib_windows": int(windows.shape[0]),
        "avg_bits_chosen": round(sum(chosen[n] * shapes[n][0] * shapes[n][1] for n in layers) / n_weights, 3),
        "target_bytes": int(budget // 8), "chosen_bytes": int(costs[rows, choice].sum()) // 8,
        "bits_histogram": {str(b): sum(v == b for v in chosen.values()) for b in config.choices},
        "per_layer": {"title": "bits per layer", "values": chosen},
    }
