"""The entropy-bound sampler's math, as small tensor functions shared by the reference and the engine.

Every function works on whole batches, `(B, C)` positions at once, with no host syncs. Numerics
match transformers 5.23.0's `DiffusionGemmaForBlockDiffusion.generate`:
- the temperature is a float32 tensor `t_min + (t_max - t_min) * (int32(step) / N)`, and logits are
  *divided* by it (a Python-double temperature differs in the last ulp);
- entropy is `torch.distributions.Categorical(logits=...).entropy()`, written out;
- acceptance keeps the lowest-entropy positions whose sorted cumulative entropy, excluding the
  position itself, is <= the bound (so the most confident position is always accepted).
"""
from __future__ import annotations

import torch


def step_temperature(step: int | torch.Tensor, num_steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """Linear schedule: `t_max` at step N (the first), down to `t_min + (t_max - t_min)/N` at step 1.
    `step` counts remaining steps. Returns a float32 0-d tensor (or (B,) for a tensor of steps)."""
    step = torch.as_tensor(step, dtype=torch.int32)
    return t_min + (t_max - t_min) * (step / num_steps)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy in nats of softmax(logits). (…, V) fp32 -> (…)."""
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)
    p = torch.softmax(logp, dim=-1)
    return -(logp.clamp(min=torch.finfo(logp.dtype).min) * p).sum(-1)


def entropy_bound_accept(token_entropy: torch.Tensor, bound: float | torch.Tensor) -> torch.Tensor:
    """(B, C) entropies -> (B, C) bool: accept the k most confident positions such that the sum of
    their entropies minus the largest of them is <= bound. `bound` may be (B, 1) for per-row bounds."""
    sorted_ent, order = torch.sort(token_entropy, dim=-1)
    selected = (torch.cumsum(sorted_ent, dim=-1) - sorted_ent) <= bound
    return torch.zeros_like(selected).scatter(-1, order, selected)
