"""ModelRunner: the only place where scheduled work becomes device tensors.

It owns the slot KV cache and each slot's denoising state (canvas, self-conditioning soft
embedding, argmax history, step and canvas counters, knobs), all preallocated and written by
index. `execute(batch)` runs one `ScheduledBatch` and returns a `StepResult`:
- `prefill(slot, ids, start)`: encode a prompt's uncached tokens into a slot;
- `commit(slots, lengths, tokens)`: encode finished canvases into their slots and start new ones;
- `denoise(slots, lengths)`: one batched denoising step for many slots (one host sync a step);
  a finished canvas whose request asked for logprobs gets them from that step's hidden states
  (`diffusion/logprobs.py`), computed for those rows only.
Images run through the vision tower at admission, once for all the step's prefills (every image
has the processor's padded patch count), and fill their requests' image tokens in the prefill.
Fault isolation: if a batched call raises, its rows are run one by one, and only the rows that
still raise are reported failed; the others' results stand (a row's arithmetic does not depend on
the batch, see the engine's batch-invariance tests).
"""
from __future__ import annotations

import logging
import sys
from typing import Callable

import torch

from ..diffusion.logprobs import committed_logprobs
from ..diffusion.sampler import (RowKnobs, StepOut, compiled_sampler_core, denoise_rows, eager_sampler_core,
                                 row_temperature)
from ..diffusion.vocab_stream import Bar
from ..diffusion.noise import INIT, hash_tokens
from ..diffusion.params import MAX_STABILITY
from ..image_prompt import image_spans
from ..model.slot_cache import SlotCache, SlotDecodeContext, SlotEncodeContext
from ..structured.constraint import RowLogits
from .request import CanvasLogprobs, Request, SamplingParams
from .scheduler import ScheduledBatch, StepResult

log = logging.getLogger("blockdiff.engine")

KNOB_DTYPES = {"max_denoising_steps": torch.int64, "t_min": torch.float32, "t_span": torch.float32,
               "temp_scale": torch.float32, "greedy": torch.bool, "entropy_bound": torch.float32,
               "confidence_threshold": torch.float32, "stability_threshold": torch.int64, "fixed_steps": torch.bool,
               "top_k": torch.int64, "top_p": torch.float32, "seed": torch.int64}


def knob_values(p: SamplingParams, seed: int) -> dict:
    return {"max_denoising_steps": p.max_denoising_steps, "t_min": p.t_min, "t_span": p.t_max - p.t_min,
            "temp_scale": 1.0 if p.temperature in (0, 1) else p.temperature, "greedy": p.temperature == 0,
            "entropy_bound": p.entropy_bound, "confidence_threshold": p.confidence_threshold,
            "stability_threshold": p.stability_threshold, "fixed_steps": p.fixed_steps, "top_k": p.top_k, "top_p": p.top_p, "seed": seed}


def min_tokens_of(p: SamplingParams) -> int:
    """The tokens before which end-of-sequence ids are barred: none where they end nothing (ignore_eos)
    or where a grammar decides the end (structured output)."""
    return 0 if p.ignore_eos or p.grammar is not None else (p.min_tokens or 0)


def _fail(request: Request, result: StepResult) -> None:
    """Record the exception being handled as this request's failure; its traceback is logged once."""
    err = sys.exc_info()[1]
    log.exception("request %s failed in the engine", request.request_id)
    result.failed[request.request_id] = f"{type(err).__name__}: {err}"


