"""One vectorised denoising step over many rows, each with its own knobs: the engine's hot path.

Given the decoder's hidden states (R, C, H) for R canvases, computes for every row, with no host
sync and no Python loop over rows: tempered logits, entropy, argmax, the sampled tokens
(inverse-CDF with counter-based uniforms, so a row's draw does not depend on the batch), entropy-
bound acceptance, renoising, the stable-and-confident test and the next self-conditioning input.
Two ways over the vocabulary, the same math: materialised (`denoise_tile`: (r, C, V) logits for a
tile of rows, row tiles under a byte budget) and streamed (`denoise_tile_streamed`: tiles of the
embedding matrix for all rows at once, no (C, V) tensor, see `vocab_stream.py`), chosen by
`streams`. Per-row knobs live in `RowKnobs` tensors; the same math as `reference.py` for a single
row (entropy and normalisers up to float rounding).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..hardware import auto_dtype
from .noise import RENOISE, hash_tokens, hash_uniform, inverse_cdf_sample
from .acceptance import entropy_bound_accept
from .vocab_stream import BLOCK, TILE_BYTES, Bar, Head, sample_from_blocks, stream_vocab, tile_width
from .vocab_top import kept_blocks, top_threshold


@dataclass
class RowKnobs:
    """Per-row settings as device tensors, all (R,)."""
    max_denoising_steps: torch.Tensor   # int64 N
    t_min: torch.Tensor           # fp32
    t_span: torch.Tensor          # fp32 (t_max - t_min, computed in double then rounded)
    temp_scale: torch.Tensor      # fp32 multiplier (1.0 for temperature 0 or 1)
    greedy: torch.Tensor          # bool
    entropy_bound: torch.Tensor   # fp32
    confidence_threshold: torch.Tensor   # fp32: mean entropy below which a canvas may stop
    stability_threshold: torch.Tensor    # int64 S
    fixed_steps: torch.Tensor     # bool: never stop early
    top_k: torch.Tensor           # int64, 0 = off
    top_p: torch.Tensor           # fp32, 1 = off
    seed: torch.Tensor            # int64


@dataclass
class StepOut:
    argmax: torch.Tensor          # (R, C) committed candidate
    next_canvas: torch.Tensor     # (R, C) input of the next step
    accept: torch.Tensor          # (R, C) bool
    max_prob: torch.Tensor        # (R, C) fp32 max probability per position
    soft: torch.Tensor            # (R, C, H) next self-conditioning soft embedding
    stop: torch.Tensor            # (R,) bool: stable and confident (fixed rows: never)


STREAM_MIN_VOCAB = 32768      # see `streams`


def rows_per_tile(canvas: int, vocab: int, budget_bytes: int) -> int:
    # about five fp32 (C, V) temporaries live at once per row: logits, proc, probs, cdf, scratch
    return max(1, budget_bytes // (5 * 4 * canvas * vocab))


def _filter_top(proc: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, use_k: bool, use_p: bool):
    """Mask logits outside each row's top-k / top-p nucleus (for sampling only)."""
    if use_k:
        k = torch.where(top_k > 0, top_k, proc.shape[-1]).clamp(max=proc.shape[-1])
        kth = torch.sort(proc, dim=-1, descending=True).values.gather(-1, (k - 1)[:, None, None].expand(
            proc.shape[0], proc.shape[1], 1))
        proc = proc.masked_fill(proc < kth, float("-inf"))
    if use_p:
        sorted_p, order = torch.softmax(proc, -1).sort(dim=-1, descending=True)
        # keep the first token always; rows with top_p = 1 keep everything (no rounding-dropped tail)
        drop = ((sorted_p.cumsum(-1) - sorted_p) >= top_p[:, None, None]) & (top_p < 1)[:, None, None]
        proc = proc.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return proc


