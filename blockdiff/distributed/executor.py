"""The driver side of tensor parallelism: N worker processes behind the runner's interface.

Contract: `ParallelRunner(model, N, ...)` starts one worker process per rank (`worker.py`), each on
its own device, and returns once every rank holds its shard (or raises, naming the rank and why).
The scheduler stays in the driver; `execute(batch)` sends each rank the same batch (requests cut
down to what a runner reads), every rank runs `ModelRunner.execute` on it, and the driver returns
rank 0's `StepResult` after checking that every rank reported the same tokens and failures.
`model` on the driver is the model's structure on the meta device (no weights), for the engine's
questions about the config, dtype and vocabulary.
Failures are fatal and fast: a worker that dies or reports a fault outside any request makes the
current and every later call raise `WorkerError` (naming the rank, its pid and exit status), and
the other workers are killed at once. `close()` (also run when the runner is garbage collected or
the interpreter exits) stops them; no worker outlives the driver (see `worker.py`). A fault that
hits every rank alike (one request's bad input) stays that request's, through the runner's per-row
isolation; a fault on one rank only (out of memory on one device) leaves the ranks' collectives
out of step, which ends as ranks that disagree, a failed collective or a collective timeout: fatal.
Devices: CPU ranks share the CPU (at most one rank per core); CUDA ranks take `cuda:k ..
cuda:k+N-1` from the device given (`cuda` alone: k = 0, or LOCAL_RANK * N under torchrun, so that
torchrun-launched replicas take disjoint GPUs).
"""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import NoReturn

import torch

from ..checkpoint import resolve_dtype, settled_config
from ..config import ModelConfig
from ..engine.scheduler import ScheduledBatch, StepResult
from ..hardware import auto_dtype
from ..hub import resolve_model
from ..model.transformer import DiffusionGemma
from .layout import Layout
from .wire import to_wire
from .worker import WorkerOptions

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
STOP_GRACE_S = 10.0


class WorkerError(RuntimeError):
    """A tensor-parallel worker died or failed; the engine cannot continue (create a new LLM)."""


@dataclass
class Worker:
    rank: int
    device: str
    proc: subprocess.Popen
    conn: Connection


def rank_devices(device: str, world: int) -> list[str]:
    """The device of each rank, or a ValueError when the machine has fewer devices than ranks."""
    dev = torch.device(device)
    if dev.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if world > cores:
            raise ValueError(f"tensor_parallel_size {world} exceeds the {cores} CPU cores of this machine "
                             "(each CPU rank needs a core)")
        return ["cpu"] * world
    if dev.type != "cuda":
        raise ValueError(f"tensor parallelism runs on 'cpu' or 'cuda' devices, not {device!r}")
    count = torch.cuda.device_count()
    first = dev.index if dev.index is not None else int(os.environ.get("LOCAL_RANK", "0")) * world
    if first + world > count:
        raise ValueError(f"tensor_parallel_size {world} needs {world} GPUs from cuda:{first}; "
                         f"this machine has {count}")
    return [f"cuda:{first + r}" for r in range(world)]


def worker_env(threads: int) -> dict[str, str]:
    """The driver's environment without torchrun's rendezvous variables (the workers form their own
    group), with this package importable and the driver's pid for the worker's parent-death signal
    (only when the driver thread is the main thread: the signal follows the thread that started it)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC_")}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = str(threads)
    env.pop("BLOCKDIFF_DRIVER_PID", None)
    if threading.current_thread() is threading.main_thread():
        env["BLOCKDIFF_DRIVER_PID"] = str(os.getpid())
    return env


def spawn(rank: int, world: int, store: str, device: str, threads: int, env: dict) -> Worker:
    parent, child = socket.socketpair()
    cmd = [sys.executable, "-m", "blockdiff.distributed.worker", str(rank), str(world), str(child.fileno()),
           store, device, str(threads)]
    proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL)
    child.close()
    return Worker(rank, device, proc, Connection(parent.detach()))


def shutdown(workers: list[Worker], directory: str, graceful: bool = True) -> None:
    """Stop every worker (ask, then kill after a grace period; at once if not `graceful`), reap them
    and remove the runner's temporary directory."""
    for w in workers:
        try:
            if graceful and w.proc.poll() is None:
                w.conn.send(("stop",))
        except OSError:
            pass
    for w in workers:
        try:
            w.proc.wait(timeout=STOP_GRACE_S if graceful else 0)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
        w.conn.close()
    shutil.rmtree(directory, ignore_errors=True)


def exit_status(code: int | None) -> str:
    if code is None:
        return "is not answering"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


