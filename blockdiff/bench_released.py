"""`blockdiff bench --preset 26b-a4b --quant SCHEME`: the released shapes, quantized, served on one device.

1. A child process writes a random-weight checkpoint of the preset's shapes directly in the
   quantized layout (`quant/random_pack.py`: shard by shard, never a bf16 model) under the bench's
   temporary directory; its memory is not this process's.
2. This process loads it with `load_model`, as `serve` does (quantized modules packed for their
   kernels while the tensors are read), and builds the engine with one slot and a KV cache of
   `max_model_len` positions (32,768 by default; sliding layers keep their window, `slot_cache.py`).
3. One request of `canvases` canvases runs with `steps` fixed denoising steps.
Reports, JSON last: `peak_rss_gib` (the peak resident memory of this process: load, KV cache and the
run; the build is not included), `weights_gb` (stored checkpoint bytes), `load_s`, `step_s` (mean
denoising step), `tok_per_s` (tokens over the whole generate call, prefill included), and on CUDA
`gpu_peak_gib`. Float weights and activations are bf16 unless `--dtype` says otherwise: on a CPU
without native bf16 the default dtype would be fp32, which doubles the embedding (1.5 -> 3.0 GB)
and the KV cache, and the int4 kernel takes bf16 activations anyway.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from .bench import PRESETS, prompts_for, sync
from .bench_quant import weights_bytes
from .config import ModelConfig
from .quant.scheme import get_scheme

GIB = 2**30


def rss_gib() -> float:
    """Current resident memory of this process (VmRSS), GiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024 / GIB


def peak_rss_gib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss * 1024 / GIB       # Linux: KiB


def build_pack(config: ModelConfig, scheme: str, dst: Path, embedding: str) -> float:
    """Write the random quantized checkpoint in a child process; returns its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "blockdiff.quant.random_pack", json.dumps(config.to_dict()), scheme,
                    str(dst), embedding], check=True)
    return time.perf_counter() - start


def measure_released(scheme: str, preset: str, root: Path, dtype: torch.dtype | None, device: str, steps: int,
                     prompt_len: int, canvases: int, max_model_len: int = 32768, embedding: str = "bf16",
                     compile: bool | None = None) -> dict:
    from .checkpoint import load_model
    from .engine.engine import LLM

    config = ModelConfig(**PRESETS[preset], max_position_embeddings=max(max_model_len, 8192))
    dtype = dtype or torch.bfloat16
    res = {"preset": preset, "quant": scheme, "device": device, "dtype": str(dtype).removeprefix("torch."),
           "threads": torch.get_num_threads(), "steps": steps, "canvases": canvases, "prompt_len": prompt_len,
           "max_model_len": max_model_len, "embedding": embedding, "peak_rss_includes_build": False}
    get_scheme(scheme).with_embedding(embedding)                  # bad names fail before the build
    res["build_s"] = build_pack(config, scheme, root / scheme, embedding)
    res["build_peak_rss_gib"] = peak_rss_gib(resource.RUSAGE_CHILDREN)
    res["weights_gb"] = weights_bytes(root / scheme) / 1e9
    print(f"built {res['weights_gb']:.2f} GB in {res['build_s']:.0f} s", file=sys.stderr, flush=True)
    start = time.perf_counter()
    model = load_model(root / scheme, dtype, device)
    sync(device)
    res["load_s"] = time.perf_counter() - start
    res["rss_after_load_gib"] = rss_gib()
    print(f"loaded in {res['load_s']:.0f} s, RSS {res['rss_after_load_gib']:.2f} GiB", file=sys.stderr, flush=True)
    llm = LLM(model, tokenizer=None, max_num_seqs=1, max_model_len=max_model_len, compile=compile)
    res["compile"] = llm.compiled
    res["kv_cache_gib"] = llm.runner.cache.nbytes() / GIB
    res.update(run_request(llm, steps, prompt_len, canvases))
    res["peak_rss_gib"] = peak_rss_gib()
    if device.startswith("cuda"):
        res["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    return res


def run_request(llm, steps: int, prompt_len: int, canvases: int) -> dict:
    """One request, `canvases` canvases of `steps` fixed steps; every denoising step is timed."""
    from .engine.request import SamplingParams

    runner, times = llm.runner, []
    denoise = runner.denoise

    def timed_denoise(*a, **kw):
        sync(runner.device)
        t0 = time.perf_counter()
        out = denoise(*a, **kw)
        sync(runner.device)
        times.append(time.perf_counter() - t0)
        print(f"step {len(times)}: {times[-1]:.1f} s", file=sys.stderr, flush=True)
        return out

    runner.denoise = timed_denoise
    c = llm.model.config.canvas_length
    sp = SamplingParams(max_tokens=canvases * c, seed=0, max_denoising_steps=steps, fixed_steps=True, ignore_eos=True)
    start = time.perf_counter()
    out = llm.generate(prompts_for(1, prompt_len, llm.model.config.vocab_size), sp)[0]
    wall = time.perf_counter() - start
    runner.denoise = denoise
    return {"tokens": len(out.token_ids), "generate_s": wall, "step_s": sum(times) / len(times),
            "tok_per_s": len(out.token_ids) / wall, "steps_per_canvas": sum(out.stats.steps_per_canvas) /
            len(out.stats.steps_per_canvas)}
