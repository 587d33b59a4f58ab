"""Turning a `RequestGroup` into an HTTP answer: one JSON body, or an SSE stream.

Contract:
- `collect` waits for every choice and returns the response body; it raises ApiError 504 past the
  request timeout and 499-style `Disconnected` when the client goes away (the caller closes the
  group either way, which aborts the unfinished choices).
- `stream_events` yields SSE `data:` lines: for chat a first role chunk per choice, then text as
  each canvas commits (the engine never splits a UTF-8 character nor leaks a stop string) with the
  logprobs of the tokens that text covers (if asked), a chunk
  with each choice's finish_reason, the usage chunk only with stream_options.include_usage, and
  always `data: [DONE]`. A failure or timeout mid-stream sends an OpenAI error object (the openai
  client raises it) and then [DONE]. Frames (only if asked) go out at most `max_fps` per choice,
  latest first; frames of an already committed canvas are dropped.
- `SSEResponse` calls `on_close` however the response ends (done, disconnect, cancellation).
"""
from __future__ import annotations

import time
from typing import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import StreamingResponse

from .async_engine import RequestGroup
from .chunks import Formatter, Totals, sse
from .plan import Plan
from .protocol import ApiError

POLL_S = 0.25        # how often an idle request checks for a disconnected client


class Disconnected(Exception):
    pass


def _timeout_error(timeout: float) -> ApiError:
    return ApiError(504, f"the request did not finish within {timeout:g} s", code="timeout", type="timeout_error")


async def collect(group: RequestGroup, fmt: Formatter, request: Request, timeout: float) -> dict:
    totals, finals = Totals(), {}
    deadline = time.monotonic() + timeout
    while True:
        for u in group.take_updates():
            totals.add(u)
            if u.output.finished:
                finals[u.index] = u
        if group.error is not None:
            raise ApiError(500, group.error, type="server_error", code="engine_error")
        if group.done:
            return fmt.response(finals, totals)
        if time.monotonic() > deadline:
            raise _timeout_error(timeout)
        await group.wait(min(POLL_S, max(0.0, deadline - time.monotonic())))
        if await request.is_disconnected():
            raise Disconnected()


async def stream_events(group: RequestGroup, fmt: Formatter, plan: Plan, request: Request,
                        timeout: float) -> AsyncIterator[str]:
    totals, committed = Totals(), {}                         # committed: choice index -> canvases
    deadline = time.monotonic() + timeout
    interval = 1.0 / plan.frames.max_fps if plan.frames else 0.0
    last_frame: dict[int, float] = {}
    if fmt.chat:
        for c in plan.choices:
            yield sse(fmt.chunk([fmt.delta(c.index, "", role=True)]))
    while True:
        for u in group.take_updates():
            totals.add(u)
            committed[u.index] = u.output.stats.canvases
            if u.output.delta_text or u.output.finished or u.output.delta_logprobs:
                yield sse(fmt.chunk([fmt.delta(u.index, u.output.delta_text, u.output.finish_reason,
                                               logprobs=fmt.logprobs(u.index, u.output, delta=True))]))
        if group.error is not None:
            yield sse(ApiError(500, group.error, type="server_error", code="engine_error").body())
            break
        if group.done:
            if plan.include_usage:
                yield sse(fmt.usage_chunk(totals))
            break
        wait = POLL_S
        for index, frame in list(group.frames.items()):
            if frame.canvas < committed.get(index, 0) or index in group.finished:
                del group.frames[index]                      # stale: that canvas is already text
                continue
            due = last_frame.get(index, 0.0) + interval - time.monotonic()
            if due <= 0:
                del group.frames[index]
                last_frame[index] = time.monotonic()
                yield sse(fmt.frame(frame, index))
            else:
                wait = min(wait, due)
        if time.monotonic() > deadline:
            yield sse(_timeout_error(timeout).body())
            break
        await group.wait(max(0.0, min(wait, deadline - time.monotonic())))
        if await request.is_disconnected():
            return
    yield sse("[DONE]")


class SSEResponse(StreamingResponse):
    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
