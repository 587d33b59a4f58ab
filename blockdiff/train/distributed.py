"""Process-group setup, model wrapping (DDP or FSDP2) and full (unsharded) state for saving.

Contract: `setup()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); without it the
job is one process and nothing distributed is initialised. Backends: NCCL on CUDA, gloo on CPU.
`wrap` returns the module to call for training; `full_model_state` / `full_optim_state` give every
rank's view of the unsharded tensors on the CPU (torch.distributed.checkpoint's state-dict API, so
DDP, FSDP2 and a plain module are handled alike), keyed by parameter name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str | None = None) -> Dist:
    """Initialise the process group if launched by torchrun; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, d: Dist, fsdp: bool) -> nn.Module:
    """DDP (replicated weights) or FSDP2 (`fully_shard` per layer, then the root) across ranks.
    `module` must be the object whose forward runs the whole step (objective.TrainingModel), so the
    hooks of either wrapper fire."""
    if not d.active:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in module.model.layers:
            fully_shard(layer)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [d.device.index] if d.device.type == "cuda" else None
    return DDP(module, device_ids=ids)


OPTIONS = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters and buffers on the CPU (on rank 0; other ranks may get an empty dict)."""
    return get_model_state_dict(module, options=OPTIONS)


def full_optim_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(module, optimizer, options=OPTIONS)


def load_optim_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Every rank passes the same full state; each keeps its shard."""
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def all_mean(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean of a float tensor over ranks (a no-op in one process)."""
    if d.active:
        values = values.clone()
        dist.all_reduce(values)
        values /= d.world
    return values


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()
