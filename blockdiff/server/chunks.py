"""OpenAI response bodies: completions, chat completions, their stream chunks, usage, frames.

Plain dict builders, no I/O. Namespaced extras, which the openai clients keep as extra attributes:
- `blockdiff_timings` (beside `usage`): canvases, denoising_steps, time_to_first_token_s,
  latency_s, tokens_per_second (end to end) and in_step_tokens_per_second (completion tokens over
  the time spent in the engine steps this request took part in; for n > 1 the longest choice's).
- `logprobs` of a choice (requests that ask): see `logprob_format.py`; a stream chunk's entries cover its text.
- `blockdiff_frame` on a denoising-frame chunk: {index, canvas, step, max_steps, token_ids,
  tokens, accepted, max_prob}. Its one choice has an empty delta (chat) or empty text
  (completions) and no finish_reason, so a client that does not know frames sees a no-op chunk.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ..engine.request import CanvasFrame, RequestOutput
from ..tokenizer import Tokenizer
from .async_engine import Update
from .logprob_format import chat_logprobs, completion_logprobs
from .plan import Plan


@dataclass
class Totals:
    """What the choices of one request add up to; fed every Update."""
    start: float = field(default_factory=time.perf_counter)
    tokens: dict[int, int] = field(default_factory=dict)
    canvases: dict[int, int] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)
    in_step_s: dict[int, float] = field(default_factory=dict)
    ttft: float | None = None

    def add(self, u: Update) -> None:
        s = u.output.stats
        self.tokens[u.index] = len(u.output.token_ids)
        self.canvases[u.index], self.steps[u.index] = s.canvases, sum(s.steps_per_canvas)
        self.in_step_s[u.index] = u.in_step_seconds
        if s.time_to_first_token is not None:
            self.ttft = min(self.ttft or s.time_to_first_token, s.time_to_first_token)

    def usage(self, prompt_tokens: int) -> dict:
        completion = sum(self.tokens.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def timings(self) -> dict:
        latency = time.perf_counter() - self.start
        tokens, in_step = sum(self.tokens.values()), max(self.in_step_s.values(), default=0.0)
        return {"canvases": sum(self.canvases.values()), "denoising_steps": sum(self.steps.values()),
                "time_to_first_token_s": self.ttft, "latency_s": latency,
                "tokens_per_second": tokens / latency if latency > 0 else None,
                "in_step_tokens_per_second": tokens / in_step if in_step > 0 else None}


class Formatter:
    def __init__(self, plan: Plan, tokenizer: Tokenizer):
        self.plan, self.tokenizer, self.chat = plan, tokenizer, plan.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.top_n = {c.index: c.params.logprobs for c in plan.choices}

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.plan.model}

    def chunk(self, choices: list[dict], **extra) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": choices,
                **extra}

    def delta(self, index: int, text: str, finish_reason: str | None = None, role: bool = False,
              logprobs: dict | None = None) -> dict:
        if self.chat:
            d = ({"role": "assistant", "content": text} if role else {"content": text} if text else {})
            return {"index": index, "delta": d, "finish_reason": finish_reason, "logprobs": logprobs}
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}

    def logprobs(self, index: int, out: RequestOutput, delta: bool = False) -> dict | None:
        """The choice's logprobs object (of its delta's tokens when streaming); None if not asked."""
        entries = out.delta_logprobs if delta else out.logprobs
        if entries is None:
            return None
        if self.chat:
            return chat_logprobs(entries, self.top_n[index], self.tokenizer)
        return completion_logprobs(entries, out.text_offsets[len(out.logprobs) - len(entries):])

    def frame(self, frame: CanvasFrame, index: int) -> dict:
        payload = {"index": index, "canvas": frame.canvas, "step": frame.step, "max_steps": frame.max_steps,
                   "token_ids": frame.tokens, "tokens": [self.tokenizer.decode([t]) for t in frame.tokens],
                   "accepted": frame.accepted, "max_prob": [round(c, 4) for c in frame.max_prob]}
        return self.chunk([self.delta(index, "")], blockdiff_frame=payload)

    def usage_chunk(self, totals: Totals) -> dict:
        return self.chunk([], usage=totals.usage(self.plan.prompt_tokens), blockdiff_timings=totals.timings())

    def response(self, finals: dict[int, Update], totals: Totals) -> dict:
        choices = []
        for index in sorted(finals):
            out = finals[index].output
            if self.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": out.text},
                                "finish_reason": out.finish_reason, "logprobs": self.logprobs(index, out)})
            else:
                choices.append({"index": index, "text": out.text, "finish_reason": out.finish_reason,
                                "logprobs": self.logprobs(index, out)})
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": totals.usage(self.plan.prompt_tokens), "blockdiff_timings": totals.timings()}


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"
