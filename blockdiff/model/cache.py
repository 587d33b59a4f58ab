"""KVCache: preallocated per-layer key/value buffers for the committed context of a batch.

Contract: `k[l]`, `v[l]` are (B, n_kv_l, max_len, D_l) tensors written by index (never grown);
`valid` (B, max_len) marks real (non-pad) tokens; `length` is how many positions are committed,
the same for every row (left padding occupies positions, as in the reference). K is stored after
k_norm and RoPE, V after v_norm. Sliding layers keep every position too; the attention context
picks the window. This simple layout serves the reference sampler and tests; the engine keeps
its own slot-based cache.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        self.max_len = max_len
        self.length = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for layer in range(config.num_hidden_layers):
            shape = (batch, config.layer_kv_heads(layer), max_len, config.layer_head_dim(layer))
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (B, n_kv, S, D) for positions [start, start + S)."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: writing up to position {end}, capacity {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
