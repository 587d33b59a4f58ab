"""`blockdiff bench`: side-by-side speed of blockdiff, transformers' generate() and AR decoding.

One run builds (or loads) a checkpoint and measures, on the same weights and device:
(a) blockdiff vs transformers `generate()` with the same fixed number of steps, batch 1 and 16;
(b) blockdiff block diffusion vs blockdiff autoregressive decoding (batch 1);
(c) blockdiff at batch 1/4/16/64: aggregate tok/s, p50/p99 request latency, peak memory, with fixed
    steps and with adaptive stopping;
plus a denoising-step breakdown (network matmuls vs sampler) against a plain `torch.mm`, and the
sampler's peak memory for 64 concurrent requests on a 262,144-token vocabulary. Prints a table,
writes a PNG plot, and prints one JSON line last with every figure.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .config import ModelConfig
from .model.init import init_weights
from .model.transformer import DiffusionGemma

PRESETS = {
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, global_head_dim=64, num_global_key_value_heads=2,
                  num_experts=8, top_k_experts=2, moe_intermediate_size=128, canvas_length=64, sliding_window=256),
    "medium": dict(vocab_size=16384, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                   layer_types=["sliding_attention"] * 5 + ["full_attention", "sliding_attention", "full_attention"],
                   num_attention_heads=8, num_key_value_heads=4, head_dim=64, global_head_dim=128,
                   num_global_key_value_heads=2, num_experts=8, top_k_experts=2, moe_intermediate_size=256,
                   canvas_length=256, sliding_window=512),
    # the small network with DiffusionGemma's vocabulary and canvas: the step's vocabulary side dominates
    "real-vocab": dict(vocab_size=262144, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=64,
                       num_global_key_value_heads=2, num_experts=8, top_k_experts=2, moe_intermediate_size=128,
                       canvas_length=256, sliding_window=512),
    "26b-a4b": dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                    num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2, head_dim=256,
                    global_head_dim=512, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
                    canvas_length=256, sliding_window=1024),
}

RELEASED = ("26b-a4b",)      # `bench --quant` builds these directly quantized (`bench_released.py`)


def build_checkpoint(preset: str, path: Path, dtype: torch.dtype, device: str) -> DiffusionGemma:
    cfg = ModelConfig(**PRESETS[preset], max_position_embeddings=8192)
    with torch.device(device):
        model = init_weights(DiffusionGemma(cfg), seed=0).to(dtype)
    if preset != "26b-a4b":
        model.save_pretrained(path)        # transformers reads the very same weights
    return model.eval()


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeat: int = 1) -> float:
    """Seconds per call: the fastest of `repeat` calls (noise on a shared machine only adds time)."""
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def mm_throughput(model, rows: int) -> float:
    """GFLOP/s of a plain torch.mm shaped like the model's biggest dense layer, same dtype/device."""
    h = model.config.hidden_size
    a = torch.randn(rows, h, dtype=model.dtype, device=model.device)
    b = torch.randn(h, 4 * h, dtype=model.dtype, device=model.device)
    timed(lambda: a @ b, model.device, 3)
    return 2 * rows * h * 4 * h / timed(lambda: a @ b, model.device, 10) / 1e9


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ library logs its start and stop there)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class PeakMemory:
    """Peak bytes of live tensors above the start of the block: the CUDA allocator's statistics, or
    on CPU the profiler's allocation events (resident memory would not tell: the engine keeps freed
    blocks in the heap, see `hardware.reuse_freed_memory`). CPU figures are at operator
    granularity: a temporary that lives and dies inside one operator is not seen."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            with quiet_stderr():
                self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - self.base
        else:
            with quiet_stderr():
                self.prof.__exit__(*exc)
            live = peak = 0
            for event in sorted(self.prof.events(), key=lambda e: e.time_range.start):
                live += event.self_cpu_memory_usage          # allocations minus frees of that op
                peak = max(peak, live)
        self.mb = max(peak, 0) / 2**20


def prompts_for(batch: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(5, vocab, (batch, length), generator=gen).tolist()


def run_engine(llm, batch: int, prompt_len: int, max_tokens: int, steps: int, fixed: bool, repeat: int = 1,
               memory: bool = True) -> dict:
    """Timed runs (the fastest of `repeat`), then (if `memory`) the peak temporary memory of a short
    run (one canvas, two steps) at the same batch size, measured apart because on CPU the profiler
    slows it."""
    from .engine.request import SamplingParams

    sp = [SamplingParams(max_tokens=max_tokens, seed=i, max_denoising_steps=steps, fixed_steps=fixed,
                         ignore_eos=True) for i in range(batch)]
    prompts = prompts_for(batch, prompt_len, llm.model.config.vocab_size)
    short = [SamplingParams(max_tokens=1, seed=i, max_denoising_steps=2, fixed_steps=True, ignore_eos=True)
             for i in range(batch)]
    llm.generate(prompts, short)          # warm-up at full batch: allocator and caches settle
    wall, outs = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        run = llm.generate(prompts, sp)
        elapsed = time.perf_counter() - start
        if elapsed < wall:
            wall, outs = elapsed, run
    peak_mb = float("nan")
    if memory:
        with PeakMemory(llm.model.device) as mem:
            llm.generate(prompts, short)
        peak_mb = mem.mb
    lat = sorted(o.stats.latency for o in outs)
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tok_s": tokens / wall, "p50_s": lat[len(lat) // 2], "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "peak_mem_mb": peak_mb, "steps_per_canvas": sum(sum(o.stats.steps_per_canvas) for o in outs) /
            sum(len(o.stats.steps_per_canvas) for o in outs)}


def run_transformers_fresh(path: Path, batch: int, prompt_len: int, max_tokens: int, steps: int, vocab: int,
                           repeat: int = 1) -> float:
    """`run_transformers` in a new process, as users run it: with glibc's default allocator, not
    this process's heap setting (which speeds transformers up too) and with this process's thread
    count."""
    code = (f"import torch; torch.set_num_threads({torch.get_num_threads()}); from pathlib import Path; "
            f"from blockdiff.bench import run_transformers; "
            f"print(run_transformers(Path({str(path)!r}), {batch}, {prompt_len}, {max_tokens}, {steps}, {vocab}, {repeat}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def transformers_temporaries(batch: int, canvas: int, vocab: int) -> int:
    """Bytes of the fp32 (batch, canvas, vocab) tensors transformers' generate() holds at once
    (logits, softcapped, tempered, probabilities, the sampler's and the entropy's temporaries):
    about eight, from its peak resident memory at batch 1 on the real-vocab preset (2.9 GB)."""
    return 8 * batch * canvas * vocab * 4


def available_memory() -> int:
    """Bytes of memory available to a new process (Linux MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def run_transformers(path: Path, batch: int, prompt_len: int, max_tokens: int, steps: int, vocab: int,
                     repeat: int = 1) -> float:
    """tok/s of transformers' generate() (default backends, checkpoint dtype), same fixed steps;
    the fastest of `repeat` runs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging

    logging.set_verbosity_error()      # the placeholder vision tower's random init is expected
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    ids = torch.tensor(prompts_for(batch, prompt_len, vocab))
    # a vanishing confidence_threshold never triggers: every canvas runs exactly `steps` steps
    kw = dict(max_new_tokens=max_tokens, max_denoising_steps=steps, confidence_threshold=1e-30)
    with torch.no_grad():
        hf.generate(ids[:1], **kw)
        best = 0.0
        for _ in range(repeat):
            start = time.perf_counter()
            out = hf.generate(ids, **kw).sequences
            best = max(best, (out.shape[1] - prompt_len) * batch / (time.perf_counter() - start))
    return best


def run_ar(model, prompt_len: int, max_tokens: int) -> float:
    from .engine.ar import ar_generate

    prompts = prompts_for(1, prompt_len, model.config.vocab_size)
    ar_generate(model, prompts, max_tokens=4)
    start = time.perf_counter()
    ar_generate(model, prompts, max_tokens=max_tokens)
    sync(model.device)
    return max_tokens / (time.perf_counter() - start)


def step_breakdown(llm, batch: int, prompt_len: int) -> dict:
    """Time one denoising step's parts on `batch` rows: network (the decoder forward plus the bare
    LM-head and soft-embedding matmuls) vs sampler (softcap, temperature, softmax, entropy, sort,
    sampling, acceptance: the sampler's own call on fixed hidden states, less its two matmuls, so
    that the decoder's timing noise does not enter it). The bare matmuls materialise (batch, C, V)
    fp32 logits and probabilities: `batch` shrinks until each fits 512 MB."""
    from .diffusion.sampler import denoise_rows
    from .engine.request import SamplingParams

    model, runner, c = llm.model, llm.runner, llm.model.config.canvas_length
    batch = max(1, min(batch, (512 << 20) // (4 * c * model.config.vocab_size)))
    prompts = prompts_for(batch, prompt_len, model.config.vocab_size)
    slots, lengths = list(range(batch)), [prompt_len] * batch
    for i, p in zip(slots, prompts):
        runner.assign(i, SamplingParams.built_in(), i)
        runner.prefill(i, p, 0)
    idx = torch.tensor(slots, device=model.device)
    from .model.slot_cache import SlotDecodeContext

    def decoder():
        lens = torch.tensor(lengths, device=model.device)
        ctx = SlotDecodeContext(runner.cache, idx, lens, prompt_len, model.config.sliding_window, model.dtype)
        return model.denoise_with(runner.canvas[idx], lens[:, None] + torch.arange(c, device=model.device), ctx,
                                  runner.soft[idx])

    with torch.no_grad():
        hidden = decoder()
        probs = torch.softmax(model.logits(hidden), -1).to(model.dtype)
        t_dec = timed(decoder, model.device, 5)
        t_head = timed(lambda: torch.nn.functional.linear(hidden, model.embed_tokens.weight), model.device, 5)
        t_soft = timed(lambda: probs @ model.embed_tokens.weight, model.device, 5)
        t_step = timed(lambda: runner.denoise(slots, lengths), model.device, 5)
        knobs = runner.row_knobs(idx)
        t_rows = timed(lambda: denoise_rows(model, hidden, knobs, runner.step_idx[idx], runner.canvas_idx[idx],
                                            runner.history[idx], runner.budget, core=runner.sampler_core),
                       model.device, 5)
    cfg = model.config
    per_token = 2 * active_params(cfg) + 4 * cfg.vocab_size * cfg.hidden_size     # + LM head + soft embedding
    network = t_dec + t_head + t_soft
    return {"rows": batch, "step_s": t_step, "network_s": network, "sampler_s": max(t_rows - t_head - t_soft, 0.0),
            "network_gflops": per_token * batch * c / network / 1e9}


def active_params(cfg: ModelConfig) -> int:
    """Matmul parameters one decoder token touches (attention, dense MLP, top-k experts, router, SC MLP)."""
    h, total = cfg.hidden_size, 3 * cfg.hidden_size * cfg.intermediate_size
    for i in range(cfg.num_hidden_layers):
        d, kv = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        v = kv * d if cfg.layer_types[i] != "full_attention" else 0
        total += h * cfg.num_attention_heads * d * 2 + h * kv * d + h * v
        total += 3 * h * cfg.intermediate_size + 3 * h * cfg.moe_intermediate_size * cfg.top_k_experts
        total += h * cfg.num_experts
    return total


def sampler_memory(budget_mb: float, device: str) -> dict:
    """64 concurrent requests on a 262,144-token vocabulary (a narrow model): peak memory of the run."""
    from .engine.engine import LLM
    from .engine.request import SamplingParams

    cfg = ModelConfig(vocab_size=262144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      layer_types=["sliding_attention", "full_attention"], num_attention_heads=2, num_key_value_heads=1,
                      head_dim=32, global_head_dim=32, num_experts=2, top_k_experts=1, moe_intermediate_size=32,
                      canvas_length=16, sliding_window=64)
    with torch.device(device):
        model = init_weights(DiffusionGemma(cfg), seed=0).eval()
    llm = LLM(model, tokenizer=None, max_num_seqs=64, max_model_len=64, sampler_memory_mb=budget_mb)
    sp = [SamplingParams(max_tokens=16, seed=i, max_denoising_steps=2, ignore_eos=True) for i in range(64)]
    prompts = prompts_for(64, 8, cfg.vocab_size)
    with PeakMemory(device) as mem:
        outs = llm.generate(prompts, sp)
    naive = 64 * 16 * cfg.vocab_size * 4 / 2**20      # one fp32 (rows x canvas x vocab) tensor
    return {"peak_mb": mem.mb, "budget_mb": budget_mb, "one_full_logits_tensor_mb": naive,
            "completed": sum(o.finished for o in outs)}
