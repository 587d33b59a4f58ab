"""What crosses from the driver to the workers each step: the scheduled batch, cut down.

Contract: `to_wire(batch)` is a `ScheduledBatch` whose requests are `WireRequest`s carrying only
what `ModelRunner.execute` reads of a `Request` (the prompt and its images only in prefills), so a step's message
does not grow with the requests' outputs. Plain data: it pickles.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..engine.request import Request, SamplingParams
from ..engine.scheduler import Commit, ScheduledBatch


@dataclass
class WireRequest:
    request_id: str
    slot: int
    params: SamplingParams
    seed: int
    context_len: int
    frames: bool
    prompt_ids: list[int] = field(default_factory=list)
    images: Any = None                 # the prompt's image inputs (prefills only)
    constraint: Any = None             # structured output runs on one device only: always None here


def _cut(r: Request, prompt: bool = False) -> WireRequest:
    return WireRequest(r.request_id, r.slot, r.params, r.seed, r.context_len, r.frames,
                       r.prompt_ids if prompt else [], r.images if prompt else None)


def to_wire(batch: ScheduledBatch) -> ScheduledBatch:
    return ScheduledBatch(prefills=[(_cut(r, prompt=True), a) for r, a in batch.prefills],
                          commits=[Commit(_cut(c.request), c.start, c.tokens) for c in batch.commits],
                          running=[_cut(r) for r in batch.running])
