"""What the calibration engine feeds each target layer's input to (`observe_linears` callbacks):
one statistic per distinct input — a Hessian (GPTQ, SparseGPT, AWQ), column norms (Wanda, OWL),
observers (static quantization, SmoothQuant)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from slimformer.calibrate.hessian_math import accumulate_hessian
from slimformer.errors import UserError
from slimformer.models.placement import HOST


class SharedInputs:
    """Base of `observe_linears` callbacks that keep statistics per distinct layer input.

    Layers fed the very same tensor one after another (q/k/v, gate/up) are aliased to the first of
    them, their `leader`, instead of being observed again: `add(name, x)` sees each distinct input
    once, after a check that it is finite.
    """

    def __init__(self, method: str) -> None:
        self.method = method
        self.alias: dict[str, str] = {}
        self._prev: tuple[str, torch.Tensor] | None = None  # held so its memory cannot be reused

    def __call__(self, name: str, x: torch.Tensor) -> None:
        if self._prev is not None and x.data_ptr() == self._prev[1].data_ptr() and x.shape == self._prev[1].shape:
            self.alias[name] = self.leader(self._prev[0])
        else:
            if not torch.isfinite(x).all():
                raise UserError(f"{self.method}: non-finite activations (NaN/inf) reach '{name}' on the calibration data.")
            self.add(name, x)
        self._prev = (name, x)

    def add(self, name: str, x: torch.Tensor) -> None:
        """Take in one distinct input (tokens, in) of layer `name`."""
        raise NotImplementedError

    def leader(self, name: str) -> str:
        return self.alias.get(name, name)


class HessianCollector(SharedInputs):
    """`on_input` callback accumulating H = 2/n sum w_t x_t x_t^T per layer.

    The first token of every window is an attention sink: all later queries attend to it, so an
    error in its outputs (above all v_proj's) is added into every position. With uniform token
    weights GPTQ trades that one token's error for the other 511 and perplexity gets worse than
    plain rounding (SmolLM2 v_proj alone, W4 g128: 34.1 vs RTN 29.2); weighting it `sink_weight`
    times fixes that (28.4). Layers fed the very same tensor one after another (q/k/v, gate/up)
    share one Hessian instead of recomputing it.
    """

    def __init__(self, method: str, seq_len: int | None = None, sink_weight: float = 1.0) -> None:
        super().__init__(method)
        self.seq_len, self.sink_weight = seq_len, sink_weight
        self.sums: dict[str, tuple[torch.Tensor, int]] = {}
        self._made: tuple[str, Any] | None = None

    def add(self, name: str, x: torch.Tensor) -> None:
        h, n = self.sums.get(name, (None, 0))
        self.sums[name] = accumulate_hessian(h, x, n, self._weights(x.shape[0], x.device))

    def _weights(self, tokens: int, device: torch.device) -> torch.Tensor | None:
        if self.seq_len is None or self.sink_weight == 1.0 or tokens % self.seq_len:
            return None
        w = torch.ones(tokens // self.seq_len, self.seq_len, device=device)
        w[:, 0] = self.sink_weight
        return w.reshape(-1)

    def get(self, name: str) -> torch.Tensor:
        return self.sums[self.leader(name)][0]

    def last_users(self, names: list[str]) -> dict[str, str]:
        """Leader -> the last of `names` that reads its Hessian (visited in this order)."""
        return {self.leader(name): name for name in names}

    def release(self, name: str) -> None:
        """Forget the Hessian of `name`'s input (a factor made from it is kept): once its last layer
        has what it needs, so it is not alive beside the later layers' work (0.8 GB at 14336 wide)."""
        self.sums.pop(self.leader(name), None)

    def shared(self, name: str, make: Callable[[torch.Tensor], Any]) -> Any:
        """`make(H)` for layer `name`, made once for the layers that share its Hessian (q/k/v and
        gate/up have one inverse factor: GPTQ and SparseGPT computed it for each). Only the latest
        is kept, the layers of one input being visited one after another."""
        leader = self.leader(name)
        if self._made is None or self._made[0] != leader:
            self._made = None  # the previous one is freed before the next is made
            self._made = (leader, make(self.get(name)))
        return self._made[1]


class ColumnNorms(SharedInputs):
    """`observe_linears` callback: sum of x_j^2 over tokens per input column, per distinct input."""

    def __init__(self, method: str) -> None:
        super().__init__(method)
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        sq = x.float().pow(2).sum(dim=0)  # (in,)
        self.sums[name] = sq if name not in self.sums else self.sums[name] + sq

    def norm(self, name: str) -> torch.Tensor:
        """||x_j||_2 over all tokens seen, (in,) fp32."""
        return self.sums[self.leader(name)].sqrt()


class InputObservers(SharedInputs):
    """`on_input` callback keeping one observer per distinct layer input.

    Layers fed the very same tensor one after another (q/k/v, gate/up) share one observer, hence
    one activation scale. `divisors` maps a layer to a per-channel vector its input is divided by
    before observing (SmoothQuant's x / s).
    """

    def __init__(self, make: Callable[[], Any], method: str, divisors: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(method)
        self.make, self.divisors = make, divisors or {}
        self.observers: dict[str, Any] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        observer = self.observers.setdefault(name, self.make())
        x = x.to(HOST)  # observers keep their histograms and samples on the host
        observer.update(x / self.divisors[name].to(HOST) if name in self.divisors else x)  # (tokens, in)

    def get(self, name: str) -> Any:
        return self.observers[self.leader(name)]

    def groups(self, names: list[str]) -> dict[str, list[str]]:
        """Leader layer -> the layers sharing its input, in block order."""
        out: dict[str, list[str]] = {}
        for name in names:
            out.setdefault(self.leader(name), []).append(name)
        return out
