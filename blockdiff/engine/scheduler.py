"""Scheduler: admission and the lifecycle of requests. Plain Python: no torch, no tensors.

Each engine step: admit waiting requests while KV slots are free (FIFO), then every running
request takes part in one batched denoising step; requests whose canvas finished are committed or
retired by the engine. Requests of any length and knobs share the batch: each row carries its own
context length and settings.
"""
from __future__ import annotations

import math
from collections import deque

from .slot_allocator import Allocation, SlotAllocator
from .request import Request, Status


class Scheduler:
    def __init__(self, num_slots: int, max_model_len: int, canvas_length: int):
        self.kv = SlotAllocator(num_slots)
        self.max_model_len, self.canvas_length = max_model_len, canvas_length
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

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

    def admit(self) -> list[tuple[Request, Allocation]]:
        admitted = []
        while self.waiting and self.kv.num_free:
            request = self.waiting.popleft()
            alloc = self.kv.allocate(request.prompt_ids)
            request.slot, request.status = alloc.slot, Status.RUNNING
            self.running.append(request)
            admitted.append((request, alloc))
        return admitted

    def retire(self, request: Request) -> None:
        request.status = Status.FINISHED
        if request in self.running:
            self.running.remove(request)
            self.kv.free(request.slot)
        elif request in self.waiting:
            self.waiting.remove(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
