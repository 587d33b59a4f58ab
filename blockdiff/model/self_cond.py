"""Self-conditioning: feeds the previous denoising step's prediction back into the decoder input.

Contract (as transformers 5.23.0's DiffusionGemma decoder): the decoder input is always `post_norm(embed(canvas) + sc)` with a
weight-free RMSNorm, where `sc = down(gelu(gate(n)) * up(n))`, `n = pre_norm(soft)`, and `soft` is
the soft embedding `softmax(prev_logits) @ E * embed_scale` (zero at a canvas's first step, which
makes `sc` exactly zero).
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import RMSNorm, gelu_tanh


class SelfConditioning(nn.Module):
    def __init__(self, hidden: int, inner: int, eps: float):
        super().__init__()
        self.pre_norm = RMSNorm(hidden, eps)
        self.post_norm = RMSNorm(hidden, eps, with_scale=False)
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, token_embeds: torch.Tensor, soft_embeds: torch.Tensor | None) -> torch.Tensor:
        """token_embeds, soft_embeds: (B, C, H). soft_embeds None means 'no previous step'."""
        if soft_embeds is None:   # pre_norm(0) = 0 and MLP(0) = 0 exactly, so skip the work
            return self.post_norm(token_embeds)
        n = self.pre_norm(soft_embeds)
        return self.post_norm(token_embeds + self.down_proj(gelu_tanh(self.gate_proj(n)) * self.up_proj(n)))
