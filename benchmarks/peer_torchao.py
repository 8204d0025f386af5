"""torchao's weight-only and dynamic int8 configs, and torch.ao's quantize_dynamic (benchmarks/peers.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from harness import Bench, PeerError, PeerFn, smoke  # benchmarks/harness.py
from torch import nn


def _only_targets(bench: Bench) -> Callable[[nn.Module, str], bool]:
    names = set(bench.targets)
    return lambda module, fqn: fqn in names


def _count_quantized(model: nn.Module, bench: Bench) -> int:
    """Target layers whose weight is no longer a plain tensor (torchao skips some silently)."""
    return sum(type(model.get_submodule(n).weight.data) is not torch.Tensor for n in bench.targets)


def _torchao(model: nn.Module, bench: Bench, config: Any) -> tuple[Any, list[str]]:
    from torchao.quantization import quantize_

    quantize_(model, config, filter_fn=_only_targets(bench))
    done = _count_quantized(model, bench)
    if done == 0:
        raise PeerError(f"{type(config).__name__} quantized none of the {len(bench.targets)} target layers")
    notes = [] if done == len(bench.targets) else [f"quantized {done} of {len(bench.targets)} layers, the rest left fp32"]
    return model, notes


def torchao_intx(group: int) -> PeerFn:
    """IntxWeightOnlyConfig int4, PerGroup, asymmetric: the generic (CPU-capable) weight-only path."""

    def run(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
        from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup

        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group),
                                      mapping_type=MappingType.ASYMMETRIC)
        return _torchao(model, bench, config)

    return run


def _int4(make_config: Callable[[], Any]) -> PeerFn:
    """An int4 config run on the targets, then one short forward pass (a layout without a CPU
    kernel fails there, inside the timing)."""

    def run(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
        model, notes = _torchao(model, bench, make_config())
        smoke(model, bench)
        return model, notes

    return run


def torchao_int4(group: int) -> PeerFn:
    """Int4WeightOnlyConfig (the main int4 API; its default packing targets GPU kernels)."""

    def config() -> Any:
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group)

    return _int4(config)


def torchao_int4_cpu(group: int) -> PeerFn:
    """The prototype CPU int4 (tinygemm layout, float zero points)."""

    def config() -> Any:
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group)

    return _int4(config)


def torchao_int8_dynamic(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
    """Int8DynamicActivationInt8WeightConfig: per-token int8 activations, per-channel int8 weights."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return _torchao(model, bench, Int8DynamicActivationInt8WeightConfig())


def torch_ao_dynamic(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
    """torch.ao.quantization.quantize_dynamic, qint8, per-channel weights, on the target layers."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec = {name: per_channel_dynamic_qconfig for name in bench.targets}
    model = quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    return model, ["activations dynamic per-tensor uint8 (fbgemm)"]
