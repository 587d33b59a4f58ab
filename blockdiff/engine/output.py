"""OutputProcessor: turns finished canvases into what the user sees. Plain Python: no torch.

For each finished canvas of a request it applies EOS, `max_tokens` and stop strings, decodes the
text, decides whether the request is finished, computes the streaming delta and the stats, and
returns a `RequestOutput`. Its state lives in the `Request` record (output_ids, text, sent,
finish_reason). Guarantees: never more than `max_tokens` ids; text ends before the first EOS and
before the first stop string; a streamed delta never contains a partial UTF-8 character (decoded
text ending in U+FFFD is held back) nor a prefix of a stop string that the next canvas might
complete. It also turns the runner's per-row frame data into `CanvasFrame`s.
"""
from __future__ import annotations

import bisect
import time
from typing import Callable

from .request import CanvasFrame, CanvasLogprobs, Logprob, Request, RequestOutput, RequestStats

REPLACEMENT = "\ufffd"


class OutputProcessor:
    def __init__(self, decode: Callable[[list[int]], str], eos_ids: set[int],
                 decode_token: Callable[[int], str] | None = None):
        """`decode_token`: one token's text for logprob entries (special tokens by name); default `decode`."""
        self.decode, self.eos_ids = decode, eos_ids
        self.decode_token = decode_token or (lambda t: decode([t]))

    def on_canvas(self, req: Request, canvas_ids: list[int], logprobs: CanvasLogprobs | None = None) -> RequestOutput:
        """Consume one finished canvas (and its logprobs, if asked); sets `req.finish_reason` when the
        request is done."""
        req.first_token_time = req.first_token_time or time.perf_counter()
        start = len(req.output_ids)
        self._append(req, canvas_ids)
        if logprobs is not None:
            req.logprobs += [self._entry(canvas_ids[j], logprobs, j) for j in range(len(req.output_ids) - start)]
        req.text = self.decode(req.output_ids)
        self._apply_stop(req)
        if req.params.logprobs is not None:
            self._token_ends(req)
        return self.output(req, self._delta(req), req.output_ids[start:])

    def _entry(self, token: int, lp: CanvasLogprobs, j: int) -> dict[int, Logprob]:
        """Position j's entry: the token itself first, then its top-N alternatives (vLLM's layout)."""
        entry = {token: Logprob(lp.logprob[j], lp.rank[j], self.decode_token(token))}
        for rank, (t, value) in enumerate(zip(lp.top_ids[j], lp.top_logprobs[j]), 1):
            entry.setdefault(t, Logprob(value, rank, self.decode_token(t)))
        return entry

    def _token_ends(self, req: Request) -> None:
        """Cut the entries with the ids (stop strings) and find where each new token's text ends:
        the decoded prefix through it, less a trailing partial character, within `text`."""
        n, cap = len(req.output_ids), len(req.text)
        del req.logprobs[n:]
        ends = [min(e, cap) for e in req.token_ends[:n]]
        for i in range(len(ends), n):
            end = len(self.decode(req.output_ids[:i + 1]).rstrip(REPLACEMENT))
            ends.append(min(max(end, ends[-1] if ends else 0), cap))
        req.token_ends = ends

    def _append(self, req: Request, canvas_ids: list[int]) -> None:
        p = req.params
        for tok in canvas_ids:
            if len(req.output_ids) >= p.max_tokens:
                req.finish_reason = "length"
                return
            if tok in self.eos_ids and not p.ignore_eos:
                req.finish_reason = "stop"
                return
            req.output_ids.append(tok)
        if len(req.output_ids) >= p.max_tokens:
            req.finish_reason = "length"

    def _apply_stop(self, req: Request) -> None:
        hits = [i for i in (req.text.find(s) for s in req.params.stop if s) if i >= 0]
        if not hits:
            return
        cut = min(hits)
        req.text = req.text[:cut]
        req.finish_reason = "stop"
        # keep the shortest id prefix whose text covers everything before the stop string
        n = next(n for n in range(len(req.output_ids) + 1) if len(self.decode(req.output_ids[:n])) >= cut)
        del req.output_ids[n:]

    def _delta(self, req: Request) -> str:
        end = len(req.text)
        if req.finish_reason is None:
            while end > req.sent and req.text[end - 1] == REPLACEMENT:    # incomplete UTF-8 bytes
                end -= 1
            hold = max((len(s) - 1 for s in req.params.stop), default=0)  # a stop string may straddle canvases
            end = max(req.sent, end - hold)
        delta = req.text[req.sent:end]
        req.sent = end
        return delta

    def output(self, req: Request, delta: str = "", delta_ids: list[int] | None = None) -> RequestOutput:
        done = req.finished or req.finish_reason is not None
        end = req.finish_time or time.perf_counter()
        latency = end - req.arrival
        stats = RequestStats(req.canvases, list(req.steps_per_canvas),
                             None if req.first_token_time is None else req.first_token_time - req.arrival,
                             latency if done else None,
                             len(req.output_ids) / latency if done and latency > 0 else None)
        text = req.text if done else req.text[:req.sent]
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, text, list(req.output_ids), done,
                             req.finish_reason, stats, delta, list(delta_ids or []), req.error,
                             *self._released_logprobs(req, done))

    @staticmethod
    def _released_logprobs(req: Request, done: bool) -> tuple:
        """(entries, text offsets, entries new since the last output) of the tokens whose text is
        sent; (None, None, None) for a request that did not ask."""
        if req.params.logprobs is None:
            return None, None, None
        k = len(req.logprobs) if done else max(req.logprobs_sent, bisect.bisect_right(req.token_ends, req.sent))
        delta, req.logprobs_sent = req.logprobs[req.logprobs_sent:k], k
        return req.logprobs[:k], ([0] + req.token_ends)[:k], delta

    @staticmethod
    def frames(running: list[Request], data: dict[str, tuple[list[int], list[bool], list[float]]]) -> list[CanvasFrame]:
        """`data`: request id -> (tokens, accepted, max_prob) of the step just run, for rows that asked.
        Called before the scheduler advances the counters: this step is number steps_in_canvas + 1."""
        return [CanvasFrame(r.request_id, r.canvases, r.steps_in_canvas + 1, r.params.max_denoising_steps,
                            *data[r.request_id]) for r in running if r.request_id in data]
