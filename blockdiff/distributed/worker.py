"""A tensor-parallel worker process: one rank, one device, one shard, running the runner calls it is sent.

Started by the driver (`executor.py`) as
    python -m blockdiff.distributed.worker RANK WORLD FD STORE DEVICE THREADS
with FD the worker's end of a socket pair to the driver and STORE the file of the process group's
rendezvous (gloo on CPU, NCCL on CUDA). Protocol, pickled tuples over that socket:
  driver -> worker: `WorkerOptions` once; then ("execute", batch), ("timing", on), ("stats",), ("stop",)
  worker -> driver: ("ready", facts) or ("error", message) once; then ("result", StepResult),
                    ("stats", dict), or ("fatal", message) just before it exits.
Every worker runs `ModelRunner.execute` on the same batch, so all ranks make the same collectives in
the same order. A worker never outlives its engine: it exits when told to stop, when the driver's
end of the socket closes, and (Linux) when the driver process dies, by PR_SET_PDEATHSIG.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..engine.compiled import compile_model
from ..engine.runner import ModelRunner
from ..hardware import reuse_freed_memory
from .comm import CollectiveFailure, Comm
from .layout import Layout
from .shard import load_rank_model, parallelize

COLLECTIVE_TIMEOUT = timedelta(minutes=10)   # a peer that stops answering fails the step after this


@dataclass(frozen=True)
class WorkerOptions:
    path: str
    dtype: str                  # "float32" | "bfloat16" | "float16"
    attention: str
    compile: bool
    num_slots: int
    max_len: int
    sampler_memory_mb: float


def die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process when its parent dies (no orphan after a driver crash)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)       # PR_SET_PDEATHSIG
        except OSError:                                              # no glibc: the socket's EOF still ends us
            pass
    if os.getppid() != parent:                                       # the parent died before prctl
        os._exit(1)


def start(rank: int, world: int, store: str, device: torch.device, opts: WorkerOptions) -> tuple[ModelRunner, Comm]:
    """Join the process group, load this rank's shard, wire its collectives, build its runner."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    layout = Layout.check(ModelConfig.from_file(Path(opts.path) / "config.json"), world)
    model = load_rank_model(opts.path, layout, rank, getattr(torch, opts.dtype), device)
    model.set_attention_impl(opts.attention)
    if device.type == "cpu":
        reuse_freed_memory()
    model.use_grouped_experts()
    comm = Comm(rank, world, device)
    vocab = parallelize(model, layout, comm)
    if opts.compile:
        compile_model(model)
    runner = ModelRunner(model, opts.num_slots, opts.max_len, opts.sampler_memory_mb, tile_step=vocab.tile_step,
                         shard=vocab)
    return runner, comm


def facts(runner: ModelRunner) -> dict:
    weights = sum(t.numel() * t.element_size() for t in (*runner.model.parameters(), *runner.model.buffers()))
    return {"pid": os.getpid(), "device": str(runner.device), "weight_bytes": weights,
            "kv_bytes": runner.cache.nbytes()}


def serve(conn: Connection, runner: ModelRunner, comm: Comm) -> int:
    """The command loop; returns the exit status."""
    busy, executes = 0.0, 0
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):                    # the driver is gone
            return 0
        if msg[0] == "stop":
            return 0
        if msg[0] == "timing":
            comm.timing = msg[1]
        elif msg[0] == "stats":
            conn.send(("stats", {**comm.take_stats(), "execute_s": busy, "executes": executes}))
            busy, executes = 0.0, 0
        elif msg[0] == "execute":
            start_t = time.perf_counter()
            try:
                result = runner.execute(msg[1])
            except (CollectiveFailure, Exception) as err:      # noqa: BLE001 - lost peer or a fault outside any row
                traceback.print_exc()
                conn.send(("fatal", f"{type(err).__name__}: {err}"))
                return 1
            if comm.timing and runner.device.type == "cuda":
                torch.cuda.synchronize(runner.device)
            busy, executes = busy + time.perf_counter() - start_t, executes + 1
            conn.send(("result", result))


def main(argv: list[str]) -> int:
    rank, world, fd = int(argv[0]), int(argv[1]), int(argv[2])
    store, device, threads = argv[3], torch.device(argv[4]), int(argv[5])
    if "BLOCKDIFF_DRIVER_PID" in os.environ:
        die_with_parent(int(os.environ["BLOCKDIFF_DRIVER_PID"]))
    torch.set_num_threads(threads)
    conn = Connection(fd)
    try:
        runner, comm = start(rank, world, store, device, conn.recv())
        conn.send(("ready", facts(runner)))
    except BaseException as err:                       # noqa: BLE001 - report why, then exit
        traceback.print_exc()                           # the whole story on the (inherited) stderr
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return 1
    status = serve(conn, runner, comm)
    if status == 0:                                    # after a failed collective the group is unusable
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
