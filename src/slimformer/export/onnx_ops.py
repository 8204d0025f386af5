"""ONNX forms of slimformer's quantized linear layers, so the exported graph computes with OUR
integer codes and scales (not a second quantizer's).

Each layer kind becomes a module whose forward runs through an autograd Function with a
`symbolic` method: PyTorch's TorchScript exporter writes the ONNX nodes that `symbolic` builds,
while tracing runs `forward` (the same numbers in float):
- dynamic int8, per-tensor activations: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add,
  the pattern onnxruntime fuses into its int8 GEMM (uint8 activations x int8 per-channel weights);
- dynamic int8, per-token activations: per-row absmax scale, Round/Clip/Cast to int8, MatMulInteger;
- static W8A8 (calibrated activation scale; static/SmoothQuant): QuantizeLinear/DequantizeLinear
  pairs on activations and weights (QDQ), which onnxruntime runs as int8 kernels;
- anything else (weight-only codes, codebooks, simulated activation bits): a plain Linear with the
  exact dequantized weight, which computes the same values in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimformer.quant.int8_kernels import quantize_per_tensor_asym, quantize_per_token

_ONNX_FLOAT = 1  # TensorProto.FLOAT
_ONNX_INT8 = 3  # TensorProto.INT8


def _const(g, value: Tensor):  # noqa: ANN001, ANN202 (TorchScript graph objects)
    return g.op("Constant", value_t=value)


class _DynamicInt8(torch.autograd.Function):
    """y = (q(x) @ w_t) * s_x * s_w + b with int8 weight codes w_t (in, out)."""

    @staticmethod
    def forward(ctx, x: Tensor, w_t: Tensor, s_w: Tensor, bias: Tensor, per_token: bool) -> Tensor:  # noqa: ANN001
        x2 = x.reshape(-1, x.shape[-1]).float()
        if per_token:
            xq, s_x = quantize_per_token(x2)
            acc = xq.float() @ w_t.float()
        else:
            xq, s_x, zero = quantize_per_tensor_asym(x2)
            acc = (xq - zero) @ w_t.float()
        y = acc * s_x * s_w + bias
        return y.view(*x.shape[:-1], w_t.shape[1])

    @staticmethod
    def symbolic(g, x, w_t, s_w, bias, per_token: bool):  # noqa: ANN001, ANN205
        if per_token:
            s_x = g.op("Div", g.op("ReduceMax", g.op("Abs", x), axes_i=[-1], keepdims_i=1),
                       _const(g, torch.tensor(127.0)))
            s_x = g.op("Max", s_x, _const(g, torch.tensor(1e-12 / 127.0)))
            xr = g.op("Clip", g.op("Round", g.op("Div", x, s_x)), _const(g, torch.tensor(-127.0)),
                      _const(g, torch.tensor(127.0)))
            acc = g.op("MatMulInteger", g.op("Cast", xr, to_i=_ONNX_INT8), w_t)
            y = g.op("Mul", g.op("Mul", g.op("Cast", acc, to_i=_ONNX_FLOAT), s_x), s_w)
        else:
            xq, s_x, zero = g.op("DynamicQuantizeLinear", x, outputs=3)
            acc = g.op("MatMulInteger", xq, w_t, zero)
            y = g.op("Mul", g.op("Cast", acc, to_i=_ONNX_FLOAT), g.op("Mul", s_x, s_w))
        return g.op("Add", y, bias)


class _StaticInt8(torch.autograd.Function):
    """QDQ: x -> int8 with the calibrated scale -> float; weight int8 codes -> float per channel; MatMul."""

    @staticmethod
    def forward(ctx, x: Tensor, s_x: Tensor, w_t: Tensor, s_w: Tensor, w_zero: Tensor, bias: Tensor) -> Tensor:  # noqa: ANN001
        xq = torch.round(x / s_x).clamp(-128, 127) * s_x
        return xq @ (w_t.float() * s_w) + bias

    @staticmethod
    def symbolic(g, x, s_x, w_t, s_w, w_zero, bias):  # noqa: ANN001, ANN205
        zero = _const(g, torch.tensor(0, dtype=torch.int8))
        xdq = g.op("DequantizeLinear", g.op("QuantizeLinear", x, s_x, zero), s_x, zero)
        wdq = g.op("DequantizeLinear", w_t, s_w, w_zero, axis_i=1)
        return g.op("Add", g.op("MatMul", xdq, wdq), bias)


class OnnxDynamicLinear(nn.Module):
    """Export form of a dynamic int8 QuantLinear."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.per_token = layer.act_granularity == "token"
        self.register_buffer("w_t", layer.codes.to(torch.int8).t().contiguous())
        self.register_buffer("s_w", layer.scale.float().view(-1).clone())
        self.register_buffer("b", _bias(layer))

    def forward(self, x: Tensor) -> Tensor:
        return _DynamicInt8.apply(x, self.w_t, self.s_w, self.b, self.per_token)


class OnnxStaticLinear(nn.Module):
    """Export form of a static W8A8 QuantLinear (8-bit symmetric activations and weights)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        scaled = layer.input_scale is not None
        # SmoothQuant: x / s is what gets quantized; folded into one multiply by 1 / s
        self.register_buffer("inv_s", (1.0 / layer.input_scale.float()) if scaled else torch.ones(0))
        self.register_buffer("s_x", layer.act_scale.float().reshape(()).clone())
        self.register_buffer("w_t", layer.codes.to(torch.int8).t().contiguous())
        self.register_buffer("s_w", layer.scale.float().view(-1).clone())
        self.register_buffer("w_zero", torch.zeros(layer.out_features, dtype=torch.int8))  # symmetric codes
        self.register_buffer("b", _bias(layer))

    def forward(self, x: Tensor) -> Tensor:
        if self.inv_s.numel():
            x = x * self.inv_s
        return _StaticInt8.apply(x, self.s_x, self.w_t, self.s_w, self.w_zero, self.b)


def _bias(layer: nn.Module) -> Tensor:
    bias = getattr(layer, "bias", None)
    return bias.detach().float().clone() if bias is not None else torch.zeros(layer.out_features)


def dense_linear(layer: nn.Module) -> nn.Linear:
    """A plain Linear with the layer's exact dequantized weight (what it computes with)."""
    weight = layer.dequantized_weight().detach().float()
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=getattr(layer, "bias", None) is not None)
    out.weight.data.copy_(weight)
    if out.bias is not None:
        out.bias.data.copy_(layer.bias.detach().float())
    return out


def export_form(layer: nn.Module) -> nn.Module | None:
    """The module that replaces a slimformer layer for export (None: leave it as it is)."""
    if not getattr(layer, "is_slimformer_linear", False):
        return None
    if getattr(layer, "dynamic", False):
        return OnnxDynamicLinear(layer)
    if getattr(layer, "int8_static", False):
        return OnnxStaticLinear(layer)
    if getattr(layer, "act_bits", None):  # simulated activation bits: trace its float forward as is
        return None
    return dense_linear(layer)
