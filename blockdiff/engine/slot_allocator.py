"""SlotAllocator: which request owns which KV-cache slot, and which tokens each slot holds.

Plain Python (no tensors); the runner owns the tensors (`model.slot_cache.SlotCache`). Prefix caching:
a slot keeps the token ids whose K/V it holds, also after its request finished, until reused. A new
prompt takes the free slot sharing its longest prefix (reusing those positions as they are), or
copies the shared prefix from a busy slot (e.g. the sibling requests of `n > 1`), so a prompt's
shared part is never recomputed. K/V depend only on the tokens and their positions, so any
matching prefix is exact, for full and sliding layers alike. Tokens are compared as keys: the ids,
except that image tokens are keyed by their image's content (`Request.cache_keys`), so two prompts
share an image's K/V only when the images are equal. With `ring_slack` (the KV cache keeps sliding
layers in a ring, `model.slot_cache`), a slot's prefix is reusable only while the slot holds at most
that many tokens past it: older positions have been overwritten.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Allocation:
    slot: int
    reuse: int                  # positions [0, reuse) already hold this prompt's K/V
    copy_from: int | None       # copy [0, reuse) from this busy slot first, if not None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotAllocator:
    def __init__(self, num_slots: int, min_copy: int = 16, ring_slack: int | None = None):
        self.ring_slack = ring_slack
        self.tokens: list[list[int]] = [[] for _ in range(num_slots)]
        self.busy = [False] * num_slots
        self.min_copy = min_copy           # shorter shared prefixes are cheaper to recompute
        self.last_used = [0] * num_slots
        self.clock = 0

    @property
    def num_free(self) -> int:
        return self.busy.count(False)

    def allocate(self, prompt: list[int]) -> Allocation:
        free = [s for s, b in enumerate(self.busy) if not b]
        if not free:
            raise RuntimeError("no free KV-cache slot")
        # best free slot: longest shared prefix, then least recently used (keeps useful prefixes longer)
        slot = max(free, key=lambda s: (common_prefix(self.tokens[s], prompt), -self.last_used[s]))
        reuse, copy_from = self._usable(slot, prompt), None
        busy = [s for s, b in enumerate(self.busy) if b]
        if busy:
            donor = max(busy, key=lambda s: self._usable(s, prompt))
            shared = self._usable(donor, prompt)
            if shared >= max(self.min_copy, reuse + 1):
                reuse, copy_from = shared, donor
        self.busy[slot] = True
        self.tokens[slot] = list(prompt[:reuse])
        self.clock += 1
        self.last_used[slot] = self.clock
        return Allocation(slot, reuse, copy_from)

    def _usable(self, slot: int, prompt: list[int]) -> int:
        """Positions of `prompt` whose K/V `slot` still holds."""
        shared = common_prefix(self.tokens[slot], prompt)
        if self.ring_slack is not None and len(self.tokens[slot]) - shared > self.ring_slack:
            return 0
        return shared

    def extend(self, slot: int, ids: list[int]) -> None:
        """Record that the K/V of `ids` were written right after the slot's current tokens."""
        self.tokens[slot].extend(ids)

    def free(self, slot: int, keep_prefix: bool = True) -> None:
        """Release a slot; its tokens stay reusable as a prefix unless `keep_prefix` is False."""
        self.busy[slot] = False
        if not keep_prefix:
            self.tokens[slot] = []
