"""ModelRunner: the only place where scheduled work becomes device tensors.

It owns the slot KV cache and each slot's denoising state (canvas, self-conditioning soft
embedding, argmax history, step and canvas counters, knobs), all preallocated and written by
index. Three operations:
- `prefill(slot, ids, start)`: encode a prompt's uncached tokens into a slot;
- `denoise(slots, lengths)`: one batched denoising step for many slots; returns which canvases are
  done (the only host sync of a step);
- `commit(slots, lengths, tokens)`: encode finished canvases into their slots and start new ones.
"""
from __future__ import annotations

import torch

from ..diffusion.sampler import RowKnobs, StepOut, compiled_sampler_core, denoise_rows, eager_sampler_core
from ..diffusion.noise import INIT, hash_tokens
from ..diffusion.params import MAX_STABILITY
from ..model.slot_cache import SlotCache, SlotDecodeContext, SlotEncodeContext
from .request import SamplingParams

KNOB_DTYPES = {"max_denoising_steps": torch.int64, "t_min": torch.float32, "t_span": torch.float32,
               "temp_scale": torch.float32, "greedy": torch.bool, "entropy_bound": torch.float32,
               "confidence_threshold": torch.float32, "stability_threshold": torch.int64, "fixed_steps": torch.bool,
               "top_k": torch.int64, "top_p": torch.float32, "seed": torch.int64}


def knob_values(p: SamplingParams, seed: int) -> dict:
    return {"max_denoising_steps": p.max_denoising_steps, "t_min": p.t_min, "t_span": p.t_max - p.t_min,
            "temp_scale": 1.0 if p.temperature in (0, 1) else p.temperature, "greedy": p.temperature == 0,
            "entropy_bound": p.entropy_bound, "confidence_threshold": p.confidence_threshold,
            "stability_threshold": p.stability_threshold, "fixed_steps": p.fixed_steps, "top_k": p.top_k, "top_p": p.top_p, "seed": seed}


class ModelRunner:
    def __init__(self, model, num_slots: int, max_len: int, sampler_budget_mb: float = 256,
                 compile_sampler: bool = False):
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
        self.last: StepOut | None = None
        self.sampler_core = compiled_sampler_core() if compile_sampler else eager_sampler_core(model)

    # ---- per-slot lifecycle -------------------------------------------------------------------
    def assign(self, slot: int, params: SamplingParams, seed: int) -> None:
        for k, v in knob_values(params, seed).items():
            self.knobs[k][slot] = v
        self.canvas_idx[slot] = -1

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_prefix(src, dst, length)

    @torch.no_grad()
    def prefill(self, slot: int, ids: list[int], start: int) -> None:
        """Encode prompt tokens ids at positions [start, start + len(ids)) of `slot`."""
        if ids:
            t = torch.tensor([ids], device=self.device)
            slots = torch.tensor([slot], device=self.device)
            starts = torch.tensor([start], device=self.device)
            self._encode(t, slots, starts, start + len(ids))
        self._new_canvas(torch.tensor([slot], device=self.device))

    def _encode(self, ids: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor, span: int) -> None:
        cfg = self.model.config
        positions = starts[:, None] + torch.arange(ids.shape[1], device=self.device)
        ctx = SlotEncodeContext(self.cache, slots, starts, ids.shape[1], span, cfg.sliding_window, self.model.dtype)
        self.model.encode_with(ids, positions, ctx)

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

    # ---- the hot path ---------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, slots: list[int], lengths: list[int], use_k=False, use_p=False) -> list[bool]:
        """One denoising step for `slots` whose contexts have `lengths`; returns 'canvas done' per row."""
        idx = torch.tensor(slots, device=self.device)
        lens = torch.tensor(lengths, device=self.device)
        positions = lens[:, None] + torch.arange(self.c, device=self.device)
        ctx = SlotDecodeContext(self.cache, idx, lens, max(lengths), self.model.config.sliding_window,
                                self.model.dtype)
        hidden = self.model.denoise_with(self.canvas[idx], positions, ctx, self.soft[idx])
        knobs = self.row_knobs(idx)
        out, history = denoise_rows(self.model, hidden, knobs, self.step_idx[idx], self.canvas_idx[idx],
                                    self.history[idx], self.budget, use_k, use_p, self.sampler_core)
        self.canvas[idx], self.soft[idx], self.history[idx] = out.next_canvas, out.soft, history
        self.step_idx[idx] += 1
        done = out.stop | (self.step_idx[idx] >= knobs.max_denoising_steps)
        self.last = out
        return done.tolist()

    @torch.no_grad()
    def commit(self, slots: list[int], lengths: list[int], tokens: torch.Tensor) -> None:
        """Encode each row's committed canvas (R, C) at its context end and start its next canvas."""
        idx = torch.tensor(slots, device=self.device)
        starts = torch.tensor(lengths, device=self.device)
        self._encode(tokens.to(self.device), idx, starts, max(lengths) + self.c)
        self._new_canvas(idx)
