"""`LUTLinear`: a linear layer whose weights are indices into a lookup table (NF4, log2, k-means).

W[r, c] = table[r // rows_per_table, codes[r, c]] * scale[r, group(c)], the scale optional (k-means
tables hold the values themselves). The forward pass dequantizes and calls F.linear, as
`QuantLinear` does. The index buffer is called `codes`, like QuantLinear's, so `evaluate.size`
counts it as the layer's weights and the artifact packs it `bits` bits per weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimformer.quant.qscheme import expand_groups, n_groups


class LUTLinear(nn.Module):
    """y = x (table[codes] * scale)^T + b with codes (out, in), table (n_tables, 2^bits), scale (out, n_groups)."""

    is_slimformer_linear = True  # counted as a linear layer by models.layout

    def __init__(
        self, in_features: int, out_features: int, *, bits: int, method: str, n_tables: int = 1,
        rows_per_table: int | None = None, group_size: int | None = None, bias: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.method = bits, method
        self.rows_per_table = out_features if rows_per_table is None else rows_per_table
        self.group_size = group_size  # None: no scale
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int16))
        self.register_buffer("table", torch.zeros(n_tables, 2**bits, dtype=torch.float16))
        self.scale: torch.Tensor | None
        if group_size is None:
            self.register_buffer("scale", None)
        else:
            groups = n_groups(in_features, group_size)
            self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_codes(
        cls, codes: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None, *, bits: int, method: str,
        scale: torch.Tensor | None = None, group_size: int | None = None, rows_per_table: int | None = None,
    ) -> "LUTLinear":
        """Wrap computed codes (out, in), tables (n_tables, <= 2^bits) and optional scales (out, n_groups)."""
        out_features, in_features = codes.shape
        layer = cls(
            in_features, out_features, bits=bits, method=method, n_tables=table.shape[0],
            rows_per_table=rows_per_table, group_size=group_size if scale is not None else None,
            bias=bias is not None,
        )
        layer.codes.copy_(codes.to(torch.int16))
        layer.table[:, : table.shape[1]] = table.to(torch.float16)  # unused entries stay 0
        if scale is not None:
            layer.scale.copy_(scale.to(torch.float16))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer

    # --- the artifact protocol (see artifact.MODULE_CLASSES) ---
    def spec(self) -> dict:
        """JSON-able constructor arguments (the artifact manifest's entry for this module)."""
        return {
            "in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
            "method": self.method, "n_tables": self.table.shape[0], "rows_per_table": self.rows_per_table,
            "group_size": self.group_size, "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict) -> "LUTLinear":
        """An empty layer of the shape `spec` describes, ready for `load_state_dict`."""
        return cls(
            spec["in_features"], spec["out_features"], bits=spec["bits"], method=spec["method"],
            n_tables=spec["n_tables"], rows_per_table=spec["rows_per_table"], group_size=spec["group_size"],
            bias=spec["bias"],
        )

    def packed_leaves(self) -> dict[str, tuple[int, int]]:
        """Table indices are stored `bits` bits each, no offset (they are already >= 0)."""
        return {"codes": (self.bits, 0)}

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer computes with, (out, in) fp32."""
        table = self.table.float()  # (n_tables, 2^bits)
        if table.shape[0] == 1:
            w = table[0][self.codes.long()]
        else:
            rows = torch.arange(self.out_features, device=table.device) // self.rows_per_table  # (out,)
            w = table[rows.unsqueeze(1), self.codes.long()]  # (out, in)
        if self.scale is not None:
            w = w * expand_groups(self.scale.float(), self.in_features, self.group_size)
        return w

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, "
            f"bits={self.bits}, tables={self.table.shape[0]}, group_size={self.group_size}"
        )
