"""AsyncEngine: ONE background thread owns the `LLM`; asyncio code talks to it through queues.

Contract:
- `submit(choices, frames)` (on the event loop) reserves capacity (400 for a request that alone
  exceeds `max_num_seqs + max_queue` choices; 429 when that many are in flight: retry later), queues the choices for the engine thread and returns a
  `RequestGroup`. The thread runs `LLM.step()` while there is work and sleeps on its inbox when
  idle (no busy loop); after each step it hands the group its `RequestOutput`s and, if asked, the
  step's `CanvasFrame`s, with one `loop.call_soon_threadsafe` per group.
- Frames are not queued: a group keeps only the latest frame per choice, so a slow client sees
  fewer frames, never a backlog; the engine thread does no formatting for them.
- `RequestGroup.close()` (always called by the HTTP layer, also on disconnect or timeout) aborts
  whatever is unfinished, so the engine stops working on it and its slot is freed, and releases
  the capacity. (The LLM forgets finished requests itself.)
- A request the engine fails (`finish_reason == "error"`) fails its own group alone; the other
  choices of that group are aborted, every other group goes on. Only if a whole step raises (a
  bookkeeping fault, not one request's) does every in-flight request fail; the thread keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass

from ..engine.engine import LLM
from ..engine.request import CanvasFrame, RequestOutput
from .metrics import Metrics
from .plan import Choice
from .protocol import ApiError

log = logging.getLogger("blockdiff.server")


@dataclass
class Update:
    index: int                      # the OpenAI choice index
    output: RequestOutput
    in_step_seconds: float          # time spent in engine steps this request took part in


class RequestGroup:
    """The engine requests of one HTTP request (n choices x prompts). Lives on the event loop."""

    def __init__(self, engine: AsyncEngine, ids: dict[str, int]):
        self.engine, self.ids = engine, ids                  # engine request id -> choice index
        self.updates: deque[Update] = deque()
        self.frames: dict[int, CanvasFrame] = {}             # choice index -> latest frame
        self.finished: set[int] = set()
        self.error: str | None = None
        self.event = asyncio.Event()
        self.closed = False

    @property
    def done(self) -> bool:
        return self.error is not None or len(self.finished) == len(self.ids)

    def push(self, updates: list[Update], frames: list[tuple[int, CanvasFrame]], error: str | None) -> None:
        self.updates.extend(updates)
        self.frames.update(frames)
        self.finished.update(u.index for u in updates if u.output.finished)
        self.error = self.error or error
        self.event.set()

    async def wait(self, timeout: float) -> None:
        """Until something arrives (an output, a frame, an error) or `timeout` seconds pass. Frames
        already held do not count: the caller may be throttling them."""
        if not self.updates and not self.done:
            self.event.clear()
            try:
                await asyncio.wait_for(self.event.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def take_updates(self) -> list[Update]:
        out = list(self.updates)
        self.updates.clear()
        return out

    def close(self) -> None:
        """Abort the unfinished choices and give the capacity back. Idempotent."""
        if self.closed:
            return
        self.closed = True
        unfinished = [rid for rid, i in self.ids.items() if i not in self.finished]
        if unfinished:
            self.engine.inbox.put(("abort", unfinished))
        self.engine.in_flight -= len(self.ids)


class AsyncEngine:
    def __init__(self, llm: LLM, metrics: Metrics, max_queue: int):
        self.llm, self.metrics = llm, metrics
        self.capacity = llm.num_slots + max_queue
        self.inbox: queue.Queue = queue.Queue()
        self.in_flight = 0                                   # choices submitted and not closed (loop side)
        self.groups: dict[str, RequestGroup] = {}            # engine thread side
        self.busy: dict[str, float] = defaultdict(float)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name="blockdiff-engine", daemon=True)
        self._stop = False

    # ---- event-loop side -------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.llm.healthy

    def submit(self, choices: list[Choice], frames: bool) -> RequestGroup:
        if len(choices) > self.capacity:            # could never run, however long the client waits
            raise ApiError(400, f"this request asks for {len(choices)} choices (prompts x n); this server runs "
                           f"and queues at most {self.capacity} at once", param="n", code="invalid_value")
        if self.in_flight + len(choices) > self.capacity:
            raise ApiError(429, f"the server is at capacity ({self.capacity} choices running or queued); retry later",
                           code="rate_limit_exceeded", type="rate_limit_error")
        ids = {f"cmpl-{uuid.uuid4().hex}": c.index for c in choices}
        group = RequestGroup(self, ids)
        self.in_flight += len(choices)
        self.inbox.put(("add", group, list(zip(ids, choices)), frames))
        return group

    def shutdown(self, timeout: float = 10.0) -> None:
        self.inbox.put(("stop",))
        self.thread.join(timeout)

    # ---- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            self._drain(block=not self.llm.has_unfinished())
            if self._stop or not self.llm.has_unfinished():
                continue
            try:
                self._step()
            except Exception as e:                           # keep serving; fail what was in flight
                log.exception("engine step failed")
                self._fail_all(f"engine error: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")

    def _drain(self, block: bool) -> None:
        try:
            cmd = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            while True:
                self._apply(cmd)
                cmd = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, group, items, frames = cmd
            if group.closed:                                 # the client left before we got here
                return
            for rid, choice in items:
                try:        # plan.py checked everything the engine checks, so this is a server bug
                    self.llm.add_request(choice.prompt, choice.params, request_id=rid, frames=frames)
                except ValueError as e:
                    log.exception("add_request refused a planned request")
                    self._abort([r for r, _ in items], count=False)
                    self._notify(group, [], [], f"engine refused the request: {e}")
                    return
                self.groups[rid] = group
        elif cmd[0] == "abort":
            self._abort(cmd[1])
        elif cmd[0] == "stop":
            self._stop = True

    def _abort(self, rids: list[str], count: bool = True) -> None:
        for rid in rids:
            if rid in self.groups or not count:
                self.llm.abort(rid)
                if count:
                    self.metrics.on_abort()
                self._forget(rid)
        self.metrics.on_step(len(self.llm.running_ids), self.llm.num_waiting)

    def _notify(self, group: RequestGroup, updates: list, frames: list, error: str | None) -> None:
        try:
            self.loop.call_soon_threadsafe(group.push, updates, frames, error)
        except RuntimeError:                                 # the event loop is already closed
            pass

    def _step(self) -> None:
        t0 = time.perf_counter()
        outputs = self.llm.step()
        dt = time.perf_counter() - t0
        for rid in set(self.llm.running_ids) | {o.request_id for o in outputs}:
            self.busy[rid] += dt
        per_group: dict[RequestGroup, tuple[list, list]] = {}
        for f in self.llm.frames:
            group = self.groups.get(f.request_id)
            if group is not None:
                per_group.setdefault(group, ([], []))[1].append((group.ids[f.request_id], f))
        failed: dict[RequestGroup, str] = {}
        for out in outputs:
            group = self.groups.get(out.request_id)
            self.metrics.on_output(out)
            if group is None:
                continue
            if out.finish_reason == "error":
                failed[group] = f"engine error: {out.error}"
            else:
                update = Update(group.ids[out.request_id], out, self.busy[out.request_id])
                per_group.setdefault(group, ([], []))[0].append(update)
            if out.finished:
                self._forget(out.request_id)
        self.metrics.on_step(len(self.llm.running_ids), self.llm.num_waiting)
        for group in set(per_group) | set(failed):
            updates, frames = per_group.get(group, ([], []))
            self._notify(group, updates, frames, failed.get(group))

    def _forget(self, rid: str) -> None:
        self.groups.pop(rid, None)
        self.busy.pop(rid, None)

    def _fail_all(self, message: str) -> None:
        for rid, group in list(self.groups.items()):
            try:
                self.llm.abort(rid)
            except Exception:                                # the engine may be broken; drop it anyway
                log.exception("abort failed")
            self._forget(rid)
            self._notify(group, [], [], message)
        self.metrics.on_step(len(self.llm.running_ids), self.llm.num_waiting)
