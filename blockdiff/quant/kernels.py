"""Low-bit matmul kernels on the weights of one linear or of a stack of experts.

Contract: an `Int8Weight` / `Int4Weight` is built once from compressed-tensors values (quantized
integers and scales, see `scheme.py`) and then computes `x @ (q * scale).T` for x (M, K) in any
float dtype, returning (M, N) in x's dtype. `grouped_mm(x, ends)` does the same for a stack of E
weights, rows of x sorted by expert with expert e owning rows [ends[e-1], ends[e]) (as the experts'
routing produces them): one call, fixed output shape, no host sync in the caller's graph.

Kernels (CPU, torch's own builds):
- int8 x int8 (w8a8): fbgemm's dynamic linear on per-channel int8 weights. Its activations are
  quantized over the whole input's range, so each row is divided by its absmax first (and the range
  pinned to [-1, 1]) and the output multiplied back: per-token quantization, independent of the
  batch. Without VNNI fbgemm's 8-bit pair products can saturate int16, so there activations keep 7
  bits (`reduce_range`).
- int4 weight-only (w4a16): `_weight_int4pack_mm_for_cpu`, fast with bf16 activations only, so x is
  cast to bf16 around it; compressed-tensors' stored nibbles (q + 8) pass through unchanged with
  zero = 0. Needs N % 16 == 0 and a group size of 32/64/128/256.
Elsewhere (other devices, shapes the kernels reject) the weight is dequantized per call: correct, and
slow; `kernel` names the path taken.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..hardware import has_vnni
from .scheme import dequantize_weight

ATEN = torch.ops.aten


def _cpu_int8_ok(device: torch.device) -> bool:
    return device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines


def _prepack_int8(q: torch.Tensor, scale: torch.Tensor):
    """q (N, K) int8, scale (N,) -> fbgemm packed weight (a ScriptObject)."""
    zeros = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # quantized-tensor creation is marked deprecated
        wq = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(wq, None)


class Int8Weight:
    """E >= 1 int8 weights (N, K) with per-channel scales; activations quantized per token.
    `weights` yields (q (N, K) int8, scale (N, 1)) per expert and is consumed one at a time."""

    def __init__(self, weights):
        weights = iter(weights)
        q, s = next(weights)
        self.n, self.device = q.shape[0], q.device
        if _cpu_int8_ok(self.device):
            self.kernel = "fbgemm-int8"
            self.packed = [_prepack_int8(q, s.reshape(-1).float())]
            self.packed += [_prepack_int8(q, s.reshape(-1).float()) for q, s in weights]
            self.reduce_range = not has_vnni()
        else:
            self.kernel = "dequantize"
            pairs = [(q, s)] + list(weights)
            self.q, self.scale = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped_mm(x, None)

    def grouped_mm(self, x: torch.Tensor, ends: torch.Tensor | None) -> torch.Tensor:
        if self.kernel == "dequantize":
            return _dequantized_mm(x, ends, self.n, lambda e: dequantize_weight(self.q[e], self.scale[e].to(x.dtype)))
        dtype = x.dtype
        x = x.float()
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-30)         # (M, 1) per-token absmax
        xs = x / s
        if ends is None:
            out = self._linear(xs, 0)
        else:
            out = _chunked(xs, ends, self.n, lambda e, rows: self._linear(rows, e))
        return (out * s).to(dtype)

    def _linear(self, rows: torch.Tensor, e: int) -> torch.Tensor:
        """rows (M, K) each within [-1, 1] -> (M, N). fbgemm quantizes over the min/max of the whole
        input; one anchor row holding -1 and +1 fixes that range to [-1, 1] on every call, so a row's
        result never depends on the other rows in the batch."""
        anchor = torch.zeros(1, rows.shape[1], dtype=rows.dtype)
        anchor[0, 0], anchor[0, -1] = 1.0, -1.0
        out = torch.ops.quantized.linear_dynamic(torch.cat((rows, anchor)), self.packed[e], self.reduce_range)
        return out[:-1]


class Int4Weight:
    """E int4 weights (N, K) with per-group scales (symmetric, compressed-tensors nibbles).
    `weights` yields (u (N, K) int in [0, 15], scale (N, K/g)) per expert; each is converted to the
    kernel's layout as it comes, so only one expert's unpacked values exist at a time."""

    def __init__(self, num: int, weights):
        for e, (u, s) in enumerate(weights):
            if e == 0:
                (n, k), g = u.shape, u.shape[1] // s.shape[-1]
                self.n, self.group, self.device = n, g, u.device
                fast = self.device.type == "cpu" and n % 16 == 0 and g in (32, 64, 128, 256)
                self.kernel = "int4pack-cpu" if fast else "dequantize"
                if fast:
                    self.packed = torch.empty(num, n, k // 2, dtype=torch.uint8)
                    self.scales = torch.empty(num, k // g, n, dtype=torch.bfloat16)       # zeros are all 0
                else:
                    self.q = torch.empty(num, n, k, dtype=torch.int8, device=u.device)
                    self.scale = torch.empty(num, *s.shape, dtype=s.dtype, device=u.device)
            if self.kernel == "int4pack-cpu":
                self.packed[e] = ATEN._convert_weight_to_int4pack_for_cpu(u.to(torch.int32).contiguous(), 2)
                self.scales[e] = s.t()                                # zero = 0: w = (u - 8) * scale
            else:
                self.q[e], self.scale[e] = u.to(torch.int8) - 8, s

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped_mm(x, None)

    def grouped_mm(self, x: torch.Tensor, ends: torch.Tensor | None) -> torch.Tensor:
        if self.kernel == "dequantize":
            return _dequantized_mm(x, ends, self.n, lambda e: dequantize_weight(self.q[e], self.scale[e].to(x.dtype)))
        xb = x.to(torch.bfloat16)
        if ends is None:
            ends = torch.full((1,), x.shape[0], dtype=torch.long)
        return grouped_int4_mm(xb, self.packed, self.scales, ends, self.group).to(x.dtype)


@torch.library.custom_op("blockdiff::grouped_int4_mm", mutates_args=())
def grouped_int4_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, ends: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """x (T, K) bf16 sorted by expert, packed (E, N, K/2), scales (E, K/g, N), ends (E,) -> (T, N).
    One operator to the graph; inside it, each expert's contiguous rows go through the int4 kernel.
    The kernel reads (scale, zero) pairs (K/g, N, 2); the zeros of symmetric int4 are all 0, so one
    expert's pairs are filled in per call instead of stored (that would double the scales' memory)."""
    pairs = x.new_zeros(scales.shape[1], scales.shape[2], 2)

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        pairs[..., 0] = scales[e]
        return ATEN._weight_int4pack_mm_for_cpu(rows, packed[e], group_size, pairs)

    return _chunked(x, ends, scales.shape[2], expert)


@grouped_int4_mm.register_fake
def _(x, packed, scales, ends, group_size):
    return x.new_empty(x.shape[0], scales.shape[2])


def _chunked(x: torch.Tensor, ends: torch.Tensor, n: int, fn) -> torch.Tensor:
    """Apply fn(e, rows) to each expert's rows of x (M, K) -> (M, N). On CPU the chunk ends are plain
    memory reads, not a device sync."""
    out = x.new_empty(x.shape[0], n)
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = fn(e, x[start:end])
        start = end
    return out


def _dequantized_mm(x: torch.Tensor, ends: torch.Tensor | None, n: int, weight) -> torch.Tensor:
    if ends is None:
        return F.linear(x, weight(0))
    return _chunked(x, ends, n, lambda e, rows: F.linear(rows, weight(e)))
