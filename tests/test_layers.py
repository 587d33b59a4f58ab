"""Inference fast paths of the model's layers: grouped experts, and the allocator setting."""
import copy
import subprocess
import sys

import pytest
import torch

from blockdiff.config import ModelConfig
from blockdiff.model.layers import Experts


def experts(dtype):
    cfg = ModelConfig(hidden_size=64, num_experts=8, top_k_experts=2, moe_intermediate_size=48)
    gen = torch.Generator().manual_seed(0)
    e = Experts(cfg)
    with torch.no_grad():
        e.gate_up_proj.copy_(torch.randn(e.gate_up_proj.shape, generator=gen) * 0.1)
        e.down_proj.copy_(torch.randn(e.down_proj.shape, generator=gen) * 0.1)
    return e.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_experts_equal_the_loop(dtype):
    looped = experts(dtype)
    grouped = copy.deepcopy(looped)
    assert grouped.use_grouped_mm()
    assert not looped.grouped and grouped.grouped
    for a, b in zip(looped.state_dict().values(), grouped.state_dict().values()):
        assert torch.equal(a, b)                        # same values, only the memory layout changed
    gen = torch.Generator().manual_seed(1)
    for tokens in (1, 5, 64, 300):
        x = torch.randn(tokens, 64, generator=gen).to(dtype)
        idx = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(tokens)])
        idx[0] = torch.tensor([7, 0])                   # at least one token per expert end
        w = torch.rand(tokens, 2, generator=gen)
        with torch.no_grad():
            ref, out = looped(x, w, idx), grouped(x, w, idx)
        # grouped_mm and mm are different kernels, and which one a CPU runs (and how it blocks the
        # reduction) depends on its ISA: compare within the dtype's rounding, not bit for bit
        tol = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, ref, **tol, msg=f"{tokens} tokens")


def test_grouped_experts_train_through_the_loop():
    e = experts(torch.float32)
    e.use_grouped_mm()
    x = torch.randn(10, 64, requires_grad=True)
    idx, w = torch.randint(0, 8, (10, 2)), torch.rand(10, 2)
    e(x, w, idx).sum().backward()          # CPU grouped_mm has no backward: grad mode takes the loop
    assert x.grad is not None and e.gate_up_proj.grad is not None


FAULTS = """
import resource, sys, torch
from blockdiff.hardware import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
torch.ones(2**24)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(2**23)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_memory_is_reused():
    """New 32 MB tensors land in the pages of a freed 64 MB one instead of fresh zeroed pages
    (8,192 minor page faults apiece). In a new process: this one's heap is shaped by other tests.
    With reuse, at most one of the five may still land on fresh pages (a full-suite run once saw
    exactly 8,192 faults); without it, all five do."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    assert faults("default") > 5 * 8000
    assert faults("reuse") < 8192 + 1000
