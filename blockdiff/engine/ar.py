"""Autoregressive decoding on the same weights: the baseline block diffusion is measured against.

Next-token prediction through the causal encoder: prefill the prompt, then feed one token per row
per step, writing its K/V into a slot cache and reading the encoder's final hidden state through
the tied LM head. Batched over rows of different lengths; greedy (temperature 0) or sampled from
softmax(logits / temperature) with counter-based uniforms (seed + row, token index), so a row's tokens do
not depend on the batch. This measures AR speed on identical weights; whether a diffusion-trained
model is a good AR model depends on its encoder (AR) loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.noise import hash_uniform, inverse_cdf_sample
from ..model.slot_cache import SlotCache, SlotEncodeContext


@dataclass
class ARResult:
    token_ids: list[list[int]]        # generated ids per prompt, cut at EOS (excluded) or max_tokens
    steps: int                        # decoding steps (forward passes after prefill)


@torch.no_grad()
def ar_generate(model, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0, seed: int = 0,
                eos_ids: set[int] | None = None) -> ARResult:
    dev, rows = model.device, len(prompts)
    lens = [len(p) for p in prompts]
    cache = SlotCache(model.config, rows, max(lens) + max_tokens, model.dtype, dev)
    slots = torch.arange(rows, device=dev)
    last_hidden = []
    for r, p in enumerate(prompts):        # prefill one prompt at a time (different lengths)
        ctx = SlotEncodeContext(cache, slots[r:r + 1], torch.zeros(1, dtype=torch.long, device=dev), len(p), len(p),
                                model.config.sliding_window, model.dtype)
        h = model.encode_with(torch.tensor([p], device=dev), torch.arange(len(p), device=dev)[None], ctx, True)
        last_hidden.append(h[:, -1])
    hidden = torch.cat(last_hidden)                              # (R, H)
    seeds = torch.full((rows,), seed, dtype=torch.long, device=dev) + slots
    starts = torch.tensor(lens, device=dev)
    out = torch.zeros(rows, max_tokens, dtype=torch.long, device=dev)
    for i in range(max_tokens):
        tok = _next_token(model, hidden, temperature, seeds, i)   # (R,)
        out[:, i] = tok
        if i == max_tokens - 1:
            break
        pos = starts + i                                          # (R,) position of `tok`
        ctx = SlotEncodeContext(cache, slots, pos, 1, max(lens) + i + 1, model.config.sliding_window, model.dtype)
        hidden = model.encode_with(tok[:, None], pos[:, None], ctx, True)[:, 0]
    return ARResult([_cut(row, eos_ids or set()) for row in out.tolist()], max_tokens)


def _next_token(model, hidden: torch.Tensor, temperature: float, seeds: torch.Tensor, index: int) -> torch.Tensor:
    logits = model.logits(hidden)                                 # (R, V) fp32
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    step = torch.full_like(seeds, index)
    u = hash_uniform(seeds, step, step, 1)                        # (R, 1)
    return inverse_cdf_sample(probs[:, None, :], u)[:, 0]


def _cut(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids
