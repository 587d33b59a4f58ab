"""Slot-based KV storage and the attention contexts that let rows of one batch live in different slots.

Used by the engine: each request owns a slot; rows of a batch have their own context lengths.
Contract:
- `SlotCache.k[l]`, `.v[l]`: (num_slots, max_len, n_kv_l, D_l), preallocated, written by index.
  (Position-major so that (slot, position) advanced indexing writes a whole (n_kv, D) block.)
- `SlotEncodeContext`: rows write their new tokens at `starts[r] + arange(S)` in `slots[r]` and
  attend causally (sliding layers: window W) over their own slot, except that with `image_blocks`
  the new tokens of one image see each other. No padding inside a row; an image is never split
  across two calls.
- `SlotDecodeContext`: rows' canvases attend to their own slot's first `lengths[r]` positions
  (sliding layers: the last W - 1 of them) plus the whole canvas. Read-only.
`span` (a Python int, known to the scheduler) bounds the keys gathered: max over rows of the
context length (+ new tokens), so the gather is (R, span) and never depends on a host sync.
Long contexts (`ring_length`): once `max_len` is at least `RING_MIN_LEN` and 4x the ring, sliding
layers keep only a ring of their last `W - 1 + C` positions (position p at index p % ring) instead
of `max_len` (at 32k positions and W = 1024 that is 25x less memory for those layers). Their keys
are then gathered by position, the W - 1 before each row's new tokens (fixed shape), and written
after; full layers are unchanged. A ring forgets positions older than that, so reusing a slot's
prefix is exact only while the slot holds at most C tokens past it (`SlotAllocator.ring_slack`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import FULL, ModelConfig
from .attention import AttnContext, additive_mask, same_image

RING_MIN_LEN = 8192         # contexts allowed this long (or more) keep sliding layers in a ring


def ring_length(config: ModelConfig, max_len: int) -> int | None:
    """Positions a sliding layer's ring holds for a cache of `max_len` positions, or None (no ring)."""
    ring = config.sliding_window - 1 + config.canvas_length
    has_sliding = any(kind != FULL for kind in config.layer_types)
    return ring if has_sliding and max_len >= max(RING_MIN_LEN, 4 * ring) else None


class SlotCache:
    def __init__(self, config: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype, device):
        self.num_slots, self.max_len = num_slots, max_len
        self.ring = ring_length(config, max_len)
        self.in_ring = [self.ring is not None and kind != FULL for kind in config.layer_types]
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for layer in range(config.num_hidden_layers):
            length = self.ring if self.in_ring[layer] else max_len
            shape = (num_slots, length, config.layer_kv_heads(layer), config.layer_head_dim(layer))
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Share a computed prefix: K/V of positions [0, length) from slot src into slot dst (a ring
        is copied whole: positions past `length` in it are overwritten before they are read)."""
        for k, v, ring in zip(self.k, self.v, self.in_ring):
            end = k.shape[1] if ring else length
            k[dst, :end] = k[src, :end]
            v[dst, :end] = v[src, :end]

    def ring_gather(self, layer: int, slots: torch.Tensor, positions: torch.Tensor):
        """K and V at absolute `positions` (R, P) of a ring layer -> (R, n_kv, P, D) each (negative
        positions give stale entries: the caller masks them)."""
        idx = positions.remainder(self.ring)
        return (self.k[layer][slots[:, None], idx].transpose(1, 2),
                self.v[layer][slots[:, None], idx].transpose(1, 2))

    def ring_write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v (R, n_kv, S, D) at `positions` (R, S); only the last `ring` of them can be kept."""
        keep = min(positions.shape[1], self.ring)
        idx = positions[:, -keep:].remainder(self.ring)
        self.k[layer][slots[:, None], idx] = k[:, :, -keep:].transpose(1, 2)
        self.v[layer][slots[:, None], idx] = v[:, :, -keep:].transpose(1, 2)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def _gather(cache_t: torch.Tensor, slots: torch.Tensor, span: int) -> torch.Tensor:
    """(num_slots, max_len, n_kv, D) -> (R, n_kv, span, D) for the rows' slots."""
    return cache_t[slots, :span].transpose(1, 2)


