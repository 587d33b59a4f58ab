"""Quantized drop-ins for the model's linears and experts.

Contract:
- `QuantLinear(in, out, args)` replaces `nn.Linear(in, out, bias=False)`; `QuantExperts(config, args)`
  replaces `Experts`. Their buffers carry the compressed-tensors names and shapes, so a quantized
  checkpoint loads into them by plain name copy (per-expert names for experts:
  `experts.{e}.{gate,up,down}_proj.*`, gate = rows [:I] of the fused `gate_up_proj`).
- After loading, `pack_for_kernels()` converts those buffers into the kernels' layout (`kernels.py`)
  and frees them: from then on a module is inference-only and computes `x @ W.T` with W the
  dequantized weight, within the kernel's rounding. The engine never knows the model is quantized.
- `Fp8Linear` reads float8 weights with their scales: fp8 matmuls on CUDA (sm89+), elsewhere
  dequantized once (no fp8 matmul on CPU).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..model.layers import Experts, gelu_tanh
from .kernels import Fp8Weight, Int4Weight, Int8Weight
from .scheme import WeightArgs, unpack_int4


def ct_buffers(out_features: int, in_features: int, args: WeightArgs) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized (out, in) linear, uninitialised."""
    n, k = out_features, in_features
    if args.bits == 8:
        return {"weight": torch.empty(n, k, dtype=torch.int8), "weight_scale": torch.empty(n, 1)}
    g = args.group_size or k
    return {"weight_packed": torch.empty(n, (k + 7) // 8, dtype=torch.int32),
            "weight_scale": torch.empty(n, k // g), "weight_shape": torch.empty(2, dtype=torch.int64)}


class KernelLinear(nn.Module):
    """A linear computed by `kernel_weight` (a `kernels.py` weight, built by `pack_for_kernels`)."""
    out_features: int
    kernel_weight: Int8Weight | Int4Weight | Fp8Weight | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype."""
        out = self.kernel_weight.mm(x.reshape(-1, x.shape[-1]))
        return out.reshape(*x.shape[:-1], self.out_features)


class QuantLinear(KernelLinear):
    def __init__(self, in_features: int, out_features: int, args: WeightArgs):
        super().__init__()
        self.in_features, self.out_features, self.args = in_features, out_features, args
        for name, t in ct_buffers(out_features, in_features, args).items():
            self.register_buffer(name, t)
        self.kernel_weight: Int8Weight | Int4Weight | None = None

    def ct_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 for 8 bits / u = q + 8 for 4 bits, (N, K); scale (N, G)) from the loaded buffers."""
        if self.args.bits == 8:
            return self.weight, self.weight_scale
        n, k = (int(v) for v in self.weight_shape)
        if (n, k) != (self.out_features, self.in_features):
            raise ValueError(f"weight_shape {[n, k]} does not match the layer's {[self.out_features, self.in_features]}")
        return unpack_int4(self.weight_packed, k), self.weight_scale

    def release_ct(self) -> None:
        for name in list(self._buffers):
            del self._buffers[name]

    def pack_for_kernels(self) -> None:
        if self.kernel_weight is None:
            pair = self.ct_values()
            self.kernel_weight = Int8Weight([pair]) if self.args.bits == 8 else Int4Weight(1, [pair])
            self.release_ct()

    def extra_repr(self) -> str:
        kernel = self.kernel_weight.kernel if self.kernel_weight else "not packed"
        return f"in={self.in_features}, out={self.out_features}, {self.args}, kernel={kernel}"


class Fp8Linear(KernelLinear):
    """float8_e4m3fn weight (N, K) with a per-channel (N, 1) or per-tensor (1,) scale."""

    def __init__(self, in_features: int, out_features: int, scale_shape: tuple[int, ...]):
        super().__init__()
        self.out_features = out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.empty(scale_shape))
        self.kernel_weight: Fp8Weight | None = None

    def pack_for_kernels(self) -> None:
        if self.kernel_weight is None:
            self.kernel_weight = Fp8Weight(self.weight, self.weight_scale, self.weight_scale.dtype)
            del self._buffers["weight"], self._buffers["weight_scale"]

    def extra_repr(self) -> str:
        return f"kernel={self.kernel_weight.kernel if self.kernel_weight else 'not packed'}"


class ExpertLinears(nn.Module):
    """One expert's three linears under their compressed-tensors names."""

    def __init__(self, hidden: int, inner: int, gate_up: WeightArgs, down: WeightArgs):
        super().__init__()
        self.gate_proj = QuantLinear(hidden, inner, gate_up)
        self.up_proj = QuantLinear(hidden, inner, gate_up)
        self.down_proj = QuantLinear(inner, hidden, down)


class QuantExperts(Experts):
    """E quantized experts run as two grouped low-bit matmuls (gate|up fused, then down); the routing
    (sort by expert, weighted `index_add_`) is `Experts.forward`'s."""

    def __init__(self, config: ModelConfig, gate_up: WeightArgs, down: WeightArgs):
        nn.Module.__init__(self)           # no dense (E, 2I, H) parameters: the children hold the weights
        self.num_experts, self.bits = config.num_experts, gate_up.bits
        for e in range(self.num_experts):
            self.add_module(str(e), ExpertLinears(config.hidden_size, config.moe_intermediate_size, gate_up, down))
        self.grouped = True
        self.gate_up: Int8Weight | Int4Weight | None = None
        self.down: Int8Weight | Int4Weight | None = None

    def use_grouped_mm(self) -> bool:
        return True

    def compiles_with_layer(self) -> bool:
        # int4 runs as one custom operator; int8 loops over fbgemm's packed weights in Python
        return self.bits == 4

    def _pairs(self, part: str):
        """Per expert, (values, scale) of gate|up stacked by rows (the fused layout) or of down."""
        for e in range(self.num_experts):
            child = self._modules[str(e)]
            if part == "down":
                yield child.down_proj.ct_values()
            else:
                (ug, sg), (uu, su) = child.gate_proj.ct_values(), child.up_proj.ct_values()
                yield torch.cat((ug, uu)), torch.cat((sg, su))

    def pack_for_kernels(self) -> None:
        if self.gate_up is not None:
            return
        build = (lambda pairs: Int8Weight(pairs)) if self.bits == 8 else (lambda pairs: Int4Weight(self.num_experts, pairs))
        self.gate_up, self.down = build(self._pairs("gate_up")), build(self._pairs("down"))
        for e in range(self.num_experts):
            del self._modules[str(e)]

    def _grouped(self, xs: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
        """xs (T*k, H) sorted by expert, sorted_ids (T*k,) -> (T*k, H)."""
        experts = torch.arange(self.num_experts, device=xs.device, dtype=sorted_ids.dtype)
        ends = torch.searchsorted(sorted_ids, experts, right=True)                       # chunk ends
        gate, up = self.gate_up.grouped_mm(xs, ends).chunk(2, dim=-1)
        return self.down.grouped_mm(gelu_tanh(gate) * up, ends)

    def _looped(self, xs: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        return self._grouped(xs, torch.sort(flat).values)
