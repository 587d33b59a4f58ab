"""Log-probabilities of committed tokens: what a "logprob" means for block diffusion.

Definition. A committed token's log-probability is taken under the final denoising step of its
canvas, at its position, from the step's processed distribution
    p = softmax(softcap(h @ E^T) / T)
where h is the position's final hidden state, E the tied embedding and T the step's temperature
(the row's schedule at that step times its temperature scale; greedy rows keep the schedule). It
is the distribution whose argmax the sampler commits and whose largest probability `StepOut.max_prob`
reports, so for a committed argmax exp(logprob) equals max_prob. Top-k / top-p shape only the
sampled (renoising) token, never the argmax, so they leave p unchanged. A committed token that is
not the argmax (a constrained commit, say) gets its own log-probability under the same p. The
top-N alternatives come from the same p, most probable first; `rank` is 1 + the number of tokens
strictly more probable than the committed one.

Cost. Computed only for the rows that asked, once per committed canvas, off the per-step hot path.
Two ways over the vocabulary, the same math: materialised (`materialised_logprobs`: log_softmax of
(r, C, V) processed logits, rows in tiles under a byte budget) and streamed (`streamed_logprobs`:
tiles of the embedding matrix for every position at once with an online max / normaliser and a
running top-N, never a (C, V) tensor). With tensor parallelism each rank streams its vocabulary
slice and `merge` combines the ranks' statistics (`gather`: an all-gather of a tensor).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from .sampler import model_softcap_table, processed_logits, rows_per_tile, streams
from .vocab_stream import TILE_BYTES, Head, tile_width
from .vocab_top import sortable_key, vocab_tiles


@dataclass
class TokenLogprobs:
    """Per position (P,) of the committed tokens; top-N sorted, most probable first."""
    logprob: torch.Tensor      # (P,) fp32 log p(committed id)
    rank: torch.Tensor         # (P,) int64, 1 = the most probable
    top_ids: torch.Tensor      # (P, N) int64
    top_logprobs: torch.Tensor  # (P, N) fp32


@dataclass
class SliceStats:
    """One vocabulary slice's statistics per position (P,): enough to merge slices exactly."""
    m: torch.Tensor            # (P,) max processed logit
    z: torch.Tensor            # (P,) sum exp(y - m)
    chosen: torch.Tensor       # (P,) the committed id's processed logit; -inf outside the slice
    top_key: torch.Tensor      # (P, K) `order_key`s of the K most probable tokens, descending (K = max(N, 1))


ID_BITS = 31


