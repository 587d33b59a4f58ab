"""torch.compile for the engine's model, in place, without touching the model's code.

Contract: `compile_model(model)` replaces, on each layer instance, the two context-free parts of the
layer (`Attention.project`: projections, norms, RoPE; `Layer.feed_forward`: norms, dense MLP, router,
residual) by compiled versions with dynamic shapes, so one graph per layer kind serves every batch
size and context length. The attention over the cache (the context's gathers and masks) and the
experts (their per-expert split needs a host sync) stay eager: compiled, they would specialise on
the layer index or on each step's expert counts and recompile. Idempotent.
"""
from __future__ import annotations

import torch

from ..model.transformer import DiffusionGemma


def compile_model(model: DiffusionGemma) -> DiffusionGemma:
    if getattr(model, "_blockdiff_compiled", False):
        return model
    for layer in model.layers:
        layer.experts.forward = torch.compiler.disable(layer.experts.forward)
        layer.feed_forward = torch.compile(layer.feed_forward, dynamic=True)
        layer.self_attn.project = torch.compile(layer.self_attn.project, dynamic=True)
    model._blockdiff_compiled = True
    return model
