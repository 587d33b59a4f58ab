"""The DiffusionGemma text backbone: one set of weights used in two modes.

- `encode(ids, cache)`: causal pass over uncached tokens (prompt prefill, canvas commit); writes K/V.
- `denoise(canvas, cache, soft_embeds)`: bidirectional pass over a canvas that reads the cache.
- `logits(hidden)`: tied LM head + fp32 tanh softcap; kept separate because 262k-vocab logits are
  the largest tensors in the system and are computed only where needed.
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
from .attention import AttnContext, Attention, DecodeContext, EncodeContext
from .cache import KVCache
from .layers import MLP, Experts, RMSNorm, Rotary, Router
from .self_cond import SelfConditioning

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

    def forward(self, h: torch.Tensor, cos, sin, ctx: AttnContext, scalar: torch.Tensor) -> torch.Tensor:
        """h (B, S, H) -> (B, S, H). `scalar` multiplies the whole residual stream at the end."""
        return self.feed_forward(h, self.self_attn(self.input_layernorm(h), cos, sin, ctx), scalar)

    def feed_forward(self, h: torch.Tensor, attn_out: torch.Tensor, scalar: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after attention; free of the context (the engine compiles it)."""
        h = h + self.post_attention_layernorm(attn_out)
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        flat = h.reshape(-1, h.shape[-1])
        weights, idx = self.router(flat)            # the router sees the un-normalised residual
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, idx).reshape(h.shape)
        moe = self.post_feedforward_layernorm_2(moe)
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
        self.source_files: dict[str, str] = {}   # skipped checkpoint tensors -> file, re-copied on save

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

    def use_grouped_experts(self) -> None:
        """Inference layout: every layer's experts as grouped matmuls (see `Experts.use_grouped_mm`)."""
        for layer in self.layers:
            layer.experts.use_grouped_mm()

    # ---- embeddings ---------------------------------------------------------------------------
    def embed_scale(self, dtype: torch.dtype) -> torch.Tensor:
        # sqrt(H) rounded to the model dtype: 53.0 rather than 53.066 for H=2816 in bf16
        return torch.tensor(self.config.hidden_size ** 0.5).to(dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight
        return F.embedding(ids, w) * self.embed_scale(w.dtype).to(w.device)

    def soft_embedding(self, sc_logits: torch.Tensor) -> torch.Tensor:
        """Previous step's processed logits (B, C, V) -> expected token embedding (B, C, H)."""
        w = self.embed_tokens.weight
        probs = F.softmax(sc_logits, dim=-1, dtype=torch.float32).to(w.dtype)
        return torch.matmul(probs, w) * self.embed_scale(w.dtype).to(w.device)

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
                    need_hidden: bool = False) -> torch.Tensor | None:
        """Causal pass over (B, S) new tokens at `positions` (B or 1, S); `ctx` writes their K/V.
        Returns final-normed hidden states only if `need_hidden` (AR loss / AR decoding)."""
        h = self.run_layers(self.embed(input_ids), positions, ctx, "encoder")
        return self.norm(h) if need_hidden else None

    def denoise_with(self, canvas_ids: torch.Tensor, positions: torch.Tensor, ctx: AttnContext,
                     soft_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Bidirectional pass over a (B, C) canvas. soft_embeds (B, C, H) or None (first step).
        Returns final-normed hidden states (B, C, H)."""
        h0 = self.self_conditioning(self.embed(canvas_ids), soft_embeds)
        return self.norm(self.run_layers(h0, positions, ctx, "decoder"))

    def encode(self, input_ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None,
               need_hidden: bool = False) -> torch.Tensor | None:
        """`encode_with` on a simple KVCache: tokens go at cache.length + arange(S).
        attention_mask (B, S) marks real tokens (False = left pad)."""
        start, s = cache.length, input_ids.shape[1]
        if attention_mask is not None:
            cache.valid[:, start:start + s] = attention_mask.bool()
        positions = torch.arange(start, start + s, device=input_ids.device)[None]
        ctx = EncodeContext(cache, start, s, self.config.sliding_window, self.dtype)
        out = self.encode_with(input_ids, positions, ctx, need_hidden)
        cache.length = start + s
        return out

    def denoise(self, canvas_ids: torch.Tensor, cache: KVCache, soft_embeds: torch.Tensor | None = None):
        """`denoise_with` on a simple KVCache: the canvas sits right after the cached context."""
        positions = torch.arange(cache.length, cache.length + canvas_ids.shape[1], device=canvas_ids.device)[None]
        ctx = DecodeContext(cache, self.config.sliding_window, self.dtype)
        return self.denoise_with(canvas_ids, positions, ctx, soft_embeds)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head in the model dtype, then an fp32 tanh softcap. (…, H) -> (…, V) fp32."""
        out = F.linear(hidden, self.embed_tokens.weight).float()
        cap = self.config.final_logit_softcapping
        return torch.tanh(out / cap) * cap if cap else out

    # ---- convenience ----------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.dtype, self.device)

    @torch.no_grad()
    def block_logits(self, input_ids: torch.Tensor, canvas_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits (B, C, V) fp32 for a canvas after a context, with no self-conditioning:
        the same quantity as transformers' `model(input_ids=..., decoder_input_ids=...).logits`."""
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + canvas_ids.shape[1])
        self.encode(input_ids, cache, attention_mask)
        return self.logits(self.denoise(canvas_ids, cache))

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        save_checkpoint(self, path, max_shard_bytes=max_shard_bytes)