def order_key(y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort like (logit y, then lower id first): top-N lists are exact and do not
    depend on how the vocabulary was tiled, ties (common in bf16) included."""
    return sortable_key(y).bitwise_left_shift_(ID_BITS).bitwise_or_((1 << ID_BITS) - 1 - ids)


def from_key(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`order_key`'s inverse: (logits fp32, ids int64)."""
    k = key >> ID_BITS
    bits = torch.where(k >= 2**31, k - 2**31, ~k).to(torch.int32)
    return bits.view(torch.float32), (1 << ID_BITS) - 1 - (key & ((1 << ID_BITS) - 1))


def materialised_logprobs(proc: torch.Tensor, ids: torch.Tensor, n: int) -> TokenLogprobs:
    """proc (P, V) fp32 processed logits, ids (P,) committed -> logprobs by a direct log_softmax."""
    logp = torch.log_softmax(proc, -1)
    top_ids = from_key(order_key(proc, torch.arange(proc.shape[1], device=proc.device)).topk(n, -1).values)[1]
    chosen = proc.gather(1, ids[:, None])
    rank = 1 + (proc > chosen).sum(-1)
    return TokenLogprobs(logp.gather(1, ids[:, None]).squeeze(1), rank, top_ids, logp.gather(1, top_ids))


def tile_top_keys(y: torch.Tensor, k: int, first_id: int) -> torch.Tensor:
    """`order_key`s of the k most probable tokens of a tile y (P, T) of ids first_id.. : the tile's
    plain top-k, keyed, unless a tie straddles its cut, where the whole tile is keyed (exact)."""
    top = y.topk(k, -1)
    if bool(((y >= top.values[:, -1:]).sum(-1) > k).any()):
        return order_key(y, torch.arange(first_id, first_id + y.shape[1], device=y.device)).topk(k, -1).values
    return order_key(top.values, top.indices + first_id)


def slice_stats(head: Head, h: torch.Tensor, temp: torch.Tensor, ids: torch.Tensor, k: int, tile: int,
                lo: int = 0) -> SliceStats:
    """One pass over `head`'s vocabulary (global ids lo + local), tiles of `tile` tokens.
    h (P, H) final hidden states, temp (P,), ids (P,) committed global ids, k top entries kept."""
    p, dev = h.shape[0], h.device
    m = torch.full((p,), float("-inf"), device=dev)
    z, chosen = torch.zeros(p, device=dev), torch.full((p,), float("-inf"), device=dev)
    top_key = torch.full((p, k), -1, dtype=torch.int64, device=dev)        # below every real key
    local = ids - lo
    for t_lo, y in vocab_tiles(head, h, temp, tile):                     # y (P, n) processed logits
        n = y.shape[1]
        m_new = torch.maximum(m, y.amax(-1))
        z = z * torch.exp(m - m_new).nan_to_num_(0.0) + torch.exp(y - m_new[:, None]).sum(-1)
        m = m_new
        inside = (local >= t_lo) & (local < t_lo + n)
        chosen = torch.where(inside, y.gather(1, (local - t_lo).clamp(0, n - 1)[:, None]).squeeze(1), chosen)
        keys = tile_top_keys(y, min(k, n), lo + t_lo)
        top_key = torch.cat((top_key, keys), -1).topk(k, -1).values           # the running top-k
    return SliceStats(m, z, chosen, top_key)


def merge(stats: SliceStats, gather: Callable[[torch.Tensor], torch.Tensor]) -> SliceStats:
    """Every rank's slice statistics, combined: `gather(t)` (*S) -> (world, *S) in rank order."""
    g = {f.name: gather(getattr(stats, f.name)) for f in fields(SliceStats)}
    m = g["m"].amax(0)
    z = (g["z"] * torch.exp(g["m"] - m)).sum(0)
    top_key = torch.cat(tuple(g["top_key"]), -1).topk(stats.top_key.shape[1], -1).values
    return SliceStats(m, z, g["chosen"].amax(0), top_key)


def finish(stats: SliceStats, n: int, above: torch.Tensor) -> TokenLogprobs:
    """Merged statistics -> logprobs; `above` (P,) counts tokens with a logit above the chosen one."""
    log_z = stats.m + stats.z.log()
    top_y, top_ids = from_key(stats.top_key[:, :n])
    return TokenLogprobs(stats.chosen - log_z, 1 + above, top_ids, top_y - log_z[:, None])


def count_above(head: Head, h, temp, chosen: torch.Tensor, tile: int) -> torch.Tensor:
    """(P,) tokens of `head`'s vocabulary whose processed logit is above `chosen` (P,): one more pass."""
    above = torch.zeros(h.shape[0], dtype=torch.int64, device=h.device)
    for _, y in vocab_tiles(head, h, temp, tile):
        above += (y > chosen[:, None]).sum(-1)
    return above


def streamed_logprobs(head: Head, h: torch.Tensor, temp: torch.Tensor, ids: torch.Tensor, n: int,
                      tile_bytes: int = TILE_BYTES, lo: int = 0, gather=None, all_reduce=None) -> TokenLogprobs:
    """h (P, H), temp (P,), ids (P,) -> logprobs, the vocabulary streamed. The rank comes from the
    top entries when the chosen logit is among them (always for an argmax commit); otherwise one
    more pass counts the tokens above it. `gather` / `all_reduce`: tensor parallelism's collectives
    (each rank's `head` holds ids [lo, lo + V_r)); every rank must call this with the same rows."""
    # a quarter of the sampler's tile: a tile's int64 order keys and their temporaries live at once
    tile = tile_width(h.shape[0], head.weight.shape[0], tile_bytes // 4)
    stats = slice_stats(head, h, temp, ids, max(n, 1), tile, lo)
    if gather is not None:
        stats = merge(stats, gather)
    top_y = from_key(stats.top_key)[0]
    # chosen >= the K-th largest: every token above it is among the top K, counted there exactly
    above = (top_y > stats.chosen[:, None]).sum(-1)
    if not bool((stats.chosen >= top_y[:, -1]).all()):         # the same on every rank (merged stats)
        above = count_above(head, h, temp, stats.chosen, tile)
        above = all_reduce(above) if all_reduce is not None else above
    return finish(stats, n, above)


@torch.no_grad()
def committed_logprobs(model, hidden: torch.Tensor, temp: torch.Tensor, ids: torch.Tensor, n: int,
                       budget_bytes: int, stream: bool | None = None, shard=None) -> TokenLogprobs:
    """hidden (r, C, H) the final step's hidden states of the rows that asked, temp (r,) that step's
    temperatures, ids (r, C) the committed canvases -> logprobs per position, (r * C,) flattened.
    Streamed or materialised as the sampler chooses (`stream` None: `streams`); `shard`: a
    tensor-parallel rank's vocabulary (`lo`, `all_gather`, `all_reduce`), always streamed."""
    (r, c, hidden_size), w = hidden.shape, model.embed_tokens.weight
    cap, table = model.config.final_logit_softcapping, model_softcap_table(model)
    if shard is not None or (streams(c, w.shape[0], budget_bytes) if stream is None else stream):
        h, t = hidden.reshape(r * c, hidden_size), temp.repeat_interleave(c)
        kw = {} if shard is None else dict(lo=shard.lo, gather=shard.comm.all_gather,
                                           all_reduce=shard.comm.all_reduce)
        return streamed_logprobs(Head(w, cap, table), h, t, ids.reshape(-1), n,
                                 min(TILE_BYTES, budget_bytes // 4), **kw)
    parts, tile = [], rows_per_tile(c, w.shape[0], budget_bytes)
    for lo in range(0, r, tile):
        proc = processed_logits(model.lm_head(hidden[lo:lo + tile]), temp[lo:lo + tile], cap, table)
        parts.append(materialised_logprobs(proc.flatten(0, 1), ids[lo:lo + tile].reshape(-1), n))
    return TokenLogprobs(*(torch.cat(x) for x in zip(*((p.logprob, p.rank, p.top_ids, p.top_logprobs) for p in parts))))
