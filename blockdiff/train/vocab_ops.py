"""Vocabulary-side training ops: LM head + softcap + cross-entropy, and the self-conditioning input.

Contract: `head_cross_entropy(model, hidden, targets)` is
`F.cross_entropy(model.logits(hidden).flatten(0, -2), targets.flatten())` and
`soft_embedding_from_hidden(model, hidden)` is `model.soft_embedding(model.logits(hidden))`: the
model's own methods. With `compiled=True` the same functions run through torch.compile, which fuses
the ~10 elementwise passes over the (rows x V) fp32 logits (cast, divide, tanh, multiply,
log-softmax and their backward) into one or two loops: in eager mode those passes are a large
share of a small model's training step. Tests check that both paths agree.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..model.transformer import DiffusionGemma


def _ce(model: DiffusionGemma, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """hidden (N, H), targets (N,) -> mean CE (fp32 scalar)."""
    return F.cross_entropy(model.logits(hidden), targets)


def _soft(model: DiffusionGemma, hidden: torch.Tensor) -> torch.Tensor:
    return model.soft_embedding(model.logits(hidden))


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)     # fixed shapes per run: micro-batch x seq_len


def head_cross_entropy(model: DiffusionGemma, hidden: torch.Tensor, targets: torch.Tensor,
                       compiled: bool = False) -> torch.Tensor:
    """hidden (…, H) final-normed states, targets (…) ids -> mean CE over all positions."""
    fn = _compiled(_ce) if compiled else _ce
    return fn(model, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))


def soft_embedding_from_hidden(model: DiffusionGemma, hidden: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """hidden (B, C, H) -> the self-conditioning input (B, C, H)."""
    return (_compiled(_soft) if compiled else _soft)(model, hidden)
