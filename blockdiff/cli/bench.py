"""Orchestrates `blockdiff bench`: runs the measurements of `bench.py`, prints a table, writes a PNG,
and prints one JSON line last with every figure (the contract benchmark readers rely on). With
`--tensor-parallel-size N` it measures one device against N instead (`distributed/bench.py`)."""
from __future__ import annotations

import json
import sys
from math import nan
import tempfile
from pathlib import Path

import torch

from .. import bench
from .common import add_device_flags, positive, setup


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark blockdiff vs transformers vs AR decoding",
                       description="Measure blockdiff's engine against transformers' generate() and AR decoding "
                                   "on the same random-weight checkpoint. The last output line is JSON.")
    p.add_argument("--preset", choices=sorted(bench.PRESETS), default="small",
                   help="model shapes: small (10M), medium (54M), real-vocab (the small network with a 262,144-token "
                        "vocabulary and canvas 256), 26b-a4b (the released shapes: with --quant, built directly quantized "
                        "and served with a --max-model-len KV cache) (default small)")
    p.add_argument("--steps", type=int, default=16, help="fixed denoising steps per canvas (default 16)")
    p.add_argument("--batch-sizes", default="1,4,16,64", help="comma-separated batch sizes (default 1,4,16,64)")
    p.add_argument("--canvases", type=int, default=2, help="canvases generated per request (default 2)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request (default 32)")
    p.add_argument("--repeat", type=int, default=1,
                   help="time each blockdiff and transformers run this many times and keep the fastest "
                        "(shared machines are noisy; default 1)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    p.add_argument("--no-adaptive", action="store_true", help="time fixed-step runs only, not adaptive stopping too")
    p.add_argument("--sampler-budget-mb", type=float, default=256, help="sampler temporary memory budget (MB)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="where the plot and checkpoint go")
    p.add_argument("--quant", metavar="SCHEME", default=None,
                   help="instead: a quantized copy (w8a8, w4a16, w4a16-experts) against the same model in the "
                        "default dtype, batch 1 and 16, with stored weight sizes")
    p.add_argument("--structured", action="store_true",
                   help="instead: structured output, the validity of 32 JSON schemas on the default model and "
                        "the tok/s of batch-16 JSON-schema requests against free ones on --preset")
    p.add_argument("--seeds", type=int, default=2, help="--structured: seeds per schema (default 2)")
    p.add_argument("--embedding", choices=["bf16", "int8"], default="bf16",
                   help="the embedding (tied LM head) of the pack measured by --quant: bf16 keeps it as "
                        "stored; int8 stores int8 rows and runs the LM head int8 x int8 (default bf16)")
    p.add_argument("--max-model-len", type=int, default=32768,
                   help="KV cache positions for the released-shapes run (--preset 26b-a4b --quant; default 32768)")
    add_device_flags(p, device="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.repeat < 1:
        raise ValueError("--repeat must be >= 1")
    setup(args)
    positive(args, "tensor_parallel_size")
    with tempfile.TemporaryDirectory(prefix="blockdiff-bench-") as tmp:
        if args.tensor_parallel_size > 1:
            from ..distributed.bench import measure_parallel

            return measure_parallel(args, Path(tmp))
        if args.structured:
            return measure_structured(args, Path(tmp))
        if args.quant and args.preset in bench.RELEASED:
            return measure_released(args, Path(tmp))
        return measure_quant(args, Path(tmp)) if args.quant else measure(args, Path(tmp))


def measure_structured(args, root: Path) -> int:
    from ..bench_structured import overhead, validity
    from .common import DEFAULT_MODEL

    res = {"validity": validity(DEFAULT_MODEL, args.seeds, 128),
           "validity_commit_only": validity(DEFAULT_MODEL, args.seeds, 128, guide=False),
           "overhead": overhead(args.preset, root, DEFAULT_MODEL, 16, args.steps, args.canvases, args.prompt_len,
                                args.repeat)}
    for name in ("validity", "validity_commit_only"):
        v = res[name]
        print(f"{name}: stop {v['stop']}/{v['requests']} ({v['stop_share']:.1%}), valid {v['valid_stop']}/{v['stop']}, "
              f"{v['repaired_share']:.1%} of tokens repaired, {v['steps_per_canvas']:.1f} steps/canvas")
    print(f"constrained/free tok/s at batch 16: {res['overhead']['constrained_vs_free']:.3f}")
    print(json.dumps(res, sort_keys=True))
    return 0


def measure_released(args, root: Path) -> int:
    from ..bench_released import measure_released as run_released
    from ..quant.scheme import get_scheme

    get_scheme(args.quant).with_embedding(args.embedding)
    res = run_released(args.quant, args.preset, root, None if args.dtype is None else getattr(torch, args.dtype),
                       args.device, args.steps, args.prompt_len, args.canvases, args.max_model_len, args.embedding,
                       args.compile)
    for key in ("weights_gb", "load_s", "kv_cache_gib", "peak_rss_gib", "step_s", "tok_per_s"):
        print(f"{key:>14}: {res[key]:.3f}")
    print(json.dumps(res, sort_keys=True))
    return 0


def measure_quant(args, root: Path) -> int:
    from ..bench_quant import measure_quant as run_quant
    from ..hardware import auto_dtype
    from ..quant.scheme import get_scheme

    get_scheme(args.quant).with_embedding(args.embedding)      # an unknown scheme fails before any work
    dtype = auto_dtype(args.device) if args.dtype is None else getattr(torch, args.dtype)
    res = run_quant(args.quant, args.preset, root, dtype, args.device, args.steps, args.prompt_len,
                    args.canvases, args.repeat, args.embedding, args.compile)
    for key in ("weights_bytes", "weights_bytes_bf16", "quant_speedup_bs1", "quant_speedup_bs16"):
        print(f"{key:>20}: {res[key]:.3f}" if isinstance(res[key], float) else f"{key:>20}: {res[key]}")
    print(json.dumps(res, sort_keys=True))
    return 0


def measure(args, ckpt: Path) -> int:
    """All measurements on one random checkpoint written to `ckpt` (transformers reads it too)."""
    from ..engine.engine import LLM
    from ..hardware import auto_dtype

    sizes = [int(s) for s in args.batch_sizes.split(",")]
    dtype = auto_dtype(args.device) if args.dtype is None else getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    model = bench.build_checkpoint(args.preset, ckpt, torch.float32, args.device)
    c = model.config.canvas_length
    max_tokens = args.canvases * c
    res = {"preset": args.preset, "device": str(args.device), "dtype": str(dtype).replace("torch.", ""),
           "steps": args.steps, "canvas": c, "max_tokens": max_tokens, "threads": torch.get_num_threads(),
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    fp32 = LLM(model, tokenizer=None, max_num_seqs=16, max_model_len=args.prompt_len + max_tokens + c)
    res["blockdiff_fp32_bs1_tok_s"] = bench.run_engine(fp32, 1, args.prompt_len, max_tokens, args.steps, True)["tok_s"]
    del fp32
    model = model.to(dtype)
    llm = LLM(model, tokenizer=None, max_num_seqs=max(sizes + [16]), max_model_len=args.prompt_len + max_tokens + c,
              sampler_memory_mb=args.sampler_budget_mb, compile=args.compile)
    res["compile"] = llm.compiled
    for bs in sizes:
        for mode, fixed in (("fixed", True), ("adaptive", False))[:1 if args.no_adaptive else 2]:
            r = bench.run_engine(llm, bs, args.prompt_len, max_tokens, args.steps, fixed, args.repeat)
            res.update({f"{mode}_bs{bs}_{k}": v for k, v in r.items()})
            print(f"blockdiff {mode:8s} bs={bs:3d}: {r['tok_s']:8.1f} tok/s  p50 {r['p50_s']:.2f}s  "
                  f"p99 {r['p99_s']:.2f}s  peak {r['peak_mem_mb']:.0f} MB", file=sys.stderr, flush=True)
    res["ar_bs1_tok_s"] = bench.run_ar(model, args.prompt_len, max_tokens)
    res["diffusion_vs_ar_bs1"] = res["fixed_bs1_tok_s"] / res["ar_bs1_tok_s"]
    mm = bench.mm_throughput(model, 16 * c)
    br = bench.step_breakdown(llm, min(16, max(sizes)), args.prompt_len)
    res.update(mm_gflops=mm, **{f"step_{k}": v for k, v in br.items()})
    res["matmul_fraction"] = br["network_gflops"] / mm
    res["sampler_fraction"] = br["sampler_s"] / br["step_s"]
    mem = bench.sampler_memory(args.sampler_budget_mb, args.device)
    res.update(peak_sampler_mem_mb=mem["peak_mb"], sampler_mem_budget_mb=mem["budget_mb"],
               sampler_mem_naive_mb=mem["one_full_logits_tensor_mb"], sampler_mem_completed=mem["completed"])
    if not args.no_transformers and args.preset != "26b-a4b":
        compare_transformers(args, res, llm, ckpt, max_tokens)
    print_table(res, sizes)
    plot(res, sizes, args.out / f"bench_{args.preset}.png")
    print(json.dumps(res, sort_keys=True))
    return 0


def compare_transformers(args, res: dict, llm, ckpt: Path, max_tokens: int) -> None:
    """transformers' generate() at batch 1 and 16 beside blockdiff's fixed-step runs; a batch size whose
    (batch x canvas x vocab) fp32 temporaries would not fit half the available memory is skipped
    (its estimate is recorded)."""
    cfg = llm.model.config
    for bs in (1, 16):
        need = bench.transformers_temporaries(bs, cfg.canvas_length, cfg.vocab_size)
        if need > bench.available_memory() / 2:
            res[f"transformers_bs{bs}_skipped_need_gb"] = need / 2**30
            print(f"transformers bs={bs} skipped: ~{need / 2**30:.0f} GB of temporaries", file=sys.stderr, flush=True)
            continue
        if f"fixed_bs{bs}_tok_s" not in res:          # same batch size on both sides
            r = bench.run_engine(llm, bs, args.prompt_len, max_tokens, args.steps, True, args.repeat)
            res[f"fixed_bs{bs}_tok_s"] = r["tok_s"]
        hf = bench.run_transformers_fresh(ckpt, bs, args.prompt_len, max_tokens, args.steps, cfg.vocab_size, args.repeat)
        res[f"transformers_bs{bs}_tok_s"] = hf
        res[f"speedup_vs_transformers_bs{bs}"] = res[f"fixed_bs{bs}_tok_s"] / hf
    if "transformers_bs1_tok_s" in res:
        res["speedup_vs_transformers_bs1_fp32"] = res["blockdiff_fp32_bs1_tok_s"] / res["transformers_bs1_tok_s"]


def print_table(res: dict, sizes: list[int]) -> None:
    print(f"\n{res['preset']} preset, {res['params_m']:.1f}M params, {res['dtype']} on {res['device']}, "
          f"{res['steps']} steps, canvas {res['canvas']}, {res['max_tokens']} tokens/request")
    print(f"{'batch':>6} {'fixed tok/s':>12} {'adaptive tok/s':>15} {'p50 s':>7} {'p99 s':>7} {'peak MB':>8}")
    for bs in sizes:
        print(f"{bs:>6} {res[f'fixed_bs{bs}_tok_s']:>12.1f} {res.get(f'adaptive_bs{bs}_tok_s', nan):>15.1f} "
              f"{res[f'fixed_bs{bs}_p50_s']:>7.2f} {res[f'fixed_bs{bs}_p99_s']:>7.2f} "
              f"{res[f'fixed_bs{bs}_peak_mem_mb']:>8.0f}")
    for key in ("transformers_bs1_tok_s", "transformers_bs16_tok_s", "speedup_vs_transformers_bs1",
                "speedup_vs_transformers_bs16", "ar_bs1_tok_s", "diffusion_vs_ar_bs1", "matmul_fraction",
                "sampler_fraction", "peak_sampler_mem_mb"):
        if key in res:
            print(f"{key:>32}: {res[key]:.3f}")


def plot(res: dict, sizes: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [res[f"fixed_bs{b}_tok_s"] for b in sizes], "o-", label=f"blockdiff, {res['steps']} fixed steps")
    if f"adaptive_bs{sizes[0]}_tok_s" in res:
        ax.plot(sizes, [res[f"adaptive_bs{b}_tok_s"] for b in sizes], "s--", label="blockdiff, adaptive stop")
    hf = [(b, res[f"transformers_bs{b}_tok_s"]) for b in (1, 16) if f"transformers_bs{b}_tok_s" in res]
    if hf:
        ax.plot(*zip(*hf), "x:", label="transformers generate()")
    ax.plot([1], [res["ar_bs1_tok_s"]], "^", label="blockdiff AR (same weights)")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="tokens / s",
           title=f"{res['preset']} preset on {res['device']} ({res['dtype']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
