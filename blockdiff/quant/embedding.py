"""The embedding (tied LM head) stored as int8 rows with one scale per token.

Contract: `QuantEmbedding(vocab, hidden)` replaces the model's `nn.Embedding`. Its buffers carry the
compressed-tensors names of a weight-only int8 channel-wise (`pack-quantized`) module
(`weight_packed` int32 (V, H/4), `weight_scale` (V, 1), `weight_shape`), so a checkpoint loads by
plain name copy; `pack_for_kernels()` unpacks them once to int8 (V, H) (half of bf16) and a float
(V, 1) scale in the model's dtype. From then on `.weight` is an `Int8Rows`: indexing it (a slice of
tokens, a tensor of ids, or `[:]` for all) returns those rows dequantized, `q * scale` in the
scale's dtype, so every reader of `.weight` works on dequantized rows (the streamed LM head and
soft embedding never dequantize more than a tile) and sees exactly the matrix `dequantize_weight`
gives. `.dtype`, `.device`, `.shape` and `element_size()` describe that dequantized matrix.
`linear(hidden)` is the tied LM head on the int8 rows themselves: int8 x int8 with activations
quantized per token (`kernels.Int8Weight`, packed on first use), within the activations' rounding
of `hidden @ weight[:].T`. The model's `lm_head` uses it (the materialised sampler step, AR decoding,
`logits`); the streamed vocabulary step multiplies dequantized tiles.
"""
from __future__ import annotations

import torch
from torch import nn

from .kernels import Int8Weight
from .scheme import unpack_int8


class Int8Rows:
    """q (V, H) int8 and scale (V, 1): the dequantized (V, H) matrix, materialised by rows on indexing."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q, self.scale = q, scale

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def element_size(self) -> int:
        return self.scale.element_size()

    def __getitem__(self, idx) -> torch.Tensor:
        """Rows `idx` (a slice or an id tensor of any shape) -> (..., H) in the scale's dtype."""
        return self.q[idx].to(self.scale.dtype) * self.scale[idx]


class QuantEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight_packed", torch.empty(num_embeddings, (embedding_dim + 3) // 4, dtype=torch.int32))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, 1))
        self.register_buffer("weight_shape", torch.empty(2, dtype=torch.int64))
        self.q: torch.Tensor | None = None          # after packing, like the other quantized modules'
        self.scale: torch.Tensor | None = None      # kernel weights: plain attributes, not state
        self.head: Int8Weight | None = None         # the LM head's packed weight, on first `linear`

    def pack_for_kernels(self) -> None:
        if self.q is not None:
            return
        shape = [int(v) for v in self.weight_shape]
        if shape != [self.num_embeddings, self.embedding_dim]:
            raise ValueError(f"embed_tokens: weight_shape {shape} does not match the model's "
                             f"{[self.num_embeddings, self.embedding_dim]}")
        self.q, self.scale = unpack_int8(self.weight_packed, self.embedding_dim), self.weight_scale
        for name in ("weight_packed", "weight_scale", "weight_shape"):
            del self._buffers[name]

    def linear(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head: hidden (..., H) -> (..., V) in hidden's dtype, int8 x int8."""
        if self.head is None:
            self.head = Int8Weight([(self.q, self.scale.float())])
        return self.head.mm(hidden.reshape(-1, self.embedding_dim)).reshape(*hidden.shape[:-1], self.num_embeddings)

    @property
    def weight(self) -> Int8Rows:
        return Int8Rows(self.q, self.scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"
