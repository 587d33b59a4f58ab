"""Attention for DiffusionGemma layers, and the contexts that say which keys each query may see.

One attention module serves three modes; the *context* object decides the keys and the mask:
- `EncodeContext`: causal (plus the sliding window on sliding layers); writes K/V into a `KVCache`.
  Used for prompt prefill and canvas commit. With `image_blocks`, the tokens of one image also see
  each other (the whole image, later tokens included), as the reference's generate() does when the
  config sets `use_bidirectional_attention: "vision"`; the window does not cut an image short.
- `DecodeContext`: the canvas attends bidirectionally to itself and to the cached context; sliding
  layers see only the last `W - 1` cached tokens (transformers' eager/sdpa semantics).
  It never writes the cache.
- `DenseContext`: explicit per-layer-type masks over the current tokens (training).
Masks are additive (0 or dtype-min), as in the reference's eager path, so a fully masked row (a
left-pad query) gives a uniform softmax instead of NaN.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FULL, ModelConfig
from .cache import KVCache
from .layers import RMSNorm, apply_rope


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (…, Q, K) -> 0 where allowed, finfo(dtype).min elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def image_blocks(is_image: torch.Tensor) -> torch.Tensor:
    """(B, S) bool -> (B, S) long: each maximal run of image tokens in a row gets its own id 0, 1, ...;
    text tokens get -1."""
    before = F.pad(is_image[:, :-1], (1, 0), value=False)
    starts = (is_image & ~before).long()
    return torch.where(is_image, starts.cumsum(1) - 1, -1)


def same_image(blocks: torch.Tensor, positions: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Query/key pairs inside one image: blocks (B, S) of new tokens at absolute `positions` (B or 1, S),
    keys at absolute positions [lo, hi) -> (B, S, hi - lo) bool. Keys that are not new tokens are text."""
    key_blocks = torch.full((blocks.shape[0], hi), -1, dtype=blocks.dtype, device=blocks.device)
    key_blocks = key_blocks.scatter(1, positions.expand_as(blocks), blocks)[:, lo:]
    q = blocks[:, :, None]
    return (q >= 0) & (q == key_blocks[:, None, :])


class AttnContext:
    """Interface: `keys_values(layer, kind, k, v) -> (k_all, v_all, additive mask or None)`.
    k, v: (B, n_kv, S, D) for the current tokens."""

    def keys_values(self, layer: int, kind: str, k: torch.Tensor, v: torch.Tensor):
        raise NotImplementedError


@dataclass
class EncodeContext(AttnContext):
    """Causal attention over [cache[:start] ; new tokens]; writes new K/V at [start, start + S)."""

    cache: KVCache
    start: int
    length: int
    window: int
    dtype: torch.dtype
    image_blocks: torch.Tensor | None = None      # (B, S) from `image_blocks`, or None: all causal
    _masks: dict = field(default_factory=dict)

    def keys_values(self, layer, kind, k, v):
        end = self.start + self.length
        self.cache.write(layer, self.start, k, v)
        lo = 0 if kind == FULL else max(0, self.start - (self.window - 1))
        return self.cache.k[layer][:, :, lo:end], self.cache.v[layer][:, :, lo:end], self._mask(kind, lo, end)

    def _mask(self, kind: str, lo: int, end: int) -> torch.Tensor:
        if kind not in self._masks:
            dev = self.cache.valid.device
            q = torch.arange(self.start, end, device=dev)[:, None]      # absolute query positions
            kpos = torch.arange(lo, end, device=dev)[None, :]           # absolute key positions
            allowed = kpos <= q
            if kind != FULL:
                allowed = allowed & (kpos > q - self.window)
            allowed = allowed[None]
            if self.image_blocks is not None:
                allowed = allowed | same_image(self.image_blocks, q.T, lo, end)
            allowed = allowed & self.cache.valid[:, None, lo:end]          # (B, Q, K)
            self._masks[kind] = additive_mask(allowed[:, None], self.dtype)
        return self._masks[kind]


@dataclass
class DecodeContext(AttnContext):
    """Bidirectional canvas attention over the cached context; read-only on the cache."""

    cache: KVCache
    window: int
    dtype: torch.dtype
    _masks: dict = field(default_factory=dict)

    def keys_values(self, layer, kind, k, v):
        ctx = self.cache.length
        lo = 0 if kind == FULL else max(0, ctx - (self.window - 1))
        k_all = torch.cat((self.cache.k[layer][:, :, lo:ctx], k), dim=2)
        v_all = torch.cat((self.cache.v[layer][:, :, lo:ctx], v), dim=2)
        return k_all, v_all, self._mask(kind, lo, ctx, k.shape[2])

    def _mask(self, kind: str, lo: int, ctx: int, canvas: int) -> torch.Tensor | None:
        if kind not in self._masks:
            valid = self.cache.valid[:, lo:ctx]
            if bool(valid.all()):
                self._masks[kind] = None       # no padding: nothing to mask
            else:
                ones = torch.ones(valid.shape[0], canvas, dtype=torch.bool, device=valid.device)
                allowed = torch.cat((valid, ones), dim=1)[:, None, None, :]   # (B, 1, 1, K)
                self._masks[kind] = additive_mask(allowed, self.dtype)
        return self._masks[kind]


@dataclass
class DenseContext(AttnContext):
    """Given additive masks per layer type over the current tokens, (B or 1, 1, S, S)."""

    masks: dict[str, torch.Tensor]

    def keys_values(self, layer, kind, k, v):
        return k, v, self.masks[kind]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, impl: str) -> torch.Tensor:
    """q (B, Hq, S, D), k/v (B, Hkv, L, D) -> (B, Hq, S, D). Scale is 1.0: q/k norms replace 1/sqrt(D)."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:   # KV head g serves query heads g*rep .. g*rep+rep-1
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3))
    if mask is not None:
        scores = scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class Attention(nn.Module):
    """GQA attention with q/k/v RMSNorms. Full layers have no v_proj: V is the weight-free norm of
    the raw K projection (before k_norm and RoPE)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.kind = config.layer_types[layer]
        self.n_heads, self.n_kv = config.num_attention_heads, config.layer_kv_heads(layer)
        self.head_dim = config.layer_head_dim(layer)
        h, d, eps = config.hidden_size, self.head_dim, config.rms_norm_eps
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=False) if self.kind != FULL else None
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, eps)
        self.k_norm = RMSNorm(d, eps)
        self.v_norm = RMSNorm(d, eps, with_scale=False)
        self.impl = "eager"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        k, v, mask = ctx.keys_values(self.layer, self.kind, k, v)
        out = attend(q, k, v, mask, self.impl)                          # (B, Hq, S, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, S, H) -> q (B, Hq, S, D), k and v (B, n_kv, S, D), normed and rotated; free of the
        context (the engine compiles it)."""
        b, s, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(b, s, self.n_heads, self.head_dim)), cos, sin)
        k_raw = self.k_proj(x).view(b, s, self.n_kv, self.head_dim)
        v_raw = self.v_proj(x).view(b, s, self.n_kv, self.head_dim) if self.v_proj is not None else k_raw
        k = apply_rope(self.k_norm(k_raw), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), self.v_norm(v_raw).transpose(1, 2)
