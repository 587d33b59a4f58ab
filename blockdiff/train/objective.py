"""Training objectives: uniform-state block-diffusion corruption, the one-pass training mask, losses.

Contract (transformers 5.23.0's DiffusionGemma training loss; NeMo's DiffusionGemma recipe; BD3-LM's
one-pass training):
- A clean sequence x (B, L) with L = n * C is cut into n canvases of C = config.canvas_length tokens.
  `corrupt` replaces each position of canvas b by a uniform random token with probability t[b],
  t ~ U(eps, 1) drawn per canvas (no mask token: the state space is the vocabulary itself).
- `forward_hidden` runs [x_clean ; x_noisy] (B, 2L) through the backbone once. The clean half is the
  encoder (causal, encoder layer scalars); noisy canvas b is the decoder over block b: bidirectional
  within the block and attending to the clean tokens before it, at positions b*C + arange(C), which
  are the positions it gets at inference. So its logits equal `denoise` after `encode(x[:, :b*C])`.
- `diffusion_loss` = mean decoder CE over all canvas positions + encoder_loss_weight * encoder AR CE.
  Self-conditioning is trained per example with probability p: a first pass without it, whose
  detached soft embeddings (zeroed for the other examples) feed the second pass, whose loss counts.
  The first pass always runs, so every rank of a distributed job makes the same collective calls.
- `ar_loss` = the encoder's next-token CE only (the autoregressive baseline on the same code).
All randomness comes from the `generator` argument; nothing touches the global RNG.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import FULL
from ..model.attention import DenseContext, additive_mask
from ..model.transformer import DiffusionGemma
from .vocab_ops import head_cross_entropy, soft_embedding_from_hidden


@dataclass(frozen=True)
class Objective:
    """What to train. kind: 'diffusion' (decoder + encoder losses) or 'ar' (encoder loss only)."""

    kind: str = "diffusion"
    eps: float = 1e-3                 # lower bound of the corruption rate t ~ U(eps, 1)
    self_cond_p: float = 0.5          # probability that an example trains with self-conditioning
    encoder_loss_weight: float = 1.0

    def __post_init__(self):
        if self.kind not in ("diffusion", "ar"):
            raise ValueError(f"objective kind must be 'diffusion' or 'ar', got {self.kind!r}")
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")
        if not 0.0 <= self.self_cond_p <= 1.0:
            raise ValueError(f"self_cond_p must be in [0, 1], got {self.self_cond_p}")


@dataclass
class Losses:
    """`loss` is what is optimised; the parts are detached, for logging."""

    loss: torch.Tensor
    decoder: torch.Tensor | None
    encoder: torch.Tensor


# ---- corruption ---------------------------------------------------------------------------------
def sample_rates(batch: int, n_canvases: int, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U(eps, 1), one rate per canvas: (B, n) fp32."""
    return eps + (1.0 - eps) * torch.rand(batch, n_canvases, generator=generator)