class ParallelRunner:
    def __init__(self, model: str | Path | DiffusionGemma, world: int, *, dtype=None, device: str = "cpu",
                 revision: str | None = None, num_slots: int = 16, max_len: int = 2048,
                 sampler_memory_mb: float = 256, attention: str = "eager", compile: bool | None = None):
        self.dir = tempfile.mkdtemp(prefix="blockdiff-tp-")
        self.workers: list[Worker] = []
        self._finalizer = weakref.finalize(self, shutdown, self.workers, self.dir)
        self.error: str | None = None
        try:
            path, torch_dtype = self._source(model, dtype, device, revision)
            self.layout = Layout.check(settled_config(path), world)
            devices = rank_devices(str(model.device.type) if isinstance(model, DiffusionGemma) else device, world)
            with torch.device("meta"):
                self.model = DiffusionGemma(self.layout.config).to(torch_dtype)
            self.compiled = devices[0].startswith("cuda") if compile is None else bool(compile)
            opts = WorkerOptions(str(path), str(torch_dtype).removeprefix("torch."), attention, self.compiled,
                                 num_slots, max_len, sampler_memory_mb)
            threads = max(1, torch.get_num_threads() // world)
            env = worker_env(threads)
            self.workers.extend(spawn(r, world, os.path.join(self.dir, "store"), d, threads, env)
                                for r, d in enumerate(devices))
            self.facts = [msg[1] for msg in self._exchange(opts)]     # each rank: pid, device, bytes held
        except BaseException:
            self.close()
            raise

    def _source(self, model, dtype, device, revision) -> tuple[Path, torch.dtype]:
        """The checkpoint directory the workers read (a hub id is downloaded here, once), and the dtype
        they load it in. A model object is written to this runner's temporary directory first."""
        if isinstance(model, DiffusionGemma):
            model.save_pretrained(Path(self.dir) / "model")
            return Path(self.dir) / "model", model.dtype
        path = resolve_model(model, revision)
        return path, resolve_dtype(dtype or auto_dtype(device), ModelConfig.from_file(path / "config.json"))

    # ---- messages -----------------------------------------------------------------------------------
    def _exchange(self, msg) -> list:
        """Send `msg` to every rank and return their replies. Anything that interrupts the wait (a
        KeyboardInterrupt) leaves the ranks mid-call, out of step with the driver: that stops them too."""
        try:
            self._broadcast(msg)
            return self._receive_all()
        except WorkerError:
            raise
        except BaseException:
            self._stop("the driver was interrupted while its workers ran a call")
            raise

    def _broadcast(self, msg) -> None:
        if self.error:
            raise WorkerError(self.error)
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)        # pickled once for every rank
        for w in self.workers:
            try:
                w.conn.send_bytes(data)
            except OSError:
                self._fail(self._lost(w))

    def _receive_all(self) -> list:
        """One reply from every rank, in rank order; any death or failure is fatal."""
        pending = {w.conn: w for w in self.workers}
        replies = {}
        while pending:
            for conn in wait(list(pending)):
                w = pending.pop(conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    self._fail(self._lost(w))
                if msg[0] in ("error", "fatal"):
                    what = "could not start" if msg[0] == "error" else "failed"
                    self._fail(f"tensor-parallel worker {w.rank} ({w.device}, pid {w.proc.pid}) {what}: {msg[1]}")
                replies[w.rank] = msg
        return [replies[r] for r in range(len(self.workers))]

    def _lost(self, w: Worker) -> str:
        try:
            code = w.proc.wait(timeout=5)              # its socket closed: it is exiting
        except subprocess.TimeoutExpired:
            code = None
        return (f"tensor-parallel worker {w.rank} of {len(self.workers)} ({w.device}, pid {w.proc.pid}) "
                f"{exit_status(code)}")

    def _stop(self, message: str) -> None:
        self.error = f"{message}; the engine stopped its other workers and cannot continue (create a new LLM)"
        self._finalizer.detach()
        shutdown(self.workers, self.dir, graceful=False)

    def _fail(self, message: str) -> NoReturn:
        self._stop(message)
        raise WorkerError(self.error)

    # ---- the runner's interface ------------------------------------------------------------------------
    def execute(self, batch: ScheduledBatch) -> StepResult:
        results = [msg[1] for msg in self._exchange(("execute", to_wire(batch)))]
        first = results[0]
        for rank, other in enumerate(results[1:], 1):
            if other.finished != first.finished or other.failed.keys() != first.failed.keys():
                self._fail(f"tensor-parallel ranks 0 and {rank} returned different results for one step")
        return first

    def set_timing(self, on: bool) -> None:
        """Count the time spent in collectives and in `execute` on every rank (see `stats`)."""
        self._broadcast(("timing", on))

    def stats(self) -> list[dict]:
        """Per rank, since the last call: seconds in collectives, their count, seconds in `execute`."""
        return [msg[1] for msg in self._exchange(("stats",))]

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def close(self) -> None:
        self._finalizer()
