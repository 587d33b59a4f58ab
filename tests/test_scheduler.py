"""Scheduler and slot allocator: plain-Python bookkeeping, tested without a model."""
import pytest

from blockdiff.engine.slot_allocator import SlotAllocator, common_prefix
from blockdiff.engine.request import Request, SamplingParams, Status
from blockdiff.engine.scheduler import Scheduler, StepResult


def req(rid, n=4, max_tokens=16):
    return Request(rid, list(range(10, 10 + n)), SamplingParams(max_tokens=max_tokens), seed=0)


def test_fifo_admission_bounded_by_slots():
    s = Scheduler(num_slots=2, max_model_len=128, canvas_length=8)
    for i in range(3):
        s.add(req(f"r{i}"))
    admitted = s.schedule().prefills
    assert [r.request_id for r, _ in admitted] == ["r0", "r1"]
    assert {r.slot for r, _ in admitted} == {0, 1} and all(r.status is Status.RUNNING for r, _ in admitted)
    assert s.schedule().prefills == [] and len(s.waiting) == 1
    s.retire(admitted[0][0])
    nxt = s.schedule().prefills
    assert [r.request_id for r, _ in nxt] == ["r2"] and nxt[0][0].slot == admitted[0][0].slot


def test_capacity_counts_whole_canvases():
    s = Scheduler(num_slots=1, max_model_len=20, canvas_length=8)
    s.add(req("ok", n=4, max_tokens=16))                 # 4 + 2 canvases of 8 = 20
    with pytest.raises(ValueError, match="max_model_len=20"):
        s.add(req("big", n=5, max_tokens=16))
    with pytest.raises(ValueError, match="max_model_len"):
        s.add(req("big2", n=4, max_tokens=17))           # 17 tokens need 3 canvases


def test_retire_waiting_request():
    s = Scheduler(num_slots=1, max_model_len=64, canvas_length=8)
    a, b = req("a"), req("b")
    s.add(a), s.add(b)
    s.schedule()
    s.retire(b)                                          # aborted while waiting
    assert not s.waiting and s.has_work()
    s.retire(a)
    assert not s.has_work() and s.kv.num_free == 1


def test_step_cycle_counts_commits_and_fails_alone():
    """schedule -> (runner) -> update_from_output: counters, deferred commits, a failed request retired."""
    s = Scheduler(num_slots=2, max_model_len=64, canvas_length=4)
    a, b = req("a", n=3), req("b", n=3)
    s.add(a), s.add(b)
    batch = s.schedule()
    assert [r.request_id for r in batch.running] == ["a", "b"] and s.kv.tokens[a.slot] == a.prompt_ids
    done = s.update_from_output(batch, StepResult(finished={"a": [7, 7, 7, 7]}, failed={"b": "boom"}))
    assert [(r.request_id, t) for r, t in done] == [("a", [7, 7, 7, 7])]
    assert (a.canvases, a.steps_per_canvas, a.steps_in_canvas) == (1, [1], 0)
    assert b.finished and b.finish_reason == "error" and b.error == "boom" and s.kv.tokens[b.slot] == []
    s.queue_commit(a, [7, 7, 7, 7])
    batch = s.schedule()
    assert [(c.request.request_id, c.start, c.tokens) for c in batch.commits] == [("a", 3, [7, 7, 7, 7])]
    assert a.context_len == 7 and s.kv.tokens[a.slot] == a.prompt_ids + [7, 7, 7, 7]
    s.update_from_output(batch, StepResult())
    assert a.steps_in_canvas == 1 and s.schedule().commits == []


def test_allocator_reuses_free_slot_prefix():
    kv = SlotAllocator(3)
    first = kv.allocate([1, 2, 3, 4])
    kv.extend(first.slot, [1, 2, 3, 4, 9, 9])
    kv.free(first.slot)
    again = kv.allocate([1, 2, 3, 4, 9, 5])
    assert again.slot == first.slot and again.reuse == 5 and again.copy_from is None
    assert kv.tokens[again.slot] == [1, 2, 3, 4, 9]


def test_allocator_copies_long_prefix_from_busy_slot():
    kv = SlotAllocator(2, min_copy=3)
    a = kv.allocate(list(range(10)))
    kv.extend(a.slot, list(range(10)))
    b = kv.allocate(list(range(8)) + [99])
    assert b.slot != a.slot and b.copy_from == a.slot and b.reuse == 8
    with pytest.raises(RuntimeError, match="no free"):
        kv.allocate([1])


def test_allocator_short_shared_prefix_is_recomputed():
    kv = SlotAllocator(2, min_copy=16)
    a = kv.allocate(list(range(10)))
    kv.extend(a.slot, list(range(10)))
    b = kv.allocate(list(range(10)))
    assert b.copy_from is None and b.reuse == 0


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0
