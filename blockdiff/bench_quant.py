"""`blockdiff bench --quant SCHEME`: a quantized model against the same model in the engine's
default dtype for the device (bf16 where it has fast bf16, else fp32), measured in one run.

The random-weight checkpoint is written in bf16 (as released models are), quantized with
`blockdiff quantize` (its embedding kept or stored as int8 rows: `embedding`), and both versions run
the same requests with fixed denoising steps. Reports tok/s at batch 1 and 16, their ratios
(`quant_speedup_bs1`, `quant_speedup_bs16`), the stored weight bytes of both (`weights_bytes`,
`weights_bytes_bf16`) and the mean steps per canvas with adaptive stopping (does quantization slow
convergence?).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open

from .bench import build_checkpoint, run_engine
from .hf_layout import weight_files
from .quant.convert import ITEMSIZE, quantize


def weights_bytes(path: Path) -> int:
    """Bytes of every stored tensor of a checkpoint directory (from the headers)."""
    total = 0
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                total += torch.Size(sl.get_shape()).numel() * ITEMSIZE.get(sl.get_dtype(), 1)
    return total


def measure_quant(scheme: str, preset: str, root: Path, dtype: torch.dtype, device: str, steps: int,
                  prompt_len: int, canvases: int, repeat: int, embedding: str = "bf16",
                  compile: bool | None = None) -> dict:
    from .checkpoint import load_model
    from .engine.engine import LLM

    model = build_checkpoint(preset, root / "bf16", torch.bfloat16, device)
    del model
    pack = quantize(root / "bf16", root / scheme, scheme, progress=False, embedding=embedding)
    res = {"quant": scheme, "embedding": embedding, "preset": preset, "dtype": str(dtype).replace("torch.", ""),
           "device": device, "steps": steps, "threads": torch.get_num_threads(),
           "weights_bytes": weights_bytes(pack), "weights_bytes_bf16": weights_bytes(root / "bf16")}
    for label, path in (("base", root / "bf16"), ("quant", pack)):
        llm = LLM(load_model(path, dtype, device), tokenizer=None, max_num_seqs=16,
                  max_model_len=prompt_len + (canvases + 1) * 256, compile=compile)
        res["compile"] = llm.compiled
        max_tokens = canvases * llm.model.config.canvas_length
        for bs in (1, 16):
            r = run_engine(llm, bs, prompt_len, max_tokens, steps, True, repeat, memory=False)
            res[f"{label}_bs{bs}_tok_s"] = r["tok_s"]
            print(f"{label:5s} bs={bs:2d}: {r['tok_s']:8.1f} tok/s", file=sys.stderr, flush=True)
        res[f"{label}_adaptive_steps_per_canvas"] = run_engine(llm, 16, prompt_len, max_tokens, steps, False,
                                                               memory=False)["steps_per_canvas"]
        del llm
    for bs in (1, 16):
        res[f"quant_speedup_bs{bs}"] = res[f"quant_bs{bs}_tok_s"] / res[f"base_bs{bs}_tok_s"]
    return res
