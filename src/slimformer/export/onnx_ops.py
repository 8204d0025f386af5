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
- 4-bit weight-only with groups of 16, 32, 64, ... (RTN/GPTQ/AWQ): onnxruntime's `MatMulNBits`
  (com.microsoft) holding our codes two per byte with our fp16 scales and zero points, a smaller
  last group included (576 = 4 x 128 + 64); AWQ's input scale becomes a multiply before it;
  llama.cpp's signed_max scales (negative d) too, but not its float minimum (see `nbits_ready`);
- anything else (weight-only codes, codebooks, simulated activation bits): a plain Linear with the
  exact dequantized weight, which computes the same values in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimformer.layers import is_compressed
from slimformer.quant.int8_kernels import quantize_per_tensor_asym, quantize_per_token
from slimformer.quant.qlinear import QuantLinear

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


class _MatMulNBits(torch.autograd.Function):
    """y = x @ dequant(codes)^T + b, blockwise 4-bit: onnxruntime's MatMulNBits."""

    @staticmethod
    def forward(ctx, x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor,  # noqa: ANN001
                weight: Tensor, k: int, n: int, block: int, level: int) -> Tensor:
        return x @ weight.t() + bias

    @staticmethod
    def symbolic(g, x, packed, scales, zeros, bias, weight, k: int, n: int, block: int, level: int):  # noqa: ANN001, ANN205
        y = g.op("com.microsoft::MatMulNBits", x, packed, scales, zeros, K_i=k, N_i=n, bits_i=4, block_size_i=block,
                 accuracy_level_i=level)
        return g.op("Add", y, bias)


# MatMulNBits `accuracy_level`: 0 dequantizes the weights and multiplies in fp32 (exactly what the
# PyTorch layer computes); 4 also quantizes the activations to int8 per block and multiplies in
# integers (VNNI where the CPU has it): several times faster for decode, slightly less exact.
INT4_COMPUTE = {"fp32": 0, "int8": 4}


def pack_nibbles(values: Tensor) -> Tensor:
    """(..., 2m) integers in [0, 15] -> (..., m) uint8, the first of each pair in the low nibble."""
    v = values.to(torch.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


class OnnxInt4Linear(nn.Module):
    """Export form of a 4-bit weight-only QuantLinear: MatMulNBits with our codes and scales."""

    def __init__(self, layer: nn.Module, compute: str = "fp32") -> None:
        super().__init__()
        out_f, in_f, block = layer.out_features, layer.in_features, layer.group_size
        self.level = INT4_COMPUTE[compute]
        n_blocks = layer.scale.shape[1]
        offset = 8 if layer.symmetric else 0  # signed codes [-8, 7] -> unsigned [0, 15], zero point 8
        codes = torch.zeros(out_f, n_blocks * block, dtype=torch.int16)  # the short last block padded with 0
        codes[:, :in_f] = layer.codes + offset
        self.register_buffer("packed", pack_nibbles(codes.view(out_f, n_blocks, block)))
        self.register_buffer("scales", layer.scale.float().reshape(-1).clone())  # (N * n_blocks,)
        zeros = (layer.zero.to(torch.int16) + offset).clamp(0, 15)
        zeros = torch.cat([zeros, torch.zeros(out_f, n_blocks % 2, dtype=torch.int16)], dim=1)  # whole bytes per row
        self.register_buffer("zeros", pack_nibbles(zeros).reshape(-1))
        self.register_buffer("b", _bias(layer))
        scaled = layer.input_scale is not None
        # AWQ: the codes quantize W * s, so the layer computes (x / s) dequant^T
        self.register_buffer("inv_s", (1.0 / layer.input_scale.float()) if scaled else torch.ones(0))
        self.register_buffer("weight", (layer.dequantized_weight() * (layer.input_scale if scaled else 1.0)).float(),
                             persistent=False)  # for tracing only; not in the ONNX file
        self.k, self.n, self.block = in_f, out_f, block

    def forward(self, x: Tensor) -> Tensor:
        if self.inv_s.numel():
            x = x * self.inv_s
        return _MatMulNBits.apply(x, self.packed, self.scales, self.zeros, self.b, self.weight, self.k, self.n,
                                  self.block, self.level)


def nbits_ready(layer: nn.Module) -> bool:
    """True when MatMulNBits can hold the layer: 4-bit codes in groups of a power of two >= 16,
    with integer zero points (signed_max's negative scales included). A float minimum
    (zero_point "float", w = d * code + m) is not: MatMulNBits computes (code - zp) * d, and a
    float zp = -m / d reproduces d * code + m only up to rounding, so such a layer is written as
    its exact dequantized weight (fp32, as other non-native layers)."""
    g = getattr(layer, "group_size", 0)
    return (isinstance(layer, QuantLinear) and layer.bits == 4 and g >= 16 and g & (g - 1) == 0
            and not layer.dynamic and not layer.act_bits and getattr(layer, "minimum", None) is None)


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


def export_form(layer: nn.Module, *, int4: bool = True, int4_compute: str = "fp32") -> nn.Module | None:
    """The module that replaces a slimformer layer for export (None: leave it as it is).
    int4=False writes 4-bit weight-only layers as dense fp32 weights instead of MatMulNBits;
    int4_compute: "fp32" (exact) or "int8" (MatMulNBits multiplies int8-quantized activations)."""
    if not is_compressed(layer):
        return None
    if int4 and nbits_ready(layer):
        return OnnxInt4Linear(layer, int4_compute)
    if getattr(layer, "dynamic", False):
        return OnnxDynamicLinear(layer)
    if getattr(layer, "int8_static", False):
        return OnnxStaticLinear(layer)
    if getattr(layer, "act_bits", None):  # simulated activation bits: trace its float forward as is
        return None
    return dense_linear(layer)
