"""The DiffusionGemma text backbone: one set of weights used in two modes.

- `encode(ids, cache)`: causal pass over uncached tokens (prompt prefill, canvas commit); writes K/V.
- `denoise(canvas, cache, soft_embeds)`: bidirectional pass over a canvas that reads the cache.
- `logits(hidden)`: tied LM head + fp32 tanh softcap; kept separate because 262k-vocab logits are
  the largest tensors in the system and are computed only where needed.
- Images (a model whose config has a vision tower): `image_features(pixel_values, positions)` runs
  the tower and the embedder; `encode_with(..., image_embeds=)` puts those soft tokens in place of
  the prompt's `image_token_id` tokens, in order. The caller's context decides whether an image's
  tokens see each other (`image_blocks`); `encode(..., pixel_values=...)` does both as the
  reference's generate() does. Canvases never see pixels, only the cached image K/V.
The model maps ids, positions and attention contexts to hidden states; it knows nothing of
sampling, requests or tokenizers. Parameter names equal the checkpoint's `model.decoder.*` keys
(without that prefix); the encoder's own `layer_scalar` copies live in `encoder_layer_scalar`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..hf_layout import save_checkpoint
from .attention import AttnContext, Attention, DecodeContext, EncodeContext, image_blocks
from .cache import KVCache
from .layers import MLP, Experts, RMSNorm, Rotary, Router
from .self_cond import SelfConditioning
from .vision import MultimodalEmbedder, VisionTower

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
         "post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2")


class Layer(nn.Module):
    """Attention, then a dense MLP and a mixture of experts side by side on the same residual."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, index)
        self.mlp = MLP(h, config.intermediate_size)
        self.router = Router(config)
        self.experts = Experts(config)
        for name in NORMS:
            setattr(self, name, RMSNorm(h, eps))
        self.register_buffer("layer_scalar", torch.ones(1))          # decoder copy
        self.register_buffer("encoder_layer_scalar", torch.ones(1))  # encoder copy (equal in practice)
        # Where the dense MLP and the experts return partial sums (a model split over devices), a
        # callable (dense, moe) -> (dense, moe) that completes both; None: they are already whole.
        self.reduce_partials = None

    def forward(self, h: torch.Tensor, cos, sin, ctx: AttnContext, scalar: torch.Tensor) -> torch.Tensor:
        """h (B, S, H) -> (B, S, H). `scalar` multiplies the whole residual stream at the end."""
        return self.feed_forward(h, self.self_attn(self.input_layernorm(h), cos, sin, ctx), scalar)

    def feed_forward(self, h: torch.Tensor, attn_out: torch.Tensor, scalar: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after attention; free of the context (the engine compiles it)."""
        h = h + self.post_attention_layernorm(attn_out)
        dense = self.mlp(self.pre_feedforward_layernorm(h))
        flat = h.reshape(-1, h.shape[-1])
        weights, idx = self.router(flat)            # the router sees the un-normalised residual
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, idx).reshape(h.shape)
        if self.reduce_partials is not None:
            dense, moe = self.reduce_partials(dense, moe)
        dense, moe = self.post_feedforward_layernorm_1(dense), self.post_feedforward_layernorm_2(moe)
        return (h + self.post_feedforward_layernorm(dense + moe)) * scalar


class DiffusionGemma(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config.hidden_size, config.intermediate_size, config.rms_norm_eps)
        self.rotary = Rotary(config)
        vision = config.vision_config
        self.vision_tower = VisionTower(vision) if vision else None
        self.embed_vision = MultimodalEmbedder(vision.hidden_size, config.hidden_size, vision.rms_norm_eps) \
            if vision else None

    # ---- properties ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def set_attention_impl(self, impl: str) -> None:
        """'eager' (the reference's exact arithmetic) or 'sdpa' (fused kernels)."""
        if impl not in ("eager", "sdpa"):
            raise ValueError(f"attention impl must be 'eager' or 'sdpa', got {impl!r}")
        for layer in self.layers:
            layer.self_attn.impl = impl
        if self.vision_tower is not None:
            self.vision_tower.impl = impl

    def use_grouped_experts(self) -> None:
        """Inference layout: every layer's experts as grouped matmuls (see `Experts.use_grouped_mm`)."""
        for layer in self.layers:
            layer.experts.use_grouped_mm()

    # ---- embeddings ---------------------------------------------------------------------------
    def embed_scale(self, dtype: torch.dtype) -> torch.Tensor:
        # sqrt(H) rounded to the model dtype: 53.0 rather than 53.066 for H=2816 in bf16
        return torch.tensor(self.config.hidden_size ** 0.5).to(dtype)

    # The embedding matrix is a tensor, or (int8 embedding, `quant/embedding.py`) rows dequantized
    # on indexing: `w[ids]` / `w[lo:hi]` read rows, `w[:]` is the whole (V, H) matrix (a view of a tensor).
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight
        rows = F.embedding(ids, w) if isinstance(w, torch.Tensor) else w[ids]
        return rows * self.embed_scale(w.dtype).to(w.device)

    def soft_embedding(self, sc_logits: torch.Tensor) -> torch.Tensor:
        """Previous step's processed logits (B, C, V) -> expected token embedding (B, C, H)."""
        w = self.embed_tokens.weight
        probs = F.softmax(sc_logits, dim=-1, dtype=torch.float32).to(w.dtype)
        return torch.matmul(probs, w[:]) * self.embed_scale(w.dtype).to(w.device)

    # ---- images -------------------------------------------------------------------------------
    @property
    def supports_images(self) -> bool:
        return self.vision_tower is not None

    def image_features(self, pixel_values: torch.Tensor, image_position_ids: torch.Tensor) -> torch.Tensor:
        """Processed images (n, N, 3p^2) fp32 and patch positions (n, N, 2) -> soft tokens
        (sum over images of their soft-token counts, H) in the model dtype, image-major."""
        if self.vision_tower is None:
            raise ValueError("this checkpoint has no vision tower: it takes text only")
        table = self.config.vision_config.position_embedding_size
        if int(image_position_ids.max()) >= table:
            raise ValueError(f"an image's patch grid is wider or taller than the {table} positions the tower knows")
        feats = self.vision_tower(pixel_values.to(self.device), image_position_ids.to(self.device))
        return self.embed_vision(feats)

    def embed_prompt(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, S, H), with `image_embeds` (n, H) scattered over the image tokens in
        row-major order. The counts must agree (checked: one host sync)."""
        h = self.embed(input_ids)
        if image_embeds is None:
            return h
        slots = input_ids == self.config.image_token_id
        if int(slots.sum()) != image_embeds.shape[0]:
            raise ValueError(f"the prompt has {int(slots.sum())} image tokens but its images give "
                             f"{image_embeds.shape[0]} soft tokens")
        return h.masked_scatter(slots[..., None], image_embeds.to(h.dtype))

    def image_blocks(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Image run ids (B, S) for an encode context when the config makes images bidirectional, else None."""
        if not self.config.bidirectional_images:
            return None
        return image_blocks(input_ids == self.config.image_token_id)

    # ---- backbone -----------------------------------------------------------------------------
    def run_layers(self, h: torch.Tensor, positions: torch.Tensor, ctx: AttnContext, scalars: str | torch.Tensor):
        """h (B, S, H), positions (B or 1, S). `scalars`: 'encoder', 'decoder', or a bool (B, S, 1)
        tensor that is True where the decoder's scalar applies (mixed training sequences)."""
        tables = {kind: self.rotary.cos_sin(kind, positions, h.dtype) for kind in set(self.config.layer_types)}
        for layer, kind in zip(self.layers, self.config.layer_types):
            if isinstance(scalars, str):
                scalar = layer.encoder_layer_scalar if scalars == "encoder" else layer.layer_scalar
            else:
                scalar = torch.where(scalars, layer.layer_scalar, layer.encoder_layer_scalar)
            h = layer(h, *tables[kind], ctx, scalar)
        return h

    def encode_with(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttnContext,
                    need_hidden: bool = False, image_embeds: torch.Tensor | None = None) -> torch.Tensor | None:
        """Causal pass over (B, S) new tokens at `positions` (B or 1, S); `ctx` writes their K/V.
        `image_embeds` (n, H) replace the image tokens (see `embed_prompt`).
        Returns final-normed hidden states only if `need_hidden` (AR loss / AR decoding)."""
        h = self.run_layers(self.embed_prompt(input_ids, image_embeds), positions, ctx, "encoder")
        return self.norm(h) if need_hidden else None

    def denoise_with(self, canvas_ids: torch.Tensor, positions: torch.Tensor, ctx: AttnContext,
                     soft_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Bidirectional pass over a (B, C) canvas. soft_embeds (B, C, H) or None (first step).
        Returns final-normed hidden states (B, C, H)."""
        h0 = self.self_conditioning(self.embed(canvas_ids), soft_embeds)
        return self.norm(self.run_layers(h0, positions, ctx, "decoder"))

    def encode(self, input_ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None,
               need_hidden: bool = False, pixel_values: torch.Tensor | None = None,
               image_position_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """`encode_with` on a simple KVCache: tokens go at cache.length + arange(S).
        attention_mask (B, S) marks real tokens (False = left pad). With `pixel_values` (all images of
        the batch, in prompt order) the image tokens get their soft tokens and, where the config asks,
        attend within their image."""
        start, s = cache.length, input_ids.shape[1]
        if attention_mask is not None:
            cache.valid[:, start:start + s] = attention_mask.bool()
        positions = torch.arange(start, start + s, device=input_ids.device)[None]
        embeds, blocks = None, None
        if pixel_values is not None:
            embeds, blocks = self.image_features(pixel_values, image_position_ids), self.image_blocks(input_ids)
        ctx = EncodeContext(cache, start, s, self.config.sliding_window, self.dtype, blocks)
        out = self.encode_with(input_ids, positions, ctx, need_hidden, embeds)
        cache.length = start + s
        return out

    def denoise(self, canvas_ids: torch.Tensor, cache: KVCache, soft_embeds: torch.Tensor | None = None):
        """`denoise_with` on a simple KVCache: the canvas sits right after the cached context."""
        positions = torch.arange(cache.length, cache.length + canvas_ids.shape[1], device=canvas_ids.device)[None]
        ctx = DecodeContext(cache, self.config.sliding_window, self.dtype)
        return self.denoise_with(canvas_ids, positions, ctx, soft_embeds)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw tied LM head in the model dtype, (…, H) -> (…, V). An embedding with a head kernel of
        its own (int8 rows: int8 x int8) computes it; otherwise a matmul with the embedding matrix."""
        head = getattr(self.embed_tokens, "linear", None)
        return head(hidden) if head is not None else F.linear(hidden, self.embed_tokens.weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head in the model dtype, then an fp32 tanh softcap. (…, H) -> (…, V) fp32."""
        out = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        return torch.tanh(out / cap) * cap if cap else out

    # ---- convenience ----------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.dtype, self.device)

    @torch.no_grad()
    def block_logits(self, input_ids: torch.Tensor, canvas_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                     image_position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits (B, C, V) fp32 for a canvas after a context, with no self-conditioning:
        the same quantity as transformers' `model(input_ids=..., decoder_input_ids=...).logits`
        (with images: as its generate() computes them, image tokens attending within their image)."""
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + canvas_ids.shape[1])
        self.encode(input_ids, cache, attention_mask, pixel_values=pixel_values, image_position_ids=image_position_ids)
        return self.logits(self.denoise(canvas_ids, cache))

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        save_checkpoint(self, path, max_shard_bytes=max_shard_bytes)
