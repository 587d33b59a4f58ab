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
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import FULL, ModelConfig
from .attention import AttnContext, additive_mask, same_image


class SlotCache:
    def __init__(self, config: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype, device):
        self.num_slots, self.max_len = num_slots, max_len
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for layer in range(config.num_hidden_layers):
            shape = (num_slots, max_len, config.layer_kv_heads(layer), config.layer_head_dim(layer))
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Share a computed prefix: K/V of positions [0, length) from slot src into slot dst."""
        for k, v in zip(self.k, self.v):
            k[dst, :length] = k[src, :length]
            v[dst, :length] = v[src, :length]

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