@functools.cache
def softcap_table(cap: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    """`tanh(x / cap) * cap` in fp32 for every value x of a 16-bit `dtype`: (65,536,) indexed by x's
    bits + 32768. Logits come out of a bf16 LM head, so the softcap takes one of only 65,536 inputs;
    a gather from this table gives the very bits of the computed formula (same ops, same inputs)
    at about half its cost on CPU, where tanh is the sampler's dearest operation."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32, device=device).to(torch.int16)
    return torch.tanh(bits.view(dtype).float() / cap) * cap


def processed_logits(logits: torch.Tensor, temp: torch.Tensor, cap: float, table: torch.Tensor | None = None):
    """Raw LM-head output (r, C, V) -> fp32 softcap(logits) / temp, temp (r,)."""
    if table is not None:
        proc = torch.take(table, logits.view(torch.int16).to(torch.int64) + 32768)
    elif cap:
        proc = torch.tanh(logits.float() / cap) * cap
    else:
        proc = logits.float()
    return proc / temp[:, None, None]


def sampler_core(logits: torch.Tensor, temp: torch.Tensor, cap: float, table: torch.Tensor | None = None):
    """Raw LM-head output (r, C, V) -> tempered fp32 logits, probs, argmax, max_prob, entropy.
    Softcap (from `table` when given: `softcap_table` of the logits' dtype) then divide by the
    temperature, exactly as the reference. Entropy is `logsumexp - sum(p * logits)`, from the
    softmax already computed (equal to the reference's Categorical entropy up to float rounding)
    to save passes over (C x V)."""
    proc = processed_logits(logits, temp, cap, table)
    probs = torch.softmax(proc, dim=-1)
    top, argmax = proc.max(dim=-1)
    max_prob = probs.amax(-1)                                      # = 1 / sum(exp(proc - top))
    ent = top - max_prob.log() - (probs * proc).sum(-1)          # logsumexp - E_p[proc]
    return proc, probs, argmax, max_prob, ent


def model_softcap_table(model) -> torch.Tensor | None:
    """The softcap table of the model's 16-bit logits; None for fp32 logits or no softcap."""
    w, cap = model.embed_tokens.weight, model.config.final_logit_softcapping
    if not cap or w.dtype not in (torch.bfloat16, torch.float16):
        return None
    return softcap_table(cap, w.dtype, str(w.device))


def slow_half_matmul(w) -> bool:
    """Whether 16-bit matmuls with `w` run on a slow fallback kernel (a CPU without native bf16)."""
    return w.dtype in (torch.bfloat16, torch.float16) and w.device.type == "cpu" and auto_dtype("cpu") == torch.float32


def eager_sampler_core(model):
    """`sampler_core` with the softcap table of the model's 16-bit logits bound (none for fp32).
    Eager only: compiled, the gather is repeated inside each fused pass and runs slower than
    inductor's own tanh."""
    table = model_softcap_table(model)
    return sampler_core if table is None else functools.partial(sampler_core, table=table)


@functools.cache
def compiled_sampler_core():
    """`sampler_core` through torch.compile (one fused loop per row instead of ~10 passes over
    (C x V)); compiled once, for dynamic shapes, on its first call."""
    return torch.compile(sampler_core, dynamic=True)


def row_temperature(knobs: RowKnobs, step_idx: torch.Tensor) -> torch.Tensor:
    """(R,) fp32 temperature of each row's step, the reference's schedule times the row's scale."""
    cur = (knobs.max_denoising_steps - step_idx).to(torch.int32)             # remaining steps, N .. 1
    return (knobs.t_min + knobs.t_span * (cur / knobs.max_denoising_steps.to(torch.int32))) * knobs.temp_scale


def denoise_tile(model, hidden, knobs: RowKnobs, step_idx, canvas_idx, use_k: bool, use_p: bool,
                 core=sampler_core, bar: Bar | None = None):
    """hidden (r, C, H) -> (argmax, sampled, accept, max_prob, soft, entropy) for a tile of rows.
    `core`: `sampler_core`, `eager_sampler_core(model)` or `compiled_sampler_core()`; `bar`: tokens
    barred at some positions (a request's min_tokens)."""
    w = model.embed_tokens.weight[:]           # the whole (V, H) matrix (dequantized if int8)
    logits = model.lm_head(hidden)
    if bar is not None:
        bar.apply(logits, 0)
    proc, probs, argmax, max_prob, ent = core(logits, row_temperature(knobs, step_idx),
                                                model.config.final_logit_softcapping)
    sample_probs = torch.softmax(_filter_top(proc, knobs.top_k, knobs.top_p, use_k, use_p), -1) \
        if (use_k or use_p) else probs
    u = hash_uniform(knobs.seed, canvas_idx, step_idx, hidden.shape[1])
    sampled = torch.where(knobs.greedy[:, None], argmax, inverse_cdf_sample(sample_probs, u))
    accept = entropy_bound_accept(ent, knobs.entropy_bound[:, None])
    soft = torch.matmul(probs.to(w.dtype), w) * model.embed_scale(w.dtype).to(w.device)
    return argmax, sampled, accept, max_prob, soft, ent


def denoise_tile_streamed(model, hidden, knobs: RowKnobs, step_idx, canvas_idx, use_k: bool, use_p: bool,
                          budget_bytes: int, bar: Bar | None = None):
    """`denoise_tile` with the vocabulary streamed in tiles (see `vocab_stream.py`): the same outputs,
    and no (r, C, V) tensor. Positions of all r rows share each tile of the embedding matrix."""
    (r, c, hidden_size), w = hidden.shape, model.embed_tokens.weight
    head = Head(w, model.config.final_logit_softcapping, model_softcap_table(model), slow_half_matmul(w),
                None if bar is None else Bar(bar.ids, bar.mask.reshape(-1)))
    h, temp = hidden.reshape(r * c, hidden_size), row_temperature(knobs, step_idx).repeat_interleave(c)
    tile = tile_width(r * c, w.shape[0], min(TILE_BYTES, budget_bytes // 4))
    stats = stream_vocab(head, h, temp, tile)
    blocks, kept_bits = stats.blocks, None
    if use_k or use_p:
        tau = top_threshold(head, h, temp, stats.m, tile, knobs.top_k.repeat_interleave(c),
                            knobs.top_p.repeat_interleave(c), use_k, use_p)
        blocks, kept_bits = kept_blocks(head, h, temp, stats.m, tile, tau)
    u = hash_uniform(knobs.seed, canvas_idx, step_idx, c).reshape(-1)
    chunk = max(64, min(TILE_BYTES, budget_bytes // 4) // (BLOCK * hidden_size * w.element_size()))  # per gather
    sampled = sample_from_blocks(head, h, temp, blocks, stats.m, u, chunk, kept_bits).view(r, c)
    argmax, ent = stats.argmax.view(r, c), stats.entropy.view(r, c)
    sampled = torch.where(knobs.greedy[:, None], argmax, sampled)
    accept = entropy_bound_accept(ent, knobs.entropy_bound[:, None])
    soft = (stats.soft / stats.z[:, None]).to(w.dtype) * model.embed_scale(w.dtype).to(w.device)
    return argmax, sampled, accept, (1 / stats.z).view(r, c), soft.view(r, c, hidden_size), ent


def streams(canvas: int, vocab: int, budget_bytes: int) -> bool:
    """Stream the vocabulary from STREAM_MIN_VOCAB tokens on, or where one row's materialised
    temporaries would not fit the budget."""
    return vocab >= STREAM_MIN_VOCAB or 5 * 4 * canvas * vocab > budget_bytes


def streamed_rows_per_tile(canvas: int, vocab: int, hidden: int, budget_bytes: int, top: bool) -> int:
    # per position: block sums and their kept / rescaled copies, the soft embedding, top-k / top-p
    # histograms (two float64 (2**11 + 1) per search level), one block of gathered logits
    per_position = 12 * -(-vocab // BLOCK) + 8 * hidden + 8 * BLOCK + (4 * 8 * 2049 if top else 0)
    return max(1, budget_bytes // (canvas * per_position))


def denoise_rows(model, hidden, knobs: RowKnobs, step_idx, canvas_idx, history, budget_bytes: int,
                 use_k: bool = False, use_p: bool = False, core=sampler_core,
                 tile_step=None, stream: bool | None = None, bar: Bar | None = None) -> tuple[StepOut, torch.Tensor]:
    """All rows in tiles. history (R, S_max, C) previous argmax canvases (-1 filled at canvas start).
    `tile_step`: a function with `denoise_tile`'s signature and results (the vocabulary-parallel one
    of tensor parallelism); None: the vocabulary streamed (`denoise_tile_streamed`) or materialised
    per row tile (`denoise_tile`, with `core`), as `stream` says (None chooses by `streams`).
    `bar`: tokens barred at some positions (not with `tile_step`). Returns the step outputs and the
    updated history."""
    r, c, hidden_size = hidden.shape
    vocab = model.config.vocab_size
    stream = streams(c, vocab, budget_bytes) if stream is None else stream
    if tile_step is not None:
        tile, step = rows_per_tile(c, vocab, budget_bytes), functools.partial(tile_step, core=core)
    elif stream:
        tile = streamed_rows_per_tile(c, vocab, hidden_size, budget_bytes, use_k or use_p)
        step = functools.partial(denoise_tile_streamed, budget_bytes=budget_bytes)
    else:
        tile = rows_per_tile(c, vocab, budget_bytes)
        step = functools.partial(denoise_tile, core=core)
    parts = []
    for lo in range(0, r, tile):
        sl = slice(lo, lo + tile)
        sub = RowKnobs(*(getattr(knobs, f)[sl] for f in RowKnobs.__dataclass_fields__))
        extra = {} if bar is None else {"bar": Bar(bar.ids, bar.mask[sl])}
        parts.append(step(model, hidden[sl], sub, step_idx[sl], canvas_idx[sl], use_k, use_p, **extra))
    argmax, sampled, accept, conf, soft, ent = (torch.cat(x) for x in zip(*parts))
    noise = hash_tokens(knobs.seed, canvas_idx, step_idx, RENOISE, c, model.config.vocab_size)
    next_canvas = torch.where(accept, sampled, noise)
    # stable: argmax equal to each of the last S_r stored canvases (S_r = 0: always stable)
    s_max = history.shape[1]
    considered = torch.arange(s_max, device=hidden.device)[None, :] >= (s_max - knobs.stability_threshold)[:, None]
    same = (history == argmax[:, None, :]).all(-1) | ~considered                 # (R, S_max)
    stable = same.all(-1)
    confident = ent.mean(-1) < knobs.confidence_threshold
    history = torch.cat((history[:, 1:], argmax[:, None, :]), dim=1) if s_max else history
    stop = stable & confident & ~knobs.fixed_steps
    return StepOut(argmax, next_canvas, accept, conf, soft, stop), history
