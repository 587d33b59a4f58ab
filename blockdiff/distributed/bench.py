"""`blockdiff bench --tensor-parallel-size N`: one device against N, and where an N-rank step's time goes.

On one random checkpoint of a preset: aggregate tok/s at each batch size (fixed steps, the fastest
of `repeat` runs) with one process and with N worker processes; then, for N ranks at the smallest
and the largest batch size, the share of each rank's step spent inside collectives (`comm_share`: the transfers
and the wait for the slowest rank), and the share of the driver's wall time outside the workers'
step (`driver_share`: scheduling, pickling the batch, the pipes), and the collectives per engine
step (prefills and commits included). Prints one JSON line last.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import bench
from ..engine.engine import LLM
from ..engine.request import SamplingParams


def fixed_run(llm: LLM, batch: int, prompt_len: int, max_tokens: int, steps: int, repeat: int) -> float:
    """tok/s of `batch` requests at `steps` fixed steps: the fastest of `repeat` timed runs."""
    sp = [SamplingParams(max_tokens=max_tokens, seed=i, max_denoising_steps=steps, fixed_steps=True,
                         ignore_eos=True) for i in range(batch)]
    prompts = bench.prompts_for(batch, prompt_len, llm.model.config.vocab_size)
    llm.generate(prompts, [SamplingParams(max_tokens=1, seed=0, max_denoising_steps=2, ignore_eos=True)] * batch)
    wall = bench.timed(lambda: llm.generate(prompts, sp), "cpu", repeat)     # the driver waits for the workers
    return batch * max_tokens / wall


def step_shares(llm: LLM, batch: int, prompt_len: int, max_tokens: int, steps: int) -> dict:
    """One timed run on the N-rank engine with the workers counting their time in collectives."""
    sp = [SamplingParams(max_tokens=max_tokens, seed=i, max_denoising_steps=steps, fixed_steps=True,
                         ignore_eos=True) for i in range(batch)]
    prompts = bench.prompts_for(batch, prompt_len, llm.model.config.vocab_size)
    llm.runner.set_timing(True)
    llm.runner.stats()                                    # reset the counters
    start = time.perf_counter()
    llm.generate(prompts, sp)
    wall = time.perf_counter() - start
    ranks = llm.runner.stats()
    llm.runner.set_timing(False)
    busy = sum(r["execute_s"] for r in ranks) / len(ranks)
    return {f"comm_share_bs{batch}": sum(r["collective_s"] / r["execute_s"] for r in ranks) / len(ranks),
            f"comm_share_by_rank_bs{batch}": [r["collective_s"] / r["execute_s"] for r in ranks],
            f"collectives_per_step_bs{batch}": ranks[0]["collectives"] / ranks[0]["executes"],
            f"driver_share_bs{batch}": 1 - busy / wall}


def measure_parallel(args, ckpt: Path) -> int:
    if args.preset == "26b-a4b":
        raise ValueError("bench --tensor-parallel-size needs a preset written to disk: small or medium")
    from ..hardware import auto_dtype

    sizes = [int(s) for s in args.batch_sizes.split(",")]
    dtype = auto_dtype(args.device) if args.dtype is None else getattr(torch, args.dtype)
    model = bench.build_checkpoint(args.preset, ckpt, torch.float32, args.device).to(dtype)
    c, n = model.config.canvas_length, args.tensor_parallel_size
    max_tokens, max_len = args.canvases * c, args.prompt_len + args.canvases * c + c
    res = {"preset": args.preset, "device": str(args.device), "dtype": str(dtype).replace("torch.", ""),
           "steps": args.steps, "canvas": c, "max_tokens": max_tokens, "tensor_parallel_size": n,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "threads": torch.get_num_threads()}
    for tp in (1, n):          # the same weights: the N-rank engine writes them for its workers
        with LLM(model, tokenizer=None, device=args.device, max_num_seqs=max(sizes), max_model_len=max_len,
                 sampler_memory_mb=args.sampler_budget_mb, compile=args.compile, tensor_parallel_size=tp) as llm:
            for bs in sizes:
                res[f"tp{tp}_bs{bs}_tok_s"] = fixed_run(llm, bs, args.prompt_len, max_tokens, args.steps, args.repeat)
                print(f"tensor parallel {tp}, batch {bs:3d}: {res[f'tp{tp}_bs{bs}_tok_s']:8.1f} tok/s", flush=True)
            for bs in sorted({min(sizes), max(sizes)}) if tp > 1 else ():
                res.update(step_shares(llm, bs, args.prompt_len, max_tokens, args.steps))
                print(f"communication share of a {n}-rank step at batch {bs}: {res[f'comm_share_bs{bs}']:.3f}; "
                      f"driver share of the wall time: {res[f'driver_share_bs{bs}']:.3f}", flush=True)
    print(json.dumps(res, sort_keys=True))
    return 0
