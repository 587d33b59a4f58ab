"""Low-bit matmul kernels on the weights of one linear or of a stack of experts.

Contract: an `Int8Weight` / `Int4Weight` is built once from compressed-tensors values (quantized
integers and scales, see `scheme.py`) and then computes `x @ (q * scale).T` for x (M, K) in any
float dtype, returning (M, N) in x's dtype. `grouped_mm(x, ends)` does the same for a stack of E
weights, rows of x sorted by expert with expert e owning rows [ends[e-1], ends[e]) (as the experts'
routing produces them): one call, fixed output shape, no host sync in the caller's graph.

Kernels (CPU, torch's own builds):
- int8 x int8 (w8a8): fbgemm's linear on per-channel int8 weights with fp32 input and output
  (`linear_with_input_q_dq_qweight_dq_output_fp32`), which quantizes its input with one given scale
  and zero point. Each row is divided by its absmax first, so the input lies in [-1, 1] and one fixed
  scale serves every call, and the output is multiplied back: per-token quantization, independent of
  the batch, with no pass to find the input's range. Without VNNI fbgemm's 8-bit pair products can
  saturate int16, so there activations keep 7 bits (levels 0..128 around the zero point 64: a pair
  of products stays within int16 for any int8 weights).
- int4 weight-only (w4a16): `_weight_int4pack_mm_for_cpu`, fast with bf16 activations only, so x is
  cast to bf16 around it; compressed-tensors' stored nibbles (q + 8) pass through unchanged with
  zero = 0. Needs N % 16 == 0 and a group size of 32/64/128/256.
Kernels (CUDA; the chunk ends of grouped experts are read on the host, one sync per call):
- w8a8: `torch._int_mm` (cuBLASLt int8 x int8 -> int32) on activations quantized per token to 8 bits;
  needs K and N multiples of 8, and more than 16 rows (fewer are padded with zero rows). Experts: one
  `_int_mm` per expert writing its int32 rows in place, then one pass applies every scale.
- w4a16: `_weight_int4pack_mm` (tinygemm) with bf16 activations; the same symmetric nibbles, zero = 0.
  Needs N % 8 == 0, K a multiple of 32 and a group size of 32/64/128/256.
`select_int8_kernel` / `select_int4_kernel` pick the path from the device and the shape; the CUDA int8
path runs on CPU too (torch's own `_int_mm`), which is how it is tested without a GPU.
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


def token_scales(x: torch.Tensor, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (x in fp32, (M, 1) per-token scales absmax / qmax): activations quantized per token."""
    xf = x.float()
    absmax = torch.maximum(xf.amax(-1, keepdim=True), xf.amin(-1, keepdim=True).neg_())   # two reads, no |x| copy
    return xf, absmax.clamp_min_(1e-30) / qmax


def select_int8_kernel(device: torch.device, n: int, k: int) -> str:
    if device.type == "cuda" and n % 8 == 0 and k % 8 == 0:
        return "int-mm"
    return "fbgemm-int8" if _cpu_int8_ok(device) else "dequantize"


def select_int4_kernel(device: torch.device, n: int, k: int, group: int) -> str:
    if group not in (32, 64, 128, 256):
        return "dequantize"
    if device.type == "cpu" and n % 16 == 0:
        return "int4pack-cpu"
    if device.type == "cuda" and n % 8 == 0 and k % 32 == 0:
        return "int4-tinygemm"
    return "dequantize"


