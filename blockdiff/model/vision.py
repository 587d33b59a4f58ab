"""The Gemma 4 vision tower and the multimodal embedder: patchified images -> prompt soft tokens.

Contract: `VisionTower(pixel_values, positions)` takes what the image processor gives, pixel_values
(B, N, 3p^2) float in [0, 1] and patch positions (B, N, 2) as (x, y) = (column, row) with (-1, -1)
on padding rows, and returns one (sum of soft tokens over images, D) tensor, image-major, every
image's soft tokens in row-major order of its k x k pooling blocks. `MultimodalEmbedder` maps them
to the text width. Numerics follow transformers 5.23.0 (eager), so fp32 agrees to ~1e-6 and bf16
bit for bit:
- no 1/sqrt(hd) attention scale (q/k norms instead); padded keys are masked, padded queries are
  computed and dropped at pooling;
- 2-D RoPE: channels [0, hd/2) rotate with x, [hd/2, hd) with y, each half split as usual; angles in
  fp32 from the unclamped positions, cast to the activation dtype;
- pooling averages in fp32, rounds to the activation dtype, then scales by sqrt(D) and
  standardizes in fp32; the embedder's RMSNorm has no weight and its output is not scaled by sqrt(H).
Module and buffer names equal the checkpoint's (`model.encoder.vision_tower.*`, `...embed_vision.*`).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .attention import additive_mask, attend
from .layers import MLP, RMSNorm, apply_rope

CLIP_BOUNDS = {"input_min": -float("inf"), "input_max": float("inf"),
               "output_min": -float("inf"), "output_max": float("inf")}


class ClippableLinear(nn.Module):
    """A bias-free linear at `.linear`; with `clipped`, input and output are clamped to scalar bounds."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, clipped: bool = False):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.clipped = clipped
        if clipped:
            for name, value in CLIP_BOUNDS.items():
                self.register_buffer(name, torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clipped:
            return self.linear(x)
        x = torch.clamp(x, self.input_min, self.input_max)
        return torch.clamp(self.linear(x), self.output_min, self.output_max)


class PatchEmbedder(nn.Module):
    """Linear patch projection plus learned per-axis position embeddings (zero on padding rows)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size ** 2, config.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, config.position_embedding_size, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        w = self.input_proj.weight
        h = self.input_proj((2 * (pixel_values - 0.5)).to(w.dtype))    # [0, 1] -> [-1, 1] in the pixel dtype
        pos = positions.clamp(min=0)
        table = self.position_embedding_table
        pe = F.embedding(pos[..., 0], table[0]) + F.embedding(pos[..., 1], table[1])
        return h + torch.where(padding[..., None], 0.0, pe)


@functools.cache
def axial_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """hd/4 fp32 frequencies shared by both axes: theta^(-2j / (hd/2))."""
    half = head_dim // 2
    return 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float) / half)


def axial_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions (B, N, 2) -> cos, sin (B, N, 2, 1, hd/2): axis 0 = x, axis 1 = y."""
    angles = positions.float()[..., None] * axial_inv_freq(head_dim, theta).to(positions.device)   # (B, N, 2, hd/4)
    angles = torch.cat((angles, angles), dim=-1)[..., None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, N, H, hd): the first half rotates with x positions, the second with y positions."""
    half = x.shape[-1] // 2
    return torch.cat((apply_rope(x[..., :half], cos[:, :, 0], sin[:, :, 0]),
                      apply_rope(x[..., half:], cos[:, :, 1], sin[:, :, 1])), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d, hd, clip = config.hidden_size, config.head_dim, config.use_clipped_linears
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = ClippableLinear(d, self.n_heads * hd, clipped=clip)
        self.k_proj = ClippableLinear(d, self.n_kv * hd, clipped=clip)
        self.v_proj = ClippableLinear(d, self.n_kv * hd, clipped=clip)
        self.o_proj = ClippableLinear(self.n_heads * hd, d, clipped=clip)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        self.v_norm = RMSNorm(hd, config.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, cos, sin, mask: torch.Tensor, impl: str) -> torch.Tensor:
        b, n, _ = x.shape
        q = apply_axial_rope(self.q_norm(self.q_proj(x).view(b, n, self.n_heads, self.head_dim)), cos, sin)
        k = apply_axial_rope(self.k_norm(self.k_proj(x).view(b, n, self.n_kv, self.head_dim)), cos, sin)
        v = self.v_norm(self.v_proj(x).view(b, n, self.n_kv, self.head_dim))
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, impl)   # (B, H, N, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))


class VisionLayer(nn.Module):
    """Sandwich-normed attention and gated MLP, each added to the residual."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        linear = functools.partial(ClippableLinear, clipped=config.use_clipped_linears)
        self.mlp = MLP(d, config.intermediate_size, linear=linear)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(d, eps))

    def forward(self, h: torch.Tensor, cos, sin, mask: torch.Tensor, impl: str) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask, impl))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class VisionEncoder(nn.Module):
    """Holds the layers under the checkpoint's `encoder.layers.{i}` names."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))


def pool(h: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average each k x k block of patches into one soft token.

    h (B, N, D) with padded rows already zero -> pooled (B, N / k^2, D) in h's dtype (the average is
    taken in fp32), and valid (B, N / k^2): blocks that hold at least one patch. Block index of a patch
    is x//k + (W/k) * (y//k) with W = that image's patch-grid width, so blocks are row-major."""
    length = h.shape[1] // (k * k)                   # from the padded count, as the reference does
    pos = positions.clamp(min=0)
    width = pos[..., 0].amax(-1, keepdim=True) + 1
    block = pos[..., 0] // k + (width // k) * (pos[..., 1] // k)           # (B, N)
    weights = F.one_hot(block, length).float() / (k * k)                  # (B, N, L)
    pooled = (weights.transpose(1, 2) @ h.float()).to(h.dtype)
    return pooled, (weights != 0).any(1)


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = VisionEncoder(config)
        if config.standardize:
            self.register_buffer("std_bias", torch.zeros(config.hidden_size))
            self.register_buffer("std_scale", torch.ones(config.hidden_size))
        self.impl = "eager"

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, N, 3p^2), positions (B, N, 2) -> (sum of soft tokens, D) in the weight dtype."""
        cfg = self.config
        k = cfg.pooling_kernel_size
        if pixel_values.shape[1] % (k * k):
            raise ValueError(f"{pixel_values.shape[1]} patches per image is not a multiple of {k * k} (pooling {k}x{k})")
        padding = (positions == -1).all(-1)                                 # (B, N)
        h = self.patch_embedder(pixel_values, positions, padding)
        mask = additive_mask(~padding[:, None, None, :], h.dtype)           # padded keys only
        cos, sin = axial_cos_sin(positions, cfg.head_dim, cfg.rope_theta, h.dtype)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin, mask, self.impl)
        pooled, valid = pool(h.masked_fill(padding[..., None], 0.0), positions, k)
        out = pooled.float()[valid] * cfg.hidden_size ** 0.5                # (sum soft tokens, D) fp32
        if cfg.standardize:
            out = (out - self.std_bias.float()) * self.std_scale.float()
        return out.to(h.dtype)


class MultimodalEmbedder(nn.Module):
    """Weight-free RMSNorm, then a projection from the vision width to the text width."""

    def __init__(self, vision_width: int, text_width: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(vision_width, eps, with_scale=False)
        self.embedding_projection = nn.Linear(vision_width, text_width, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(features))
