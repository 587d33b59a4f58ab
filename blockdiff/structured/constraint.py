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
`guide(argmax, logits_at)` is the same scan with one repair, plus the tokens the grammar forces after
it, without moving the matcher: the runner pins these tokens into the canvas the next denoising step
sees (a grammar frontier that advances at least one token a step), so the model denoises around a
valid prefix and the JSON skeleton rather than around noise.
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
        self.committed = self.repaired = 0    # committed tokens (EOS fill excluded), how many were repairs

    @property
    def complete(self) -> bool:
        """The committed text is a whole match that cannot go on: only EOS may follow."""
        return self.ended or self.matcher.is_stopped()

    def mask(self) -> torch.Tensor:
        """(V,) bool: the tokens the grammar allows next (EOS ids where it may end)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[:self.vocab_size].view(np.bool_))

    def commit(self, argmax: list[int], logits_at: Callable[[int], torch.Tensor]) -> list[int]:
        """The canvas to commit instead of `argmax` (C,); advances the matcher over it."""
        out = self._decode(argmax, logits_at, len(argmax))
        kept = [t for t in out if t not in self.eos_ids]
        self.committed += len(kept)
        self.repaired += sum(a != t for a, t in zip(argmax, kept))
        return out

    def guide(self, argmax: list[int], logits_at: Callable[[int], torch.Tensor]) -> list[int]:
        """Tokens to pin at the start of the next denoising step's canvas: the longest valid prefix of
        `argmax`, one repaired token after it, then the tokens the grammar forces from there (or
        EOS to the end once it has ended). The matcher is left as it was."""
        ended = self.ended
        out = self._decode(argmax, logits_at, 1)
        consumed = sum(1 for t in out if t not in self.eos_ids)
        try:
            if not self.ended and len(out) < len(argmax):
                out += self.matcher.compute_ff_tokens()[:len(argmax) - len(out)]
        finally:
            self.matcher.rollback(consumed)
            self.ended = ended
        return out

    def _decode(self, argmax: list[int], logits_at: Callable[[int], torch.Tensor], max_repairs: int) -> list[int]:
        """Consume the constrained version of `argmax`, stopping after `max_repairs` repaired
        tokens; on an exception the matcher is rolled back."""
        out: list[int] = []
        ended, repairs = self.ended, 0
        try:
            while len(out) < len(argmax) and repairs < max_repairs:
                if self.ended or self.matcher.is_stopped():
                    self.ended = True
                    out.extend([self.eos] * (len(argmax) - len(out)))
                    break
                repairs += self._step(argmax, out, logits_at)
        except Exception:
            self.matcher.rollback(sum(1 for t in out if t not in self.eos_ids))
            self.ended = ended
            raise
        return out

    def _step(self, argmax: list[int], out: list[int], logits_at: Callable[[int], torch.Tensor]) -> bool:
        """Extend `out` by the accepted run of the argmax, or by one masked-argmax token (returns
        True: a repair), or end."""
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
            return False
        if argmax[i] in self.eos_ids and self.matcher.is_accepting():
            self.ended = True
            return False
        logits = logits_at(i).float()
        tok = int(logits.masked_fill(~self.mask(), float("-inf")).argmax())
        self.ended = tok in self.eos_ids
        if not self.ended:
            self._consume([tok])
            out.append(tok)
        return True

    def _consume(self, tokens: list[int]) -> None:
        if not self.matcher.consume_tokens(tokens):
            raise RuntimeError(f"the grammar matcher refused tokens it had accepted: {self.matcher.get_error()}")


class RowLogits:
    """`logits_at` for one row: (V,) LM-head logits of position i from hidden (C, H), computed by
    `head` ((k, H) -> (k, V), the model's `lm_head`) in chunks of positions (a chunk's (k, V) fp32
    logits within `budget_bytes`) and only on demand."""

    def __init__(self, hidden: torch.Tensor, head, vocab: int, budget_bytes: int):
        self.hidden, self.head = hidden, head
        self.chunk = max(1, min(hidden.shape[0], budget_bytes // (4 * vocab)))
        self.start, self.block = -1, None

    def __call__(self, pos: int) -> torch.Tensor:
        start = pos - pos % self.chunk
        if start != self.start:
            self.start = start
            self.block = self.head(self.hidden[start:start + self.chunk]).float()
        return self.block[pos - start]


def compile_constraint(compiler, spec) -> Constraint:
    """A fresh constraint for one request (`compiler`: `grammar.GrammarCompiler`)."""
    return Constraint(compiler.matcher(spec), compiler.vocab_size, compiler.eos_ids)
