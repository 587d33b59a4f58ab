"""Random initialisation for freshly built models (training from scratch, tests, demo checkpoints).

Every matrix (embedding, projections, experts, router) ~ N(0, std); norm weights, router scales and
layer scalars = 1. No depth-dependent rescaling: the sandwich norms (post-attention and post-FFN
RMSNorms) already keep each residual update's scale independent of depth.
"""
from __future__ import annotations

import torch

from .transformer import DiffusionGemma


@torch.no_grad()
def init_weights(model: DiffusionGemma, std: float = 0.02, seed: int | None = None,
                 generator: torch.Generator | None = None) -> DiffusionGemma:
    if generator is None:
        generator = torch.Generator(device="cpu")
        if seed is not None:
            generator.manual_seed(seed)
    for param in model.parameters():
        if param.ndim >= 2:
            sample = torch.empty(param.shape, dtype=torch.float32, device="cpu").normal_(0.0, std, generator=generator)
            param.copy_(sample.to(param.dtype))
        else:
            param.fill_(1.0)
    for layer in model.layers:
        layer.layer_scalar.fill_(1.0)
        layer.encoder_layer_scalar.fill_(1.0)
    return model
