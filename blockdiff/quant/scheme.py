"""Quantization schemes and the arithmetic of the compressed-tensors integer formats.

Contract:
- A `Scheme` says how the model's linears and its experts are stored: `WeightArgs` (bits, group
  size, whether activations are quantized at run time) or None (kept in the checkpoint dtype). The
  router is never touched; the embedding / tied LM head stays in its dtype unless the scheme is
  taken `with_embedding("int8")` (int8 per token row, weight-only).
- Weights are quantized symmetrically, as compressed-tensors does: `scale = absmax / 127.5` (int8) or
  `absmax / 7.5` (int4) per output channel or per group of `group_size` inputs, rounded to the
  weight's dtype first, then `q = clamp(round(w / scale))` (round half to even), and the weight is
  read back as `q * scale`. A zero row gets scale 1 (its values are all 0).
- int4 values are packed into int32 words along K, element k in nibble `k % 8` of word `k // 8`,
  stored as `q + 8` (low nibble first); rows are padded to a multiple of 8 values. Weight-only int8
  is packed the same way (compressed-tensors' `pack-quantized`): `q + 128`, byte `k % 4` of word
  `k // 4`, which is the little-endian bytes of the words read as uint8.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

GROUPS = (128, 64, 32)          # preferred group sizes for int4, largest first


@dataclass(frozen=True)
class WeightArgs:
    """How one weight matrix is stored. `group_size` None = one scale per output channel.
    `dynamic_activations`: inputs are quantized to int8 per token at run time (w8a8)."""

    bits: int
    group_size: int | None = None
    dynamic_activations: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"only 4- and 8-bit integer weights are supported, got {self.bits} bits")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    def for_input_size(self, k: int, name: str) -> "WeightArgs":
        """These args with a group size that divides `k` (int4 only); ValueError naming `name` if none does."""
        if self.bits == 8 or (self.group_size is not None and k % self.group_size == 0):
            return self
        for g in GROUPS:
            if k % g == 0 and (self.group_size is None or g <= self.group_size):
                return WeightArgs(self.bits, g, self.dynamic_activations)
        raise ValueError(f"tensor '{name}': no int4 group size in {list(GROUPS)} divides its input size {k}")


INT8_A8 = WeightArgs(8, None, True)
INT8 = WeightArgs(8)                     # weight-only (the embedding)
INT4 = WeightArgs(4, 128)
EMBEDDINGS = {"bf16": None, "int8": INT8}


@dataclass(frozen=True)
class Scheme:
    """Storage of the model's linears (attention, dense MLP, self-conditioning MLP) and experts."""

    name: str
    linears: WeightArgs | None
    experts: WeightArgs | None
    description: str
    embedding: WeightArgs | None = None

    def with_embedding(self, kind: str) -> "Scheme":
        """This scheme with the embedding (tied LM head) kept as `kind`: 'bf16' (its stored dtype) or 'int8'."""
        if kind not in EMBEDDINGS:
            raise ValueError(f"unknown embedding storage {kind!r}; choose one of {', '.join(EMBEDDINGS)}")
        return replace(self, embedding=EMBEDDINGS[kind])


SCHEMES = {s.name: s for s in (
    Scheme("w8a8", INT8_A8, INT8_A8, "int8 weights per output channel, int8 activations per token at run time"),
    Scheme("w4a16", INT4, INT4, "int4 weights in groups (128, or the largest of 64/32 that divides K), "
                                "activations in the model dtype"),
    Scheme("w4a16-experts", INT8_A8, INT4, "experts int4 in groups, every other linear w8a8"),
)}


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def quantize_weight(w: torch.Tensor, args: WeightArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> q (N, K) int8 in the args' range, scale (N, G) in w.dtype (G = 1 per channel)."""
    n, k = w.shape
    group = args.group_size or k
    if k % group:
        raise ValueError(f"group size {group} does not divide input size {k}")
    half = 127.5 if args.bits == 8 else 7.5
    lo, hi = -(2 ** (args.bits - 1)), 2 ** (args.bits - 1) - 1
    wg = w.float().reshape(n, k // group, group)                       # (N, G, g)
    scale = (wg.abs().amax(-1) / half).to(w.dtype)                     # rounded to the weight dtype, as stored
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(wg / scale.float()[..., None]).clamp(lo, hi).to(torch.int8)
    return q.reshape(n, k), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (N, K) int, scale (N, G) -> (N, K) in scale.dtype."""
    n, k = q.shape
    g = scale.shape[-1]
    return (q.reshape(n, g, k // g).to(scale.dtype) * scale[..., None]).reshape(n, k)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) int8 in [-8, 7] -> (N, ceil(K/8)) int32, compressed-tensors' pack-quantized words."""
    n, k = q.shape
    u = (q.to(torch.int64) + 8)
    if k % 8:
        u = torch.nn.functional.pad(u, (0, 8 - k % 8))
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    words = (u.reshape(n, -1, 8) << shifts).sum(-1)                    # 0 .. 2^32-1
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(N, ceil(K/8)) int32 -> u (N, K) int32 in [0, 15] (= q + 8)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], -1)[:, :k]


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) int8 -> (N, ceil(K/4)) int32, compressed-tensors' pack-quantized 8-bit words."""
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    if q.shape[1] % 4:
        u = torch.nn.functional.pad(u, (0, 4 - q.shape[1] % 4))
    return u.contiguous().view(torch.int32)


def unpack_int8(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(N, ceil(K/4)) int32 -> q (N, K) int8."""
    return (packed.contiguous().view(torch.uint8)[:, :k].to(torch.int16) - 128).to(torch.int8)
