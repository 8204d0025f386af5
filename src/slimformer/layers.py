"""The compressed-layer protocol: what every slimformer layer that stands in for an `nn.Linear` and
stores integer codes implements (QuantLinear, LUTLinear), and the model-walking helpers built on it.

Consumers (size accounting, export to GGUF/compressed-tensors/ONNX/HF, the artifact, checkpoints,
evaluation) test `is_compressed(module)` and use only the members below, so a new layer class that
implements them is counted, stored and exported like the others; one that misses a member is not
mistaken for one. Training-time layers that compute with a float weight (FakeQuantLinear) are not
compressed layers: `models.layout.is_linear` treats them as plain linears through their `weight`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class CompressedLinear(Protocol):
    """y = x W^T + b with W decoded from integer `codes` (out, in) and the layer's own parameters."""

    in_features: int
    out_features: int
    codes: Tensor  # integer codes, one per weight (size accounting and exports read them)

    def dequantized_weight(self) -> Tensor:
        """The (out, in) float weight the codes stand for (zeros where pruned)."""
        ...

    def spec(self) -> dict[str, Any]:
        """A JSON-able description that, with the layer's tensors, rebuilds it (`from_spec`)."""
        ...

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> nn.Module:
        """An empty layer of the described shape and scheme, ready for `load_state_dict`."""
        ...

    def packed_leaves(self) -> dict[str, tuple[int, int]]:
        """Buffers stored bit-packed: {leaf name: (bits, offset added before packing)}."""
        ...


def is_compressed(module: nn.Module) -> bool:
    """True for modules implementing the whole `CompressedLinear` protocol."""
    return isinstance(module, CompressedLinear)


def compressed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The compressed layers of `model`, by full name, in module order."""
    return {name: m for name, m in model.named_modules() if is_compressed(m)}


def set_int_kernel(model: nn.Module, enabled: bool) -> int:
    """Run W8A8 QuantLinear layers of `model` with `torch._int_mm` (True) or with the same integer
    product as fp32 matmuls (False: same numbers up to fp32 rounding, far faster on CPUs whose
    int8 GEMM is slow). Returns how many layers were set."""
    n = 0
    for m in model.modules():
        if hasattr(m, "int_kernel"):
            m.int_kernel = enabled
            n += 1
    return n


@contextmanager
def emulate_int_mm(model: nn.Module) -> Iterator[int]:
    """Within the block, layers whose integer kernel is `torch._int_mm` compute the same integer
    product as fp32 matmuls (exact while |acc| < 2^24), then get their kernel back. Used for quality
    metrics, whose numbers do not change, on CPUs where `_int_mm` is a slow reference loop;
    latency is always measured on the real kernel. Yields how many layers were switched."""
    switched = [m for m in model.modules() if getattr(m, "int_kernel", False) and getattr(m, "uses_int_mm", False)]
    for m in switched:
        m.int_kernel = False
    try:
        yield len(switched)
    finally:
        for m in switched:
            m.int_kernel = True
