"""`FakeQuantLinear` and the two model-level halves of QAT: `prepare_qat` swaps target linears for
fake-quantized ones initialised from a PTQ result, `convert_qat` turns them into `QuantLinear`s.

A FakeQuantLinear holds a float latent weight and the per-group scales/zeros of `quant/qscheme.py`.
Its forward pass computes with the fake-quantized weight (`qat_math.fake_quant_ste`): the weight learns
through the straight-through estimator; with `lsq=True` the scales (and zero points) are learned
too (LSQ), otherwise they stay fixed at their PTQ values. `convert_qat` stores the very codes and
fp16 scales the forward pass used, so the QAT model saves and exports exactly like a PTQ one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimformer.models.layout import weight_view
from slimformer.quant.qat_math import (
    fake_quant_ste, fp16_ste, grad_scale, lsq_grad_scale, quant_codes, weights_per_scale,
)
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import QParams, compute_qparams, dequantize, qrange


class FakeQuantLinear(nn.Module):
    """y = x fake_quant_ste(latent)^T + b, latent (out, in) float; scale/zero (out, n_groups) fp32.

    The trained float weight is the parameter `latent`; `weight`, as for QuantLinear, is the weight
    the layer computes with (here the fake-quantized one), so layer-walking code and the training
    engine's pruning masks see the effective weight, not the latent one."""

    is_slimformer_linear = True  # counted as a linear layer by models.layout

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, qp: QParams, *, lsq: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.bits, self.group_size, self.symmetric, self.lsq = qp.bits, qp.group_size, qp.symmetric, lsq
        self.latent = nn.Parameter(weight.detach().float().clone())
        self.bias = nn.Parameter(bias.detach().float().clone()) if bias is not None else None
        scale, zero = qp.scale.detach().float().clone(), qp.zero.detach().float().clone()
        if lsq:
            self.scale = nn.Parameter(scale)
            self.zero = nn.Parameter(zero) if not qp.symmetric else None
        else:
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero if not qp.symmetric else None)
        n = weights_per_scale(self.in_features, self.out_features, qp.group_size)
        self.grad_scale = lsq_grad_scale(n, qp.bits, qp.symmetric)

    @classmethod
    def from_linear(cls, module: nn.Module, qp: QParams, *, lsq: bool, weight: torch.Tensor | None = None):
        """Wrap a Linear/Conv1D (or an explicit (out, in) `weight`) with the given scales/zeros."""
        w = weight_view(module) if weight is None else weight
        return cls(w, getattr(module, "bias", None), qp, lsq=lsq)

    def _qparams_t(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) as the forward pass uses them: fp16-rounded scale, LSQ gradient scaling."""
        scale, zero = self.scale, self.zero if self.zero is not None else torch.zeros_like(self.scale)
        if self.lsq:
            scale = grad_scale(scale, self.grad_scale)
            zero = grad_scale(zero, self.grad_scale) if self.zero is not None else zero
        return fp16_ste(scale), zero

    def fake_weight(self) -> torch.Tensor:
        """The (out, in) weight the forward pass computes with, differentiable."""
        scale, zero = self._qparams_t()
        return fake_quant_ste(self.latent, scale, zero, self.bits, self.group_size, self.symmetric)

    @property
    def weight(self) -> torch.Tensor:
        return self.fake_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def qparams(self) -> QParams:
        """The stored form of the current scales/zeros: fp16 scale, int16 zero (clamped to the range)."""
        qmin, qmax = qrange(self.bits, self.symmetric)
        scale = self.scale.detach().float().clamp(min=2.0**-24).half()
        zero = (torch.zeros_like(self.scale) if self.zero is None else torch.round(self.zero.detach()).clamp(qmin, qmax))
        return QParams(scale, zero.to(torch.int16), self.bits, self.group_size, self.symmetric)

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """A QuantLinear holding the codes and fp16 scales this layer computes with."""
        qp = self.qparams()
        codes = quant_codes(self.latent, qp.scale.float(), qp.zero.float(), self.bits, self.group_size, self.symmetric)
        return QuantLinear.from_codes(codes, qp, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, lsq={self.lsq}")


def rtn_init(layers: dict[str, nn.Module], bits: int, group_size: int, symmetric: bool) -> dict[str, tuple]:
    """{name: (latent weight, QParams)}: the float weight itself with its min/max (RTN) scales."""
    out = {}
    for name, module in layers.items():
        w = weight_view(module).float()
        out[name] = (w, compute_qparams(w, bits, group_size, symmetric))
    return out


def quantized_init(layers: dict[str, QuantLinear]) -> dict[str, tuple]:
    """{name: (latent weight, QParams)} from PTQ QuantLinears (e.g. GPTQ's): the dequantized weight,
    whose fake quantization gives back exactly the same codes, and the layer's own scales."""
    return {name: (dequantize(q.codes, q.qparams()), q.qparams()) for name, q in layers.items()}


def swap_in_fake_quant(model: nn.Module, layers: dict[str, nn.Module], init: dict[str, tuple], *, lsq: bool) -> int:
    """Replace every layer of `layers` by a FakeQuantLinear built from `init[name]`; returns the count."""
    for name, module in layers.items():
        weight, qp = init[name]
        model.set_submodule(name, FakeQuantLinear.from_linear(module, qp, lsq=lsq, weight=weight))
    return len(layers)


def convert_qat(model: nn.Module) -> int:
    """Replace every FakeQuantLinear of `model` by its QuantLinear (in place); returns the count."""
    names = [name for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).to_quant_linear())
    return len(names)
