"""Turning committed canvases into user-visible text: EOS, max_tokens, stop strings, streaming deltas.

Plain Python. A `TextState` receives each committed canvas's token ids and answers the new text to
stream and whether the request is finished. Guarantees: never more than `max_tokens` ids; text ends
before the first EOS and before the first stop string; a streamed delta never contains a partial
UTF-8 character (decoded text ending in U+FFFD is held back) nor a prefix of a stop string that the
next canvas might complete.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

REPLACEMENT = "\ufffd"


@dataclass
class TextState:
    decode: Callable[[list[int]], str]
    eos_ids: set[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0                      # characters of `text` already streamed
    finish_reason: str | None = None

    def add(self, canvas_ids: list[int]) -> str:
        """Consume one committed canvas; return the new text that is safe to stream."""
        for tok in canvas_ids:
            if len(self.ids) >= self.max_tokens:
                self.finish_reason = "length"
                break
            if tok in self.eos_ids and not self.ignore_eos:
                self.finish_reason = "stop"
                break
            self.ids.append(tok)
        if self.finish_reason is None and len(self.ids) >= self.max_tokens:
            self.finish_reason = "length"
        self.text = self.decode(self.ids)
        self._apply_stop()
        return self._delta()

    def _apply_stop(self) -> None:
        hits = [i for i in (self.text.find(s) for s in self.stop if s) if i >= 0]
        if not hits:
            return
        cut = min(hits)
        self.text = self.text[:cut]
        self.finish_reason = "stop"
        # keep the shortest id prefix whose text covers everything before the stop string
        n = next(n for n in range(len(self.ids) + 1) if len(self.decode(self.ids[:n])) >= cut)
        del self.ids[n:]

    def _delta(self) -> str:
        end = len(self.text)
        if self.finish_reason is None:
            while end > self.sent and self.text[end - 1] == REPLACEMENT:    # incomplete UTF-8 bytes
                end -= 1
            hold = max((len(s) - 1 for s in self.stop), default=0)         # a stop string may straddle canvases
            end = max(self.sent, end - hold)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
