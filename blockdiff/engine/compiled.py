"""torch.compile for the engine's model, in place, without touching the model's code.

Contract: `compile_model(model)` replaces, on each layer instance, the two context-free parts of the
layer (`Attention.project`: projections, norms, RoPE; `Layer.feed_forward`: norms, dense MLP, router,
residual) by compiled versions with dynamic shapes, so one graph per layer kind serves every batch
size and context length. The attention over the cache (the context's gathers and masks) stays
eager: compiled, it would specialise on the layer index and recompile. Grouped bf16 experts compile
with the layer; the per-expert loop (where `grouped_mm` is missing) needs a host sync and stays eager,
and so do fp32 grouped experts (torch's compile-time shape rule for `grouped_mm` wants bf16).
Idempotent.
"""
from __future__ import annotations

import torch

from ..model.transformer import DiffusionGemma


def inductor_options(device: torch.device) -> dict:
    """CPU: a C++ wrapper launches each graph's kernels instead of Python (fewer microseconds per
    kernel launch, which dominate small models' steps)."""
    return {"cpp_wrapper": True} if device.type == "cpu" else {}


def raise_recompile_limit(limit: int = 64) -> None:
    """Dynamo counts graphs per code object, and every layer of every model shares `project`'s and
    `feed_forward`'s: layer kinds (their head sizes), dtypes, and batch or length specialised at 1 add
    up past torch's default of 8 (seen on CUDA in `bench`, whose models run in two dtypes), after
    which further variants run eager without a word but a warning."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def compile_model(model: DiffusionGemma) -> DiffusionGemma:
    if getattr(model, "_blockdiff_compiled", False):
        return model
    raise_recompile_limit()
    options = inductor_options(model.device)
    for layer in model.layers:
        if not layer.experts.compiles_with_layer():
            layer.experts.forward = torch.compiler.disable(layer.experts.forward)
        layer.feed_forward = torch.compile(layer.feed_forward, dynamic=True, options=options)
        layer.self_attn.project = torch.compile(layer.self_attn.project, dynamic=True, options=options)
    model._blockdiff_compiled = True
    return model
