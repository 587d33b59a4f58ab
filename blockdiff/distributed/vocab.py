"""Vocabulary parallelism: the tied embedding, the LM head and the sampler over vocabulary slices.

Each rank holds embedding rows [lo, hi) (`Layout.vocab_range`). Contract:
- `VocabShard.embed(ids)`: each rank looks up the ids it holds, zeros elsewhere, and one all-reduce
  sums them: the same values as the full lookup (one term per token, the rest exact zeros).
- `VocabShard.tile_step`: `sampler.denoise_tile`'s signature and results, identical on every rank,
  while each rank computes the logits of its own rows only, (r, C, V / N). The softmax statistics
  combine across ranks: one all-gather of each position's local max and first argmax (the global
  argmax is the lowest rank's, so ties resolve to the lowest id as in one process); one all-gather
  of the local sums of exp(y - max) and exp(y - max) * y (the normaliser and the entropy; inverse-CDF
  sampling picks the rank by the first sums, then the token inside its slice, and one all-reduce
  hands the id to every rank); one all-reduce of the soft embedding's partial sums probs_r @ E_r.
- Rows with top-k or top-p need the global order of the vocabulary: for tiles holding such rows the
  processed logits are gathered, (r, C, V) on every rank, and filtered as in one process.
Against one process the arithmetic differs only in summation order (the normaliser, the entropy's
sum, the soft embedding and the sampling's cumulative mass add in another grouping), so values
agree to float rounding and tokens are equal unless a draw falls within rounding of a boundary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..diffusion.acceptance import entropy_bound_accept
from ..diffusion.noise import hash_uniform, inverse_cdf_sample
from ..diffusion.sampler import RowKnobs, _filter_top, model_softcap_table, processed_logits, row_temperature
from .comm import Comm


class VocabShard:
    def __init__(self, model, comm: Comm, lo: int, hi: int, sizes: list[int]):
        self.model, self.comm, self.lo, self.hi, self.sizes = model, comm, lo, hi, sizes
        self.table = model_softcap_table(model)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, S) global token ids -> (B, S, H) scaled embeddings, as `DiffusionGemma.embed`."""
        w = self.model.embed_tokens.weight                   # (V_r, H)
        local = ids - self.lo
        held = (local >= 0) & (local < w.shape[0])
        e = F.embedding(torch.where(held, local, 0), w).masked_fill_(~held[..., None], 0)
        return self.comm.all_reduce(e) * self.model.embed_scale(w.dtype).to(w.device)

    def _max_argmax(self, proc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """proc (r, C, V_r) -> global max (r, C) fp32 and the first index holding it (r, C) int64."""
        top, arg = proc.max(dim=-1)
        both = self.comm.all_gather(torch.stack((top.double(), (arg + self.lo).double())))   # (N, 2, r, C), exact
        tops, args = both[:, 0], both[:, 1]
        best = tops.amax(0)
        first = (tops == best).to(torch.int8).argmax(0, keepdim=True)      # lowest rank with the max
        return best.float(), args.gather(0, first).squeeze(0).long()

    def _sample(self, probs: torch.Tensor, u: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
        """Inverse CDF over the whole vocabulary: the rank whose slice holds u * total, then the
        token inside it (`inverse_cdf_sample` on that rank's slice). probs (r, C, V_r), u (r, C),
        totals (N, r, C) every rank's probability mass (to scale)."""
        cum = totals.cumsum(0)
        target = u * cum[-1]
        n = totals.shape[0]
        last = (n - 1) - (totals > 0).flip(0).to(torch.int8).argmax(0)      # rounding never picks an empty slice
        owner = torch.minimum((cum <= target).sum(0), last)
        before = torch.where(owner > 0, cum.gather(0, (owner - 1).clamp(min=0)[None]).squeeze(0), 0)
        inside = ((target - before) / totals.gather(0, owner[None]).squeeze(0)).clamp(0, 1)
        mine = owner == self.comm.rank
        ids = inverse_cdf_sample(probs, torch.where(mine, inside, 0)) + self.lo
        return self.comm.all_reduce(torch.where(mine, ids, 0))              # exactly one rank adds its id

    def tile_step(self, model, hidden, knobs: RowKnobs, step_idx, canvas_idx, use_k: bool, use_p: bool, core=None):
        """`denoise_tile` over vocabulary slices; `core` is unused (this step has its own)."""
        w = model.embed_tokens.weight                                         # (V_r, H)
        proc = processed_logits(F.linear(hidden, w), row_temperature(knobs, step_idx),
                                model.config.final_logit_softcapping, self.table)   # (r, C, V_r) fp32
        top, argmax = self._max_argmax(proc)
        e = torch.exp(proc - top[..., None])
        sums = self.comm.all_gather(torch.stack((e.sum(-1), (e * proc).sum(-1))))   # (N, 2, r, C)
        z = sums[:, 0].sum(0)                                                 # sum exp(y - max)
        probs = e / z[..., None]
        ent = top + z.log() - sums[:, 1].sum(0) / z                           # logsumexp - E_p[proc]
        u = hash_uniform(knobs.seed, canvas_idx, step_idx, hidden.shape[1])
        if use_k or use_p:
            full = self.comm.gather_vocab(proc, self.sizes)                  # (r, C, V)
            sampled = inverse_cdf_sample(torch.softmax(_filter_top(full, knobs.top_k, knobs.top_p, use_k, use_p), -1), u)
        else:
            sampled = self._sample(probs, u, sums[:, 0])
        sampled = torch.where(knobs.greedy[:, None], argmax, sampled)
        accept = entropy_bound_accept(ent, knobs.entropy_bound[:, None])
        soft = self.comm.all_reduce(torch.matmul(probs.to(w.dtype), w)) * model.embed_scale(w.dtype).to(w.device)
        return argmax, sampled, accept, 1 / z, soft, ent
