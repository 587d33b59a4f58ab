"""Sources of the random draws a denoising loop makes: canvas init, sampling, renoising.

- `TorchNoise`: torch's RNG in transformers' exact call order (randint per canvas; multinomial then
  randint per step), for token parity with transformers under `torch.manual_seed`.
- `HashNoise`: counter-based draws, a pure function of (request seed, canvas, step, position). A
  row's draws do not depend on what else is in the batch, which is what lets the engine batch
  requests and still give each seed the same text. Sampling is inverse-CDF with one uniform per
  position (no `[C x V]` exponential noise, unlike `torch.multinomial`).
Both expose `init_canvas`, `sample`, `renoise` with the reference's call order.
"""
from __future__ import annotations

import math

import torch

MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


M1, M2, GOLDEN = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(0x9E3779B97F4A7C15)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    return (x >> k) & ((1 << (64 - k)) - 1)    # logical shift on int64 (torch's >> is arithmetic)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping multiply)."""
    x = x ^ _shr(x, 30)
    x = x * M1
    x = x ^ _shr(x, 27)
    x = x * M2
    return x ^ _shr(x, 31)


INIT, SAMPLE, RENOISE = 0, 1, 2


def hash_bits(seeds: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, kind: int, length: int) -> torch.Tensor:
    """(R,) seeds / canvas indices / steps -> (R, length) pseudo-random int64, one per position."""
    stream = (canvas * 4096 + step) * 4 + kind                                  # (R,)
    base = mix64(mix64(seeds * GOLDEN + 1) ^ mix64(stream + GOLDEN))            # (R,)
    pos = torch.arange(length, device=seeds.device, dtype=torch.int64)
    return mix64(base[:, None] + pos[None, :] * GOLDEN)


def hash_tokens(seeds, canvas, step, kind: int, length: int, vocab: int) -> torch.Tensor:
    return _shr(hash_bits(seeds, canvas, step, kind, length), 1) % vocab


def hash_uniform(seeds, canvas, step, length: int) -> torch.Tensor:
    """(R, length) float32 uniforms in [0, 1) with 24 random bits."""
    return _shr(hash_bits(seeds, canvas, step, SAMPLE, length), 40).float() * (1.0 / (1 << 24))


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """probs (R, C, V) rows summing to ~1, u (R, C) -> ids (R, C): the first index whose cumulative
    probability exceeds u * total. Two levels, because one cumsum over V is a slow sequential scan:
    block sums (one vectorised pass), a cumsum over V / block of them to find the block, then a
    cumsum inside that block only. Vocabularies that no block of >= 16 divides use the flat scan."""
    r, c, v = probs.shape
    block = math.gcd(v, block)
    if block < 16:
        cdf = torch.cumsum(probs, dim=-1)
        target = (u * cdf[..., -1]).unsqueeze(-1)
        return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=v - 1)
    blocks = probs.view(r, c, v // block, block)
    b, target, before = locate_block(blocks.sum(-1), u)                         # (R, C, 1) each
    inner = blocks.gather(2, b[..., None].expand(r, c, 1, block)).squeeze(2)    # (R, C, block)
    return (b * block + locate_in_block(inner, target, before)).squeeze(-1)


def locate_block(sums: torch.Tensor, u: torch.Tensor):
    """Block sums (..., nb), u (...) -> (block b, target u * total, mass before block b), each (..., 1):
    the block holding the first index whose cumulative mass exceeds the target."""
    cdf = torch.cumsum(sums, dim=-1)
    target = (u * cdf[..., -1]).unsqueeze(-1)
    b = torch.searchsorted(cdf, target, right=True).clamp_(max=sums.shape[-1] - 1)
    return b, target, cdf.gather(-1, b) - sums.gather(-1, b)


def locate_in_block(inner: torch.Tensor, target: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """inner (..., block) masses of the chosen block -> (..., 1) index inside it of the first token
    whose cumulative mass (from `before`) exceeds `target`."""
    block = inner.shape[-1]
    j = torch.searchsorted(torch.cumsum(inner, dim=-1) + before, target, right=True)
    # rounding can leave the block's last cumulative value <= target: take its last non-zero token
    last = block - 1 - (inner > 0).flip(-1).to(torch.int8).argmax(-1, keepdim=True)
    return torch.where(j >= block, last, j)


class TorchNoise:
    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def init_canvas(self, batch: int, length: int, vocab: int, device) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, length), device=device, generator=self.generator)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        b, c, v = probs.shape
        return torch.multinomial(probs.reshape(b * c, v), 1, generator=self.generator).view(b, c)

    def renoise(self, batch: int, length: int, vocab: int, device) -> torch.Tensor:
        return self.init_canvas(batch, length, vocab, device)


class HashNoise:
    """Per-row seeded draws; counts canvases and steps itself in the reference's call order."""

    def __init__(self, seeds: list[int], device="cpu"):
        self.seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
        self.canvas, self.step = -1, 0

    def _counters(self):
        n = self.seeds.shape[0]
        return (torch.full((n,), self.canvas, dtype=torch.int64, device=self.seeds.device),
                torch.full((n,), self.step, dtype=torch.int64, device=self.seeds.device))

    def init_canvas(self, batch: int, length: int, vocab: int, device) -> torch.Tensor:
        self.canvas, self.step = self.canvas + 1, 0
        return hash_tokens(self.seeds, *self._counters(), INIT, length, vocab).to(device)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        u = hash_uniform(self.seeds, *self._counters(), probs.shape[1]).to(probs.device)
        return inverse_cdf_sample(probs, u)

    def renoise(self, batch: int, length: int, vocab: int, device) -> torch.Tensor:
        out = hash_tokens(self.seeds, *self._counters(), RENOISE, length, vocab).to(device)
        self.step += 1
        return out
