"""Vocabulary-side training ops: tied head + softcap + cross-entropy, and the soft embedding.

Contract: `head_cross_entropy(model, hidden, targets)` equals
`F.cross_entropy(model.logits(hidden).flatten(0, -2), targets.flatten())` and
`soft_embedding_from_hidden(model, hidden)` equals `model.soft_embedding(model.logits(hidden))`.
With `compiled=True` both run through torch.compile, which fuses the ~10 elementwise passes over the
(rows x V) fp32 logits (cast, divide, tanh, multiply, log-softmax and their backward) into one or two
loops: on a 2-core CPU those passes took ~40% of a training step of the default model.
The eager path is the reference; tests check that both agree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.transformer import DiffusionGemma


def _softcapped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    logits = logits.float()
    return torch.tanh(logits / cap) * cap if cap else logits


def _ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float | None) -> torch.Tensor:
    """hidden (N, H), weight (V, H), targets (N,) -> mean CE (fp32 scalar)."""
    return F.cross_entropy(_softcapped(F.linear(hidden, weight), cap), targets)


def _soft(hidden: torch.Tensor, weight: torch.Tensor, cap: float | None, scale: torch.Tensor) -> torch.Tensor:
    """hidden (N, H) -> expected embedding under softmax(logits) (N, H), in the weight's dtype."""
    probs = F.softmax(_softcapped(F.linear(hidden, weight), cap), dim=-1).to(weight.dtype)
    return (probs @ weight) * scale


_compiled: dict[str, object] = {}


def _fn(name: str, compiled: bool):
    eager = {"ce": _ce, "soft": _soft}[name]
    if not compiled:
        return eager
    if name not in _compiled:
        # Fixed shapes per run (micro-batch x seq_len), so one static graph each.
        _compiled[name] = torch.compile(eager, dynamic=False)
    return _compiled[name]


def head_cross_entropy(model: DiffusionGemma, hidden: torch.Tensor, targets: torch.Tensor,
                       compiled: bool = False) -> torch.Tensor:
    """hidden (…, H) final-normed states, targets (…) ids -> mean CE over all positions."""
    w = model.embed_tokens.weight
    return _fn("ce", compiled)(hidden.reshape(-1, hidden.shape[-1]), w, targets.reshape(-1),
                               model.config.final_logit_softcapping)


def soft_embedding_from_hidden(model: DiffusionGemma, hidden: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """hidden (B, C, H) -> the self-conditioning input (B, C, H) that `model.soft_embedding` makes."""
    w = model.embed_tokens.weight
    scale = model.embed_scale(w.dtype).to(w.device)
    flat = _fn("soft", compiled)(hidden.reshape(-1, hidden.shape[-1]), w, model.config.final_logit_softcapping, scale)
    return flat.reshape(hidden.shape)
