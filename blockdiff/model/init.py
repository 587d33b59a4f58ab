"""Random initialisation for freshly built models (training from scratch, tests, demo checkpoints).

Linear and embedding weights ~ N(0, std); norm weights, router scales and layer scalars = 1; output
projections (o_proj, down_proj, experts.down_proj) scaled by 1/sqrt(2 * layers) as in GPT-2, so the
residual stream does not grow with depth.
"""
from __future__ import annotations

import math

import torch

from .transformer import DiffusionGemma

RESIDUAL_OUT = ("o_proj.weight", "down_proj.weight", "experts.down_proj")


@torch.no_grad()
def init_weights(model: DiffusionGemma, std: float = 0.02, seed: int | None = None) -> DiffusionGemma:
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    out_std = std / math.sqrt(2 * model.config.num_hidden_layers)
    for name, param in model.named_parameters():
        if param.ndim == 1:
            param.fill_(1.0)
            continue
        scale = out_std if name.endswith(RESIDUAL_OUT) else std
        param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).mul_(scale).to(param.dtype))
    for layer in model.layers:
        layer.layer_scalar.fill_(1.0)
        layer.encoder_layer_scalar.fill_(1.0)
    return model