def corrupt(x: torch.Tensor, t: torch.Tensor, vocab_size: int, generator: torch.Generator | None = None):
    """x (B, L) clean ids, t (B, n) per-canvas rates with L = n*C -> noisy ids (B, L).
    Each position independently becomes a uniform token from the whole vocabulary with
    probability t (a replacement may draw the same token back, as the uniform kernel does)."""
    b, length = x.shape
    rate = t.repeat_interleave(length // t.shape[1], dim=1).to(x.device)          # (B, L)
    flip = torch.rand(b, length, generator=generator).to(x.device) < rate
    noise = torch.randint(0, vocab_size, (b, length), generator=generator).to(x.device)
    return torch.where(flip, noise, x)


# ---- the one-pass training mask -----------------------------------------------------------------
def block_diffusion_allowed(q: torch.Tensor, k: torch.Tensor, length: int, canvas: int, window: int | None):
    """Which key index k each query index q may see in the (2L)-token sequence [x_clean ; x_noisy].
    Broadcasting int tensors -> bool. `window` None means a full-attention layer.
    Parts (bd3lms style): clean causal (the encoder), block diagonal (a canvas sees itself
    bidirectionally), offset block causal (a canvas sees the clean tokens before it). Sliding
    layers limit the clean keys to W per clean query, and to the last W-1 before a canvas
    (the decoder's view of a sliding cache at inference)."""
    q_noisy, k_noisy = q >= length, k >= length
    q_pos, k_pos = q - length * q_noisy.long(), k - length * k_noisy.long()     # positions in x
    q_block, k_block = q_pos // canvas, k_pos // canvas
    block_start = q_block * canvas
    clean_causal = ~q_noisy & ~k_noisy & (k_pos <= q_pos)
    block_diagonal = q_noisy & k_noisy & (q_block == k_block)
    offset_block_causal = q_noisy & ~k_noisy & (k_pos < block_start)
    if window is not None:
        clean_causal = clean_causal & (k_pos > q_pos - window)
        offset_block_causal = offset_block_causal & (k_pos >= block_start - (window - 1))
    return clean_causal | block_diagonal | offset_block_causal


def causal_allowed(q: torch.Tensor, k: torch.Tensor, window: int | None) -> torch.Tensor:
    """The encoder's mask over one clean sequence (the AR objective)."""
    allowed = k <= q
    return allowed & (k > q - window) if window is not None else allowed


def training_masks(config, length: int, two_pass: bool, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Additive (1, 1, S, S) masks per layer type; S = 2L for diffusion, L for AR."""
    size = 2 * length if two_pass else length
    idx = torch.arange(size, device=device)
    q, k = idx[:, None], idx[None, :]
    masks = {}
    for kind in set(config.layer_types):
        window = None if kind == FULL else config.sliding_window
        allowed = (block_diffusion_allowed(q, k, length, config.canvas_length, window) if two_pass
                   else causal_allowed(q, k, window))
        masks[kind] = additive_mask(allowed, dtype)[None, None]
    return masks


# ---- forward passes -----------------------------------------------------------------------------
def forward_hidden(model: DiffusionGemma, x: torch.Tensor, x_noisy: torch.Tensor, soft: torch.Tensor | None,
                   masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over [x ; x_noisy] -> final-normed hidden states (clean (B, L, H), noisy (B, L, H))."""
    b, length = x.shape
    pos = torch.arange(length, device=x.device)
    positions = torch.cat((pos, pos))[None]                      # canvas b, offset j -> b*C + j
    h = torch.cat((model.embed(x), model.self_conditioning(model.embed(x_noisy), soft)), dim=1)
    is_noisy = torch.arange(2 * length, device=x.device) >= length
    scalars = is_noisy[None, :, None].expand(b, -1, -1)          # decoder layer scalars on the canvases
    h = model.norm(model.run_layers(h, positions, DenseContext(masks), scalars))
    return h[:, :length], h[:, length:]


def encoder_ce(model: DiffusionGemma, clean_hidden: torch.Tensor, x: torch.Tensor, compiled: bool = False):
    """Next-token CE of the encoder: logits at i predict x[i+1]."""
    return head_cross_entropy(model, clean_hidden[:, :-1], x[:, 1:], compiled)


def diffusion_loss(model: DiffusionGemma, x: torch.Tensor, objective: Objective,
                   generator: torch.Generator | None = None, masks=None, compiled: bool = False) -> Losses:
    """Corrupt x (B, L), run the self-conditioning first pass, and return the second pass's losses."""
    config = model.config
    b, length = x.shape
    if length % config.canvas_length:
        raise ValueError(f"sequence length {length} is not a multiple of canvas_length {config.canvas_length}")
    t = sample_rates(b, length // config.canvas_length, objective.eps, generator)
    x_noisy = corrupt(x, t, config.vocab_size, generator)
    use_sc = (torch.rand(b, generator=generator) < objective.self_cond_p).to(x.device)
    masks = masks if masks is not None else training_masks(config, length, True, model.dtype, x.device)
    with torch.no_grad():
        _, noisy_hidden = forward_hidden(model, x, x_noisy, None, masks)
        soft = soft_embedding_from_hidden(model, noisy_hidden, compiled)
        soft = soft * use_sc[:, None, None].to(soft.dtype)
    clean_hidden, noisy_hidden = forward_hidden(model, x, x_noisy, soft, masks)
    decoder = head_cross_entropy(model, noisy_hidden, x, compiled)
    encoder = encoder_ce(model, clean_hidden, x, compiled)
    loss = decoder + objective.encoder_loss_weight * encoder
    return Losses(loss, decoder.detach(), encoder.detach())


def ar_loss(model: DiffusionGemma, x: torch.Tensor, masks=None, compiled: bool = False) -> Losses:
    """The autoregressive baseline: the encoder alone, causal, next-token CE."""
    length = x.shape[1]
    masks = masks if masks is not None else training_masks(model.config, length, False, model.dtype, x.device)
    positions = torch.arange(length, device=x.device)[None]
    h = model.norm(model.run_layers(model.embed(x), positions, DenseContext(masks), "encoder"))
    encoder = encoder_ce(model, h, x, compiled)
    return Losses(encoder, None, encoder.detach())


class TrainingModel(nn.Module):
    """The model plus its objective behind one `forward`, so DDP/FSDP hooks see every step."""

    def __init__(self, model: DiffusionGemma, objective: Objective, compile_vocab_ops: bool = False):
        super().__init__()
        self.model = model
        self.objective = objective
        self.compile_vocab_ops = compile_vocab_ops
        self._masks: dict = {}

    def masks(self, length: int, device) -> dict[str, torch.Tensor]:
        key = (length, str(device))
        if key not in self._masks:
            two_pass = self.objective.kind == "diffusion"
            self._masks[key] = training_masks(self.model.config, length, two_pass, self.model.dtype, device)
        return self._masks[key]

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Losses:
        masks = self.masks(x.shape[1], x.device)
        if self.objective.kind == "ar":
            return ar_loss(self.model, x, masks, self.compile_vocab_ops)
        return diffusion_loss(self.model, x, self.objective, generator, masks, self.compile_vocab_ops)
