"""Scheduler: admission, the lifecycle of requests and their KV bookkeeping. Plain Python: no torch.

Each engine step is `schedule()` -> the runner executes the `ScheduledBatch` -> `update_from_output()`:
- `schedule()` admits waiting requests while KV slots are free (FIFO) as prefills, moves every
  finished canvas that continues into the batch's commits (its tokens are recorded as encoded in
  the slot), and lists every running request for one batched denoising step. Requests of any
  length and knobs share the batch: each row carries its own context length and settings.
- `update_from_output()` advances each request's canvas counters from the runner's `StepResult`,
  retires the requests the runner failed, and returns the finished canvases.
The engine then lets the output processor decide, per finished canvas, whether the request is
done (`retire`) or continues (`queue_commit`, encoded at the next `schedule()`).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from .request import CanvasLogprobs, Request, Status
from .slot_allocator import Allocation, SlotAllocator


@dataclass
class Commit:
    request: Request
    start: int                  # first position of the canvas in the slot
    tokens: list[int]           # (C,) the finished canvas


@dataclass
class ScheduledBatch:
    prefills: list[tuple[Request, Allocation]] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)
    running: list[Request] = field(default_factory=list)      # one denoising step each

    @property
    def empty(self) -> bool:
        return not (self.prefills or self.commits or self.running)


@dataclass
class StepResult:
    """What the runner reports for one `ScheduledBatch`, keyed by request id."""
    finished: dict[str, list[int]] = field(default_factory=dict)   # canvas done: its argmax tokens (C,)
    frames: dict[str, tuple[list[int], list[bool], list[float]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)           # request id -> error message
    logprobs: dict[str, CanvasLogprobs] = field(default_factory=dict)   # finished canvases that asked


class Scheduler:
    def __init__(self, num_slots: int, max_model_len: int, canvas_length: int, ring_slack: int | None = None):
        self.kv = SlotAllocator(num_slots, ring_slack=ring_slack)
        self.max_model_len, self.canvas_length = max_model_len, canvas_length
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def num_slots(self) -> int:
        return len(self.kv.busy)

    def capacity_needed(self, prompt_len: int, max_tokens: int) -> int:
        """Positions a request can occupy: prompt plus whole canvases (the last is never encoded)."""
        return prompt_len + math.ceil(max_tokens / self.canvas_length) * self.canvas_length

    def add(self, request: Request) -> None:
        need = self.capacity_needed(len(request.prompt_ids), request.params.max_tokens)
        if need > self.max_model_len:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_tokens "
                             f"({request.params.max_tokens}, in whole canvases of {self.canvas_length}) "
                             f"exceeds max_model_len={self.max_model_len}")
        self.waiting.append(request)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch(prefills=self._admit())
        for request, alloc in batch.prefills:
            self.kv.extend(request.slot, request.cache_keys[alloc.reuse:])
        for request in self.running:
            if request.pending_commit is not None:
                batch.commits.append(Commit(request, request.context_len, request.pending_commit))
                self.kv.extend(request.slot, request.pending_commit)
                request.committed_ids.extend(request.pending_commit)
                request.pending_commit = None
        batch.running = list(self.running)
        return batch

    def _admit(self) -> list[tuple[Request, Allocation]]:
        admitted = []
        while self.waiting and self.kv.num_free:
            request = self.waiting.popleft()
            alloc = self.kv.allocate(request.cache_keys)
            request.slot, request.status = alloc.slot, Status.RUNNING
            self.running.append(request)
            admitted.append((request, alloc))
        return admitted

    def update_from_output(self, batch: ScheduledBatch, result: StepResult) -> list[tuple[Request, list[int]]]:
        """Advance canvas counters; retire failed requests; return (request, tokens) per finished canvas."""
        finished = []
        for request in batch.running:
            if request.request_id in result.failed:
                request.finish_reason, request.error = "error", result.failed[request.request_id]
                self.retire(request, keep_prefix=False)     # its slot's K/V may be half written
                continue
            request.steps_in_canvas += 1
            tokens = result.finished.get(request.request_id)
            if tokens is not None:
                request.canvases += 1
                request.steps_per_canvas.append(request.steps_in_canvas)
                request.steps_in_canvas = 0
                finished.append((request, tokens))
        return finished

    def queue_commit(self, request: Request, tokens: list[int]) -> None:
        """The request continues: encode its finished canvas at the next `schedule()`."""
        request.pending_commit = list(tokens)

    def retire(self, request: Request, keep_prefix: bool = True) -> None:
        request.status = Status.FINISHED
        request.finish_time = request.finish_time or time.perf_counter()
        if request in self.running:
            self.running.remove(request)
            self.kv.free(request.slot, keep_prefix)
        elif request in self.waiting:
            self.waiting.remove(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
