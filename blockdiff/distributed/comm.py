"""The collectives a tensor-parallel rank makes, in one place: timed, and failing loudly.

Contract: `Comm` wraps the default process group (gloo on CPU, NCCL on CUDA). `all_reduce` sums (or
maxes) in place and returns its input; `all_gather` returns (world, *shape); `gather_vocab` joins
per-rank vocabulary slices of unequal widths along the last dim. Every rank must make the same
calls in the same order with the same shapes (every rank runs the same runner calls on the same
batch). A failing collective (a peer died, a timeout) raises `CollectiveFailure`, a
`BaseException`: it is nobody's request's fault, so the runner's per-row fault isolation, which
catches `Exception`, must not turn it into failed rows. With `timing` on, the seconds spent inside
collectives are counted (CUDA is synchronised around each call so they are the transfer's time).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CollectiveFailure(BaseException):
    """A collective did not complete: a peer is gone or timed out. Fatal for the worker."""


class Comm:
    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.timing = False
        self.seconds, self.calls = 0.0, 0

    def _run(self, fn, *args, **kwargs):
        cuda = self.timing and self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            fn(*args, **kwargs)
        except RuntimeError as err:                     # DistBackendError included
            raise CollectiveFailure(f"rank {self.rank}: {fn.__name__} failed: {err}") from err
        if cuda:
            torch.cuda.synchronize(self.device)
        if self.timing:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        self._run(dist.all_reduce, t, op=op)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """t (*S) -> (world, *S): every rank's t, in rank order."""
        out = torch.empty((self.world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        self._run(ALL_GATHER, out, t.contiguous())      # into (world * S0, ...): what gloo accepts
        return out.view(self.world, *t.shape)

    def gather_vocab(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """t (..., sizes[rank]) -> (..., sum(sizes)): the ranks' slices side by side (padded to the
        widest for the transfer, the padding dropped)."""
        width = max(sizes)
        if t.shape[-1] < width:
            t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
        parts = self.all_gather(t)
        return torch.cat([parts[r, ..., :n] for r, n in enumerate(sizes)], dim=-1)

    def take_stats(self) -> dict:
        """Seconds in collectives and their count since the last call."""
        out = {"collective_s": self.seconds, "collectives": self.calls}
        self.seconds, self.calls = 0.0, 0
        return out