@dataclass
class SlotEncodeContext(AttnContext):
    cache: SlotCache
    slots: torch.Tensor       # (R,) long
    starts: torch.Tensor      # (R,) long: first new position per row
    new_len: int              # S new tokens per row
    span: int                 # >= max(starts) + S
    window: int
    dtype: torch.dtype
    image_blocks: torch.Tensor | None = None     # (R, S) image run ids of the new tokens, -1 = text
    _masks: dict = field(default_factory=dict)

    def keys_values(self, layer, kind, k, v):
        pos = self.starts[:, None] + torch.arange(self.new_len, device=k.device)     # (R, S)
        if self.cache.in_ring[layer]:
            return self._ring_keys_values(layer, pos, k, v)
        self.cache.k[layer][self.slots[:, None], pos] = k.transpose(1, 2)
        self.cache.v[layer][self.slots[:, None], pos] = v.transpose(1, 2)
        k_all = _gather(self.cache.k[layer], self.slots, self.span)
        v_all = _gather(self.cache.v[layer], self.slots, self.span)
        return k_all, v_all, self._mask(kind, pos)

    def _mask(self, kind: str, pos: torch.Tensor) -> torch.Tensor:
        if kind not in self._masks:
            keys = torch.arange(self.span, device=pos.device)[None, None, :]          # (1, 1, K)
            q = pos[:, :, None]                                                        # (R, S, 1)
            allowed = keys <= q
            if kind != FULL:
                allowed = allowed & (keys > q - self.window)
            if self.image_blocks is not None:
                allowed = allowed | same_image(self.image_blocks, pos, 0, self.span)
            self._masks[kind] = additive_mask(allowed[:, None], self.dtype)            # (R, 1, S, K)
        return self._masks[kind]

    def _ring_keys_values(self, layer, pos, k, v):
        """Sliding layer kept in a ring: keys = the W - 1 positions before each row's new tokens,
        read before the new ones are written, then the new tokens themselves."""
        old = self.starts[:, None] + torch.arange(1 - self.window, 0, device=k.device)   # (R, W-1)
        k_old, v_old = self.cache.ring_gather(layer, self.slots, old)
        self.cache.ring_write(layer, self.slots, pos, k, v)
        if "ring" not in self._masks:
            keys = torch.cat((old, pos), dim=1)[:, None, :]                           # (R, 1, W-1+S)
            q = pos[:, :, None]                                                        # (R, S, 1)
            allowed = (keys <= q) & (keys > q - self.window) & (keys >= 0)
            if self.image_blocks is not None:            # an image never spans two calls: only new keys
                b = self.image_blocks
                same = (b[:, :, None] >= 0) & (b[:, :, None] == b[:, None, :])         # (R, S, S)
                allowed = allowed | torch.cat((torch.zeros_like(allowed[:, :, :old.shape[1]]), same), dim=2)
            self._masks["ring"] = additive_mask(allowed[:, None], self.dtype)          # (R, 1, S, W-1+S)
        return torch.cat((k_old, k), dim=2), torch.cat((v_old, v), dim=2), self._masks["ring"]


@dataclass
class SlotDecodeContext(AttnContext):
    cache: SlotCache
    slots: torch.Tensor       # (R,) long
    lengths: torch.Tensor     # (R,) long: committed context length per row
    span: int                 # >= max(lengths)
    window: int
    dtype: torch.dtype
    _masks: dict = field(default_factory=dict)

    def keys_values(self, layer, kind, k, v):
        if self.cache.in_ring[layer]:
            old = self.lengths[:, None] + torch.arange(1 - self.window, 0, device=k.device)   # (R, W-1)
            k_old, v_old = self.cache.ring_gather(layer, self.slots, old)
            if "ring" not in self._masks:
                ok = torch.cat((old >= 0, torch.ones(old.shape[0], k.shape[2], dtype=torch.bool, device=k.device)), 1)
                self._masks["ring"] = additive_mask(ok[:, None, None, :], self.dtype)   # (R, 1, 1, W-1+C)
            return torch.cat((k_old, k), dim=2), torch.cat((v_old, v), dim=2), self._masks["ring"]
        k_all = torch.cat((_gather(self.cache.k[layer], self.slots, self.span), k), dim=2)
        v_all = torch.cat((_gather(self.cache.v[layer], self.slots, self.span), v), dim=2)
        return k_all, v_all, self._mask(kind, k.shape[2])

    def _mask(self, kind: str, canvas: int) -> torch.Tensor:
        if kind not in self._masks:
            keys = torch.arange(self.span, device=self.lengths.device)[None, :]        # (1, K)
            n = self.lengths[:, None]
            ctx_ok = keys < n
            if kind != FULL:
                ctx_ok = ctx_ok & (keys >= n - (self.window - 1))
            canvas_ok = torch.ones(ctx_ok.shape[0], canvas, dtype=torch.bool, device=ctx_ok.device)
            allowed = torch.cat((ctx_ok, canvas_ok), dim=1)[:, None, None, :]          # (R, 1, 1, K + C)
            self._masks[kind] = additive_mask(allowed, self.dtype)
        return self._masks[kind]