class Int8Weight:
    """E >= 1 int8 weights (N, K) with per-channel scales; activations quantized per token.
    `weights` yields (q (N, K) int8, scale (N, 1)) per expert and is consumed one at a time."""

    def __init__(self, weights):
        weights = iter(weights)
        q, s = next(weights)
        (self.n, k), self.device = q.shape, q.device
        self.kernel = select_int8_kernel(self.device, self.n, k)
        if self.kernel == "fbgemm-int8":
            self.packed = [_prepack_int8(q, s.reshape(-1).float())]
            self.packed += [_prepack_int8(q, s.reshape(-1).float()) for q, s in weights]
            levels = 127 if not has_vnni() else 255          # unsigned activation levels: 7 or 8 bits
            self.x_scale, self.x_zero = 2.0 / levels, (levels + 1) // 2   # [-1, 1] onto the levels
        else:
            pairs = [(q, s)] + list(weights)
            self.q, self.scale = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            if self.kernel == "int-mm":
                self.scale = self.scale.reshape(len(pairs), 1, self.n).float()          # (E, 1, N)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped_mm(x, None)

    def grouped_mm(self, x: torch.Tensor, ends: torch.Tensor | None) -> torch.Tensor:
        if self.kernel == "dequantize":
            return _dequantized_mm(x, ends, self.n, lambda e: dequantize_weight(self.q[e], self.scale[e].to(x.dtype)))
        if self.kernel == "int-mm":
            return self._int_mm_grouped(x, ends)
        dtype = x.dtype
        x, s = token_scales(x, 1.0)                                  # s: (M, 1) per-token absmax
        xs = x / s                                                   # every row within [-1, 1]
        if ends is None:
            out = self._linear(0, xs)
        else:
            out = _chunked(xs, ends, self.n, self._linear)
        return out.mul_(s).to(dtype)

    def _linear(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, K) fp32 within [-1, 1] -> (M, N) fp32, before the rows' scales."""
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            rows, self.x_scale, self.x_zero, self.packed[e])

    def _int_mm_grouped(self, x: torch.Tensor, ends: torch.Tensor | None) -> torch.Tensor:
        """Per token: s = absmax / 127, x_q = round(x / s) in int8; out = (x_q @ q.T) * s * scale."""
        xf, s = token_scales(x, 127)
        xq = torch.round(xf / s).to(torch.int8)
        if ends is None:
            return (self._int_mm(0, xq) * s).to(x.dtype)
        acc = self._int_mm_chunks(xq, ends)                              # (M, N) int32
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        scale = torch.repeat_interleave(self.scale[:, 0], counts, dim=0, output_size=xq.shape[0])   # (M, N)
        return (acc.float() * s * scale).to(x.dtype)

    def _int_mm(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, K) int8 -> (M, N) fp32 before the activation scale. cuBLASLt wants > 16 rows."""
        m = rows.shape[0]
        if m <= 16:
            rows = F.pad(rows, (0, 0, 0, 17 - m))
        return torch._int_mm(rows, self.q[e].t())[:m].float() * self.scale[e]

    def _int_mm_chunks(self, xq: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """xq (M, K) int8 sorted by expert -> (M, N) int32, one `_int_mm` per expert writing in place.
        A chunk of 16 rows or fewer runs on 17 rows (cuBLASLt's minimum): 17 zero rows follow the last
        one, and rows past a chunk's end belong to later experts, whose own calls overwrite them."""
        m = xq.shape[0]
        xq = F.pad(xq, (0, 0, 0, 17))
        acc = torch.empty(m + 17, self.n, dtype=torch.int32, device=xq.device)
        start = 0
        for e, end in enumerate(ends.tolist()):                        # experts in order: later chunks win
            if end > start:
                stop = max(end, start + 17)
                torch._int_mm(xq[start:stop], self.q[e].t(), out=acc[start:stop])
            start = end
        return acc[:m]


class Int4Weight:
    """E int4 weights (N, K) with per-group scales (symmetric, compressed-tensors nibbles).
    `weights` yields (u (N, K) int in [0, 15], scale (N, K/g)) per expert; each is converted to the
    kernel's layout as it comes, so only one expert's unpacked values exist at a time."""

    def __init__(self, num: int, weights):
        for e, (u, s) in enumerate(weights):
            if e == 0:
                (n, k), g = u.shape, u.shape[1] // s.shape[-1]
                self.n, self.group, self.device = n, g, u.device
                self.kernel = select_int4_kernel(self.device, n, k, g)
                if self.kernel == "int4pack-cpu":
                    self.packed = torch.empty(num, n, k // 2, dtype=torch.uint8)
                    self.scales = torch.empty(num, k // g, n, dtype=torch.bfloat16)       # zeros are all 0
                elif self.kernel == "int4-tinygemm":
                    self.packed = []
                    self.pairs = torch.zeros(num, k // g, n, 2, dtype=torch.bfloat16, device=u.device)
                    self.inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
                else:
                    self.q = torch.empty(num, n, k, dtype=torch.int8, device=u.device)
                    self.scale = torch.empty(num, *s.shape, dtype=s.dtype, device=u.device)
            if self.kernel == "int4pack-cpu":
                self.packed[e] = ATEN._convert_weight_to_int4pack_for_cpu(u.to(torch.int32).contiguous(), 2)
                self.scales[e] = s.t()                                # zero = 0: w = (u - 8) * scale
            elif self.kernel == "int4-tinygemm":
                u8 = (u[:, ::2].to(torch.uint8) << 4) | u[:, 1::2].to(torch.uint8)          # (N, K/2), even k high
                self.packed.append(ATEN._convert_weight_to_int4pack(u8.contiguous(), self.inner_k_tiles))
                self.pairs[e, ..., 0] = s.t()                          # zero = 0: w = (u - 8) * scale
            else:
                self.q[e], self.scale[e] = u.to(torch.int8) - 8, s

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped_mm(x, None)

    def grouped_mm(self, x: torch.Tensor, ends: torch.Tensor | None) -> torch.Tensor:
        if self.kernel == "dequantize":
            return _dequantized_mm(x, ends, self.n, lambda e: dequantize_weight(self.q[e], self.scale[e].to(x.dtype)))
        xb = x.to(torch.bfloat16)
        if self.kernel == "int4-tinygemm":
            def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
                return ATEN._weight_int4pack_mm(rows, self.packed[e], self.group, self.pairs[e])
            out = expert(0, xb) if ends is None else _chunked(xb, ends, self.n, expert)
            return out.to(x.dtype)
        if ends is None:
            ends = torch.full((1,), x.shape[0], dtype=torch.long)
        return grouped_int4_mm(xb, self.packed, self.scales, ends, self.group).to(x.dtype)


def select_fp8_kernel(device: torch.device, n: int, k: int) -> str:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and n % 16 == 0 and k % 16 == 0:
        return "scaled-mm-fp8"
    return "dequantize"


class Fp8Weight:
    """A float8_e4m3fn weight (N, K) with a per-channel (N, 1) or per-tensor (1,) scale. On CUDA with
    fp8 tensor cores (sm89+) activations are quantized per token to fp8 and `torch._scaled_mm` runs
    with row-wise scales; elsewhere the weight is dequantized once, to `dtype`."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        (self.n, k), self.device = q.shape, q.device
        self.kernel = select_fp8_kernel(self.device, self.n, k)
        if self.kernel == "scaled-mm-fp8":
            self.q, self.scale = q, scale.float().reshape(1, -1).expand(1, self.n).contiguous()    # (1, N)
        else:
            self.dense = (q.float() * scale.float()).to(dtype)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> (M, N) in x's dtype."""
        if self.kernel == "dequantize":
            return F.linear(x, self.dense.to(x.dtype))
        xf, s = token_scales(x, torch.finfo(torch.float8_e4m3fn).max)
        xq = (xf / s).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(xq, self.q.t(), scale_a=s, scale_b=self.scale, out_dtype=torch.bfloat16)
        return out.to(x.dtype)


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


def _chunked(x: torch.Tensor, ends: torch.Tensor, n: int, fn, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Apply fn(e, rows) to each expert's rows of x (M, K) -> (M, N) in `dtype` (default x's). On CPU
    the chunk ends are plain memory reads; on CUDA reading them is one device sync per call."""
    out = x.new_empty(x.shape[0], n, dtype=dtype or x.dtype)
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
