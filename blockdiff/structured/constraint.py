"""Constraint: one request's grammar matcher and the constrained commit of its canvases.

Block diffusion commits a whole canvas at once: the argmax of the last denoising step at every
position. `Constraint.commit(argmax, logits_at)` turns that canvas into one the grammar accepts,
left to right, and advances the matcher over it, so the next canvas continues from there:
- the longest prefix of the argmax that the grammar accepts is kept as it is (one llguidance
  `validate_tokens` call checks a whole run);
- at the first position whose argmax the grammar refuses, the token is the argmax of that
  position's logits under the grammar's mask (`logits_at(i)`: (V,) logits of position i, computed
  only for such positions), and the scan goes on from the next position;
- once the grammar may end and the canvas says end of sequence there (or the masked argmax is an
  end-of-sequence id), or once the grammar can only end, the rest of the canvas is EOS.
So an output that ends with EOS is a complete match of the grammar, whatever the model, and one
cut by `max_tokens` is a prefix of one. On an exception the matcher is rolled back: a canvas
either commits whole or not at all.
`mask()` gives the grammar's next-token mask from the matcher's state (the position after the
committed text).
"""
from __future__ import annotations

from typing import Callable

import llguidance
import numpy as np
import torch


class Constraint:
    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_ids: list[int]):
        self.matcher, self.vocab_size = matcher, vocab_size
        self.eos_ids, self.eos = frozenset(eos_ids), min(eos_ids)
        self.ended = False            # the committed text is a complete match: only EOS follows

    def mask(self) -> torch.Tensor:
        """(V,) bool: the tokens the grammar allows next (EOS ids where it may end)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[:self.vocab_size].view(np.bool_))

    def commit(self, argmax: list[int], logits_at: Callable[[int], torch.Tensor]) -> list[int]:
        """The canvas to commit instead of `argmax` (C,); advances the matcher over it."""
        out: list[int] = []
        ended = self.ended
        try:
            while len(out) < len(argmax):
                if self.ended or self.matcher.is_stopped():
                    self.ended = True
                    out.extend([self.eos] * (len(argmax) - len(out)))
                    break
                self._step(argmax, out, logits_at)
        except Exception:
            self.matcher.rollback(sum(1 for t in out if t not in self.eos_ids))
            self.ended = ended
            raise
        return out

    def _step(self, argmax: list[int], out: list[int], logits_at: Callable[[int], torch.Tensor]) -> None:
        """Extend `out` by the accepted run of the argmax, or by one masked-argmax token, or end."""
        if self.matcher.is_error():
            raise RuntimeError(f"the grammar matcher failed: {self.matcher.get_error()}")
        i = len(out)
        run = []
        for tok in argmax[i:]:
            if tok in self.eos_ids:
                break
            run.append(tok)
        n = self.matcher.validate_tokens(run) if run else 0
        if n:
            self._consume(run[:n])
            out.extend(run[:n])
            return
        if argmax[i] in self.eos_ids and self.matcher.is_accepting():
            self.ended = True
            return
        logits = logits_at(i).float()
        tok = int(logits.masked_fill(~self.mask(), float("-inf")).argmax())
        if tok in self.eos_ids:
            self.ended = True
            return
        self._consume([tok])
        out.append(tok)

    def _consume(self, tokens: list[int]) -> None:
        if not self.matcher.consume_tokens(tokens):
            raise RuntimeError(f"the grammar matcher refused tokens it had accepted: {self.matcher.get_error()}")


class RowLogits:
    """`logits_at` for one row: (V,) LM-head logits of position i from hidden (C, H), computed in
    chunks of positions (a chunk's (k, V) fp32 logits within `budget_bytes`) and only on demand."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, budget_bytes: int):
        self.hidden, self.weight = hidden, weight
        self.chunk = max(1, min(hidden.shape[0], budget_bytes // (4 * weight.shape[0])))
        self.start, self.block = -1, None

    def __call__(self, pos: int) -> torch.Tensor:
        start = pos - pos % self.chunk
        if start != self.start:
            self.start = start
            self.block = torch.nn.functional.linear(self.hidden[start:start + self.chunk], self.weight).float()
        return self.block[pos - start]


def compile_constraint(compiler, spec) -> Constraint:
    """A fresh constraint for one request (`compiler`: `grammar.GrammarCompiler`)."""
    return Constraint(compiler.matcher(spec), compiler.vocab_size, compiler.eos_ids)
