"""`QuantLinear`: a linear layer whose weight is held as integer codes + per-group scales/zeros.

By default the forward pass dequantizes (weight-only quantization, simulated in float; real
low-bit kernels come through export). With `dynamic=True` (8-bit symmetric per-channel weights)
activations are quantized at run time and the product runs in real integer arithmetic: per token
through `torch._int_mm` (int8 x int8 -> int32), or per tensor (`act_granularity="tensor"`) through
PyTorch's quantized engine (`quantized::linear_dynamic`, uint8 x int8, fast on x86 CPUs). With `act_bits` (static W8A8, SmoothQuant) activations
are quantized with one calibrated per-tensor scale/zero (`act_scale`, `act_zero`): through
`torch._int_mm` for 8-bit symmetric weights and activations, simulated in float otherwise.
Holding the codes, not float weights, is what lets the artifact store them packed.

llama.cpp's parametrizations (`qscheme`): `scale_rule="signed_max"` keeps the same buffers (codes
in [-2^(b-1), 2^(b-1)-1], `scale` = d, possibly negative, `zero` all 0; w = codes * scale), and
`zero_point="float"` adds an fp16 buffer `minimum` (out, n_groups) (codes in [0, 2^b-1], `zero`
all 0 and unused; w = scale * codes + minimum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimformer.models.layout import weight_view
from slimformer.quant.int8_kernels import (
    fake_quant_static, int8_matmul, packed_dynamic_linear, prepack_int8, quantize_per_tensor_asym, quantize_per_token,
    quantize_static,
)
from slimformer.quant.qscheme import (
    SCALE_RULES, ZERO_POINTS, QParams, compute_qparams, dequantize, quantize, rule_of,
)


class QuantLinear(nn.Module):
    """y = x dequant(codes)^T + b with codes (out, in), scale/zero (out, n_groups)."""

    is_slimformer_linear = True  # counted as a linear layer by models.layout

    def __init__(
        self, in_features: int, out_features: int, n_groups: int, *, bits: int, group_size: int,
        symmetric: bool, bias: bool, dynamic: bool = False, input_scaled: bool = False,
        act_bits: int | None = None, act_symmetric: bool = True, act_granularity: str = "token",
        scale_rule: str = "absmax", zero_point: str = "int",
    ) -> None:
        super().__init__()
        if (scale_rule not in SCALE_RULES or zero_point not in ZERO_POINTS
                or (scale_rule != "absmax" and not symmetric) or (zero_point != "int" and symmetric)):
            raise ValueError(f"scale_rule {scale_rule!r} / zero_point {zero_point!r} do not fit symmetric={symmetric}")
        if dynamic and (input_scaled or act_bits or rule_of(scale_rule, zero_point) != "affine"
                        or not (bits == 8 and symmetric and group_size == -1)):
            raise ValueError("dynamic int8 execution needs 8-bit absmax symmetric per-channel weights, unscaled inputs")
        if act_granularity not in ("token", "tensor") or (act_granularity == "tensor" and not dynamic):
            raise ValueError(f"act_granularity must be 'token' or 'tensor' (tensor only with dynamic), got {act_granularity!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.dynamic = bits, group_size, symmetric, dynamic
        self.scale_rule, self.zero_point = scale_rule, zero_point
        self.act_granularity = act_granularity
        self._int8_t: torch.Tensor | None = None  # (in, out) int8 copy of the codes for _int_mm
        self._packed: tuple[tuple[int, ...], object] | None = None  # (buffer versions, quantized-engine weight)
        # False: the same integer product in fp32 matmuls (exact while |acc| < 2^24), for evaluation
        # where torch._int_mm has no fast CPU kernel (measured ~4 GOP/s vs ~120 GFLOP/s fp32 on an AVX2 CPU)
        self.int_kernel = True
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int16))
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zero", torch.zeros(out_features, n_groups, dtype=torch.int16))
        # llama.cpp's Q4_1-style float minimum: w = scale * codes + minimum
        self.minimum: torch.Tensor | None
        if zero_point == "float":
            self.register_buffer("minimum", torch.zeros(out_features, n_groups, dtype=torch.float16))
        else:
            self.minimum = None
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # AWQ: codes quantize W * s (per input channel), so the layer computes x (dequant / s)^T
        self.input_scale: torch.Tensor | None
        if input_scaled:
            self.register_buffer("input_scale", torch.ones(in_features))
        else:
            self.input_scale = None
        # static activation quantization: one calibrated (scale, zero) for the layer's input
        self.act_bits, self.act_symmetric = act_bits, act_symmetric
        if act_bits is not None:
            self.register_buffer("act_scale", torch.ones(1))
            self.register_buffer("act_zero", torch.zeros(1, dtype=torch.int16))

    @classmethod
    @torch.no_grad()
    def from_float(
        cls, module: nn.Module, *, bits: int, group_size: int, symmetric: bool, weight: torch.Tensor | None = None,
        dynamic: bool = False, act_granularity: str = "token", scale_rule: str = "absmax", zero_point: str = "int",
    ) -> "QuantLinear":
        """Quantize a Linear/Conv1D (or an explicit (out, in) `weight`, e.g. from GPTQ) round-to-nearest."""
        w = weight_view(module) if weight is None else weight
        qp = compute_qparams(w.float(), bits, group_size, symmetric, scale_rule=scale_rule, zero_point=zero_point)
        return cls.from_codes(
            quantize(w.float(), qp), qp, getattr(module, "bias", None), dynamic=dynamic, act_granularity=act_granularity
        )

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, qp: QParams, bias: torch.Tensor | None, *, dynamic: bool = False,
        input_scaled: bool = False, act_bits: int | None = None, act_symmetric: bool = True,
        act_granularity: str = "token",
    ) -> "QuantLinear":
        """Wrap already-computed integer codes and their scales/zeros."""
        out_features, in_features = codes.shape
        layer = cls(
            in_features, out_features, qp.scale.shape[1], bits=qp.bits, group_size=qp.group_size,
            symmetric=qp.symmetric, bias=bias is not None, dynamic=dynamic, input_scaled=input_scaled,
            act_bits=act_bits, act_symmetric=act_symmetric, act_granularity=act_granularity,
            scale_rule=qp.scale_rule, zero_point=qp.zero_point,
        )
        layer.codes.copy_(codes.to(torch.int16))
        layer.scale.copy_(qp.scale.to(torch.float16))
        layer.zero.copy_(qp.zero.to(torch.int16))
        if layer.minimum is not None:
            layer.minimum.copy_(qp.minimum.to(torch.float16))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer

    # --- the artifact protocol: how this module is described in the manifest and packed on disk ---
    def spec(self) -> dict:
        """JSON-able constructor arguments (the artifact manifest's entry for this module)."""
        return {
            "in_features": self.in_features, "out_features": self.out_features, "n_groups": self.scale.shape[1],
            "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
            "bias": self.bias is not None, "dynamic": self.dynamic, "input_scaled": self.input_scale is not None,
            # a last group smaller than group_size (e.g. 576 = 4 x 128 + 64) is recorded here
            "last_group": self.in_features - (self.scale.shape[1] - 1) * self.group_size if self.group_size > 0 else None,
            # only for static activation quantization, so earlier manifests are unchanged
            **({"act_bits": self.act_bits, "act_symmetric": self.act_symmetric} if self.act_bits else {}),
            **({"act_granularity": self.act_granularity} if self.act_granularity != "token" else {}),
            # llama.cpp's parametrizations, likewise only when used
            **({"scale_rule": self.scale_rule} if self.scale_rule != "absmax" else {}),
            **({"zero_point": self.zero_point} if self.zero_point != "int" else {}),
        }

    @classmethod
    def from_spec(cls, spec: dict) -> "QuantLinear":
        """An empty layer of the shape `spec` describes, ready for `load_state_dict`."""
        return cls(
            spec["in_features"], spec["out_features"], spec["n_groups"], bits=spec["bits"],
            group_size=spec["group_size"], symmetric=spec["symmetric"], bias=spec["bias"],
            dynamic=spec.get("dynamic", False), input_scaled=spec.get("input_scaled", False),
            act_bits=spec.get("act_bits"), act_symmetric=spec.get("act_symmetric", True),
            act_granularity=spec.get("act_granularity", "token"),
            scale_rule=spec.get("scale_rule", "absmax"), zero_point=spec.get("zero_point", "int"),
        )

    def packed_leaves(self) -> dict[str, tuple[int, int]]:
        """Integer buffers stored `bits` bits each: leaf -> (bits, offset added to make them >= 0)."""
        offset = 2 ** (self.bits - 1) if self.symmetric else 0
        return {"codes": (self.bits, offset), "zero": (self.bits, offset)}

    def qparams(self) -> QParams:
        return QParams(self.scale, self.zero, self.bits, self.group_size, self.symmetric, minimum=self.minimum,
                       scale_rule=self.scale_rule, zero_point=self.zero_point)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer computes with, (out, in) fp32."""
        w = dequantize(self.codes, self.qparams())
        return w if self.input_scale is None else w / self.input_scale

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight()

    @property
    def int8_static(self) -> bool:
        """True when static activation quantization runs as real int8 x int8 products."""
        return (self.act_bits == 8 and self.act_symmetric and self.bits == 8 and self.symmetric
                and self.group_size == -1)

    @property
    def uses_int_mm(self) -> bool:
        """True when the integer kernel is `torch._int_mm` (per-token dynamic or static int8)."""
        return (self.dynamic and self.act_granularity == "token") or self.int8_static

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            return self._int8_forward(x)
        if self.act_bits is None:
            return F.linear(x, self.dequantized_weight().to(x.dtype), self._bias(x))
        if self.input_scale is not None:  # SmoothQuant: x / s must be what gets quantized
            x = x / self.input_scale.to(x.dtype)
        if self.int8_static:
            return self._int8_forward(x)
        xq = fake_quant_static(x, self.act_scale.to(x.dtype), self.act_zero, self.act_bits, self.act_symmetric)
        return F.linear(xq, dequantize(self.codes, self.qparams()).to(x.dtype), self._bias(x))

    def _bias(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fp32 bias in the input's dtype (a bf16/fp16 model computes in its own dtype)."""
        return None if self.bias is None else self.bias.to(x.dtype)

    def __getstate__(self) -> dict:
        # the kernel caches are derived from the buffers (and the packed one cannot be copied)
        return {**self.__dict__, "_int8_t": None, "_packed": None}

    def _packed_weight(self) -> object:
        """The quantized engine's packed copy of codes/scale/bias, rebuilt when any of them changed."""
        tensors = (self.codes, self.scale) + ((self.bias,) if self.bias is not None else ())
        versions = tuple(t._version for t in tensors) + tuple(t.data_ptr() for t in tensors)
        if self._packed is None or self._packed[0] != versions:
            self._packed = (versions, prepack_int8(self.codes, self.scale.float().view(-1), self.bias))
        return self._packed[1]

    def _tensor_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """Per-tensor dynamic activations: the quantized engine's kernel, or its float emulation."""
        if self.int_kernel:
            return packed_dynamic_linear(x2, self._packed_weight())
        xq, s_x, zero = quantize_per_tensor_asym(x2)
        acc = (xq - zero) @ self.codes.float().t()  # exact integer accumulator, in fp32
        y = acc * s_x * self.scale.float().view(1, -1)
        return y if self.bias is None else y + self.bias

    def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = (round(x / s_x) @ codes^T) * s_x * s_w + b; s_x per token / per tensor (dynamic) or calibrated."""
        x2 = x.reshape(-1, self.in_features).float()  # (tokens, in)
        if self.dynamic and self.act_granularity == "tensor":
            return self._tensor_forward(x2).view(*x.shape[:-1], self.out_features).to(x.dtype)
        if self._int8_t is None or self._int8_t.shape != (self.in_features, self.out_features):
            self._int8_t = self.codes.to(torch.int8).t()  # (in, out) column-major: 2x faster _int_mm on CPU
        if self.dynamic:
            xq, s_x = quantize_per_token(x2)
        else:
            s_x = self.act_scale.float()
            xq = quantize_static(x2, s_x)
        w_t = self._int8_t if self.int_kernel else self._int8_t.float()
        y = int8_matmul(xq if self.int_kernel else xq.float(), w_t, s_x, self.scale.float().view(-1), self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, dynamic={self.dynamic}"
            + (f", act_granularity={self.act_granularity}" if self.dynamic else "")
            + (f", act_bits={self.act_bits}" if self.act_bits else "")
            + (f", scale_rule={self.scale_rule}" if self.scale_rule != "absmax" else "")
            + (f", zero_point={self.zero_point}" if self.zero_point != "int" else "")
        )