class ModelRunner:
    def __init__(self, model, num_slots: int, max_len: int, sampler_budget_mb: float = 256,
                 compile_sampler: bool = False, tile_step=None, shard=None):
        """`tile_step`: the sampler's step over a tile of rows (see `denoise_rows`; None: the sampler's own);
        `shard`: tensor parallelism's vocabulary slice (`distributed.vocab.VocabShard`) for logprobs."""
        cfg, dev = model.config, model.device
        self.model, self.c, self.device = model, cfg.canvas_length, dev
        self.cache = SlotCache(cfg, num_slots, max_len, model.dtype, dev)
        self.budget = int(sampler_budget_mb * 2**20)
        self.canvas = torch.zeros(num_slots, self.c, dtype=torch.long, device=dev)
        self.soft = torch.zeros(num_slots, self.c, cfg.hidden_size, dtype=model.dtype, device=dev)
        self.history = torch.full((num_slots, MAX_STABILITY, self.c), -1, dtype=torch.long, device=dev)
        self.step_idx = torch.zeros(num_slots, dtype=torch.long, device=dev)
        self.canvas_idx = torch.zeros(num_slots, dtype=torch.long, device=dev)
        self.knobs = {k: torch.zeros(num_slots, dtype=d, device=dev) for k, d in KNOB_DTYPES.items()}
        self.sampler_core = compiled_sampler_core() if compile_sampler else eager_sampler_core(model)
        self.tile_step, self.shard = tile_step, shard
        self.guide_constraints = True       # pin each constrained row's grammar frontier between steps
        self.min_tokens = torch.zeros(num_slots, dtype=torch.long, device=dev)
        self.eos_ids: tuple[int, ...] = ()  # barred before a row's min_tokens (set by the engine)

    # ---- per-slot lifecycle -------------------------------------------------------------------
    def assign(self, slot: int, params: SamplingParams, seed: int) -> None:
        for k, v in knob_values(params, seed).items():
            self.knobs[k][slot] = v
        self.min_tokens[slot] = min_tokens_of(params)
        self.canvas_idx[slot] = -1

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_prefix(src, dst, length)

    @torch.no_grad()
    def prefill(self, slot: int, ids: list[int], start: int, image_embeds: torch.Tensor | None = None) -> None:
        """Encode prompt tokens ids at positions [start, start + len(ids)) of `slot`; `image_embeds`
        (n, H) fill their image tokens."""
        if ids:
            t = torch.tensor([ids], device=self.device)
            slots = torch.tensor([slot], device=self.device)
            starts = torch.tensor([start], device=self.device)
            self._encode(t, slots, starts, start + len(ids), image_embeds)
        self._new_canvas(torch.tensor([slot], device=self.device))

    def _encode(self, ids: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor, span: int,
                image_embeds: torch.Tensor | None = None) -> None:
        cfg = self.model.config
        positions = starts[:, None] + torch.arange(ids.shape[1], device=self.device)
        blocks = self.model.image_blocks(ids) if image_embeds is not None else None
        ctx = SlotEncodeContext(self.cache, slots, starts, ids.shape[1], span, cfg.sliding_window, self.model.dtype,
                                blocks)
        self.model.encode_with(ids, positions, ctx, image_embeds=image_embeds)

    def _new_canvas(self, slots: torch.Tensor) -> None:
        self.canvas_idx[slots] += 1
        self.step_idx[slots] = 0
        self.canvas[slots] = hash_tokens(self.knobs["seed"][slots], self.canvas_idx[slots], self.step_idx[slots],
                                         INIT, self.c, self.model.config.vocab_size)
        self.soft[slots] = 0
        self.history[slots] = -1

    def row_knobs(self, idx: torch.Tensor) -> RowKnobs:
        """The knobs of slots `idx` (R,) as (R,) device tensors."""
        return RowKnobs(**{k: v[idx] for k, v in self.knobs.items()})

    # ---- one scheduled batch ----------------------------------------------------------------------
    def execute(self, batch: ScheduledBatch) -> StepResult:
        result = StepResult()
        embeds = self._image_embeds(batch.prefills, result)
        for request, alloc in batch.prefills:
            if request.request_id not in result.failed:
                self._isolated([request], result, lambda rows, r=request, a=alloc: self._prefill_request(
                    r, a, embeds.get(r.request_id)))
        commits = [c for c in batch.commits if c.request.request_id not in result.failed]
        self._isolated([c.request for c in commits], result, lambda rows: self.commit(
            [commits[i].request.slot for i in rows], [commits[i].start for i in rows], [commits[i].tokens for i in rows]))
        running = [r for r in batch.running if r.request_id not in result.failed]
        self._isolated(running, result, lambda rows: self._denoise_into([running[i] for i in rows], result))
        return result

    @staticmethod
    def _isolated(requests: list[Request], result: StepResult, run: Callable[[list[int]], None]) -> None:
        """`run(rows)` for all rows at once; if it raises, for each row alone, and only the rows
        that still raise are failed."""
        if not requests:
            return
        try:
            return run(list(range(len(requests))))
        except Exception:                              # noqa: BLE001 - any fault belongs to some request
            if len(requests) == 1:
                return _fail(requests[0], result)
        for i, r in enumerate(requests):
            try:
                run([i])
            except Exception:                          # noqa: BLE001
                _fail(r, result)

    def _prefill_request(self, request: Request, alloc, image_embeds: torch.Tensor | None) -> None:
        self.assign(request.slot, request.params, request.seed)
        if alloc.copy_from is not None:
            self.copy_prefix(alloc.copy_from, request.slot, alloc.reuse)
        self.prefill(request.slot, request.prompt_ids[alloc.reuse:], alloc.reuse, image_embeds)

    @torch.no_grad()
    def _image_embeds(self, prefills: list, result: StepResult) -> dict[str, torch.Tensor]:
        """Soft tokens (n_i, H) of the images each admitted request still has to encode (those after
        its reused prefix; a prefix never ends inside an image, whose keys are its content), from one
        vision-tower call; if it fails, one call per request, failing only the requests that raise."""
        todo = []
        for request, alloc in prefills:
            if request.images:
                spans = image_spans(request.prompt_ids, self.model.config.image_token_id)
                first = sum(end <= alloc.reuse for _, end in spans)
                if first < len(request.images):
                    todo.append((request, request.images.select(first)))
        out: dict[str, torch.Tensor] = {}

        def run(rows: list[int]) -> None:
            parts = [todo[i][1] for i in rows]
            feats = self.model.image_features(torch.cat([p.pixel_values for p in parts]),
                                              torch.cat([p.image_position_ids for p in parts]))
            for i, f in zip(rows, feats.split([sum(p.num_soft_tokens) for p in parts])):
                out[todo[i][0].request_id] = f
        self._isolated([r for r, _ in todo], result, run)
        return out

    def _denoise_into(self, requests: list[Request], result: StepResult) -> None:
        use_k = any(r.params.top_k > 0 for r in requests)
        use_p = any(r.params.top_p < 1 for r in requests)
        # only while some row's canvas still holds positions before its min_tokens (canvases are whole)
        bar = bool(self.eos_ids) and any(len(r.output_ids) < min_tokens_of(r.params) for r in requests)
        out, done, hidden = self.denoise([r.slot for r in requests], [r.context_len for r in requests], use_k, use_p,
                                         bar)
        rows = [i for i, d in enumerate(done) if d]
        if rows:
            for i, tokens in zip(rows, out.argmax[rows].tolist()):
                result.finished[requests[i].request_id] = tokens
        constrained = [i for i, r in enumerate(requests) if r.constraint is not None]
        if constrained:                 # before logprobs: those are of the tokens actually committed
            self._constrain([requests[i] for i in constrained], out.argmax[constrained].tolist(),
                            hidden[constrained], [done[i] for i in constrained], result)
        self._logprobs_into([i for i in rows if requests[i].params.logprobs is not None
                             and requests[i].request_id in result.finished], requests, hidden, result)
        framed = [i for i, r in enumerate(requests) if r.frames]
        if framed:
            data = zip(out.argmax[framed].tolist(), out.accept[framed].tolist(), out.max_prob[framed].float().tolist())
            for i, d in zip(framed, data):
                result.frames[requests[i].request_id] = d

    def _constrain(self, requests: list[Request], argmax: list[list[int]], hidden: torch.Tensor, done: list[bool],
                   result: StepResult) -> None:
        """Structured-output rows after a step (their argmax copied to the host once): a finished
        canvas is committed through the grammar (`Constraint.commit`); a running one gets its grammar
        frontier pinned into the canvas of its next step (`Constraint.guide`). Each repaired position
        costs one (V,) row of logits from `hidden` (R, C, H). A grammar fault fails its request alone."""
        head, vocab = self.model.lm_head, self.model.config.vocab_size
        for r, tokens, h, finished in zip(requests, argmax, hidden, done):
            try:
                if finished:
                    result.finished[r.request_id] = r.constraint.commit(tokens, RowLogits(h, head, vocab, self.budget // 4))
                elif self.guide_constraints:
                    pins = r.constraint.guide(tokens, RowLogits(h, head, vocab, 0))
                    if pins:
                        self.canvas[r.slot, :len(pins)] = torch.tensor(pins, device=self.device)
            except Exception:                          # noqa: BLE001 - a grammar fault belongs to its request
                result.finished.pop(r.request_id, None)
                _fail(r, result)

    def _logprobs_into(self, rows: list[int], requests: list[Request], hidden: torch.Tensor,
                       result: StepResult) -> None:
        """Logprobs of the committed canvases of `rows` (those that asked) under the step just run:
        its hidden states (R, C, H) and its temperatures (the step counters have moved on by one)."""
        if not rows:
            return
        idx = torch.tensor([requests[i].slot for i in rows], device=self.device)
        temp = row_temperature(self.row_knobs(idx), self.step_idx[idx] - 1)
        ids = torch.tensor([result.finished[requests[i].request_id] for i in rows], device=self.device)
        n = max(requests[i].params.logprobs for i in rows)
        lp = committed_logprobs(self.model, hidden[rows], temp, ids, n, self.budget, shard=self.shard)
        data = zip(lp.logprob.view(-1, self.c).tolist(), lp.rank.view(-1, self.c).tolist(),
                   lp.top_ids.view(-1, self.c, n).tolist(), lp.top_logprobs.view(-1, self.c, n).tolist())
        for i, (logprob, rank, top_ids, top_logprobs) in zip(rows, data):
            k = requests[i].params.logprobs
            result.logprobs[requests[i].request_id] = CanvasLogprobs(
                logprob, rank, [t[:k] for t in top_ids], [t[:k] for t in top_logprobs])

    # ---- the hot path ---------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, slots: list[int], lengths: list[int], use_k=False, use_p=False, bar=False
                ) -> tuple[StepOut, list[bool], torch.Tensor]:
        """One denoising step for `slots` whose contexts have `lengths`; returns the step's outputs,
        'canvas done' per row and the decoder's hidden states (R, C, H) (for constrained commits).
        `bar`: bar the end-of-sequence ids at positions before a row's min_tokens (canvas k of a
        request holds its new tokens k*C .. k*C + C - 1)."""
        idx = torch.tensor(slots, device=self.device)
        lens = torch.tensor(lengths, device=self.device)
        positions = lens[:, None] + torch.arange(self.c, device=self.device)
        ctx = SlotDecodeContext(self.cache, idx, lens, max(lengths), self.model.config.sliding_window,
                                self.model.dtype)
        hidden = self.model.denoise_with(self.canvas[idx], positions, ctx, self.soft[idx])
        knobs = self.row_knobs(idx)
        barred = None
        if bar:
            new = self.canvas_idx[idx, None] * self.c + torch.arange(self.c, device=self.device)     # (R, C)
            barred = Bar(self.eos_ids, new < self.min_tokens[idx, None])
        out, history = denoise_rows(self.model, hidden, knobs, self.step_idx[idx], self.canvas_idx[idx],
                                    self.history[idx], self.budget, use_k, use_p, self.sampler_core, self.tile_step,
                                    bar=barred)
        self.canvas[idx], self.soft[idx], self.history[idx] = out.next_canvas, out.soft, history
        self.step_idx[idx] += 1
        done = out.stop | (self.step_idx[idx] >= knobs.max_denoising_steps)
        return out, done.tolist(), hidden

    @torch.no_grad()
    def commit(self, slots: list[int], lengths: list[int], tokens: list[list[int]]) -> None:
        """Encode each row's committed canvas (R, C) at its context end and start its next canvas."""
        idx = torch.tensor(slots, device=self.device)
        starts = torch.tensor(lengths, device=self.device)
        self._encode(torch.tensor(tokens, device=self.device), idx, starts, max(lengths) + self.c)
        self._new_canvas(idx)
