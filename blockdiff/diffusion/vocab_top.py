"""Exact top-k / top-p for the streamed step: a threshold per position, found without a sort over V.

The materialised step keeps, per position, the tokens whose processed logit is >= the k-th largest
(top-k, ties kept), then, of those, the shortest prefix of the descending order whose probability
reaches top_p (top-p). Both sets are "every token whose logit is >= a threshold". Here each
threshold is found exactly by a radix select on the logits' order-preserving 32-bit keys: three
passes over the vocabulary (digits of 11, 11 and 10 bits), each a per-position histogram of the
count and mass exp(y - m) of the tokens that share the digits found so far; the first histogram
serves both searches. Top-k then top-p costs five passes, one of them alone three, plus one pass
for the block sums of the kept tokens: the price of the exact set, paid only in steps where a row
asks for it.

Where it differs from the materialised step: masses are summed in another order (float64 here),
which moves the top-p boundary only where it lies within rounding; and at a top-p boundary
falling inside a run of exactly equal logits this keeps the whole run, where the sort keeps
whichever of them its unstable order puts first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .vocab_stream import BLOCK, Head, block_bits

DIGITS = ((21, 11), (10, 11), (0, 10))          # (shift, bits) of the key, most significant first


def sortable_key(y: torch.Tensor) -> torch.Tensor:
    """fp32 -> int64 in [0, 2**32), increasing with y (-0.0 and +0.0 equal)."""
    b = (y + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(b >= 0, b + 2**31, ~b)


def vocab_tiles(head: Head, h: torch.Tensor, temp: torch.Tensor, tile: int):
    """Yields (lo, processed logits (P, n) fp32) per tile, in one reused buffer."""
    v = head.weight.shape[0]
    buf = torch.empty(h.shape[0], tile, device=h.device)
    for lo in range(0, v, tile):
        y = buf[:, :min(tile, v - lo)]
        head.logits_into(y, h, lo, temp)
        yield lo, y


def histogram(head, h, temp, m, tile: int, digit: tuple[int, int], prefix: torch.Tensor):
    """Over each position's tokens whose key digits above `digit` equal `prefix` (P,): the count and
    the float64 mass exp(y - m) of every value of the digit, (P, 2**bits) each."""
    shift, bits = digit
    p, nbins = h.shape[0], 1 << bits
    counts = torch.zeros(p, nbins + 1, dtype=torch.float64, device=h.device)   # last bin: outside the prefix
    mass = torch.zeros(p, nbins + 1, dtype=torch.float64, device=h.device)
    for _, y in vocab_tiles(head, h, temp, tile):
        key = sortable_key(y)
        inside = (key >> (shift + bits)) == prefix[:, None]
        bins = torch.where(inside, (key >> shift) & (nbins - 1), nbins)
        counts.scatter_add_(1, bins, torch.ones_like(y, dtype=torch.float64))
        mass.scatter_add_(1, bins, torch.exp(y - m[:, None]).double())
    return counts[:, :nbins], mass[:, :nbins]


def _above(hist: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum of each row's bins above bin b (P,)."""
    return (hist * (torch.arange(hist.shape[1], device=hist.device) > b[:, None])).sum(-1)


def _select(hist: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The highest bin where the sum from the top bin down, inclusive, reaches r (P,); the lowest
    non-empty bin where none does (r above the total by rounding)."""
    from_top = hist.flip(-1).cumsum(-1)
    reach = from_top >= r[:, None]
    lowest = hist.shape[1] - 1 - (hist.flip(-1) > 0).cumsum(-1).argmax(-1)
    return torch.where(reach.any(-1), hist.shape[1] - 1 - reach.to(torch.int8).argmax(-1), lowest)


def radix_threshold(head, h, temp, m, tile: int, target: torch.Tensor, by_mass: bool, first):
    """The largest key whose tokens at or above it reach `target` (P,) in count (top-k) or mass
    (top-p), and the mass at or above it. `first`: the (counts, mass) of the top digit."""
    prefix = torch.zeros(h.shape[0], dtype=torch.int64, device=h.device)
    r, kept = target.double(), torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
    for level, digit in enumerate(DIGITS):
        counts, mass = first if level == 0 else histogram(head, h, temp, m, tile, digit, prefix)
        hist = mass if by_mass else counts
        b = _select(hist, r)
        r = r - _above(hist, b)
        kept += _above(mass, b)
        prefix = (prefix << digit[1]) | b
    return prefix, kept + mass.gather(1, b[:, None]).squeeze(1)


def top_threshold(head: Head, h, temp, m, tile: int, top_k, top_p, use_k: bool, use_p: bool) -> torch.Tensor:
    """Per position (P,): the key threshold of its top-k / top-p set (0 keeps every token).
    top_k (P,) int64 (0 = off), top_p (P,) fp32 (1 = off)."""
    v = head.weight.shape[0]
    first = histogram(head, h, temp, m, tile, DIGITS[0], torch.zeros_like(top_k))
    tau = torch.zeros_like(top_k)
    total = first[1].sum(-1)                       # the mass top-p is a fraction of: all, or the top-k set
    if use_k:
        k = torch.where(top_k > 0, top_k, v).clamp(max=v)
        tau_k, kept = radix_threshold(head, h, temp, m, tile, k, False, first)
        tau = torch.where(top_k > 0, tau_k, tau)
        total = torch.where(top_k > 0, kept, total)
    if use_p:
        tau_p, _ = radix_threshold(head, h, temp, m, tile, top_p.double() * total, True, first)
        tau = torch.where(top_p < 1, torch.maximum(tau, tau_p), tau)
    return tau


def kept_blocks(head: Head, h, temp, m, tile: int, tau: torch.Tensor):
    """One more pass over the kept tokens (key >= tau (P,)): their block sums of exp(y - m) (P, nb)
    and, per block, a bit mask of which of its 64 tokens are kept (P, nb) int64, so that the
    sampler's recomputed block keeps the very tokens counted here."""
    v, p = head.weight.shape[0], h.shape[0]
    nb = -(-v // BLOCK)
    blocks = torch.zeros(p, nb, device=h.device)
    bits = torch.zeros(p, nb, dtype=torch.int64, device=h.device)
    for lo, y in vocab_tiles(head, h, temp, tile):
        kept = sortable_key(y) >= tau[:, None]
        pad = -y.shape[1] % BLOCK                                      # a partial last block
        e = F.pad(torch.exp(y - m[:, None]) * kept, (0, pad)).view(p, -1, BLOCK)
        at = slice(lo // BLOCK, lo // BLOCK + e.shape[1])
        blocks[:, at] = e.sum(-1)
        bits[:, at] = (F.pad(kept, (0, pad)).view(p, -1, BLOCK) * block_bits(h.device)).sum(-1)    # distinct bits: sum = or
    return blocks, bits
