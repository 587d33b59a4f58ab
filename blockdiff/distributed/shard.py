"""One rank's model: its shard of the checkpoint, with the collectives that make it compute the whole.

Contract: `load_rank_model(path, layout, rank, dtype, device)` reads only this rank's slices
(`Layout.shard`); `parallelize(model, layout, comm)` wires the collectives in place, from outside the
model's code: a forward hook all-reduces the output of each row-parallel part (attention's o_proj,
the self-conditioning MLP's down projection), the layer's `reduce_partials` completes the dense MLP's
and the experts' partial sums in one collective, and the embedding lookup becomes
vocabulary-parallel. It returns the `VocabShard` whose `tile_step` the runner's sampler uses. Per
layer that is two all-reduces, one per block: attention's (tokens, H), then the feed-forward's
(2, tokens, H) (the dense MLP and the experts each have their own norm right after them, so their
sums travel side by side rather than added).
"""
from __future__ import annotations

import torch

from ..checkpoint import load_model
from ..model.transformer import DiffusionGemma
from .comm import Comm
from .layout import Layout
from .vocab import VocabShard


def load_rank_model(path, layout: Layout, rank: int, dtype: torch.dtype, device) -> DiffusionGemma:
    return load_model(path, dtype=dtype, device=device, shard=layout.shard(rank))


def parallelize(model: DiffusionGemma, layout: Layout, comm: Comm) -> VocabShard:
    @torch.compiler.disable                 # a compiled layer breaks its graph here, around the collective
    def reduce(module, args, out):         # the module's partial sum -> the full output, on every rank
        return comm.all_reduce(out)

    @torch.compiler.disable
    def reduce_pair(dense, moe):           # (B, S, H) partial sums each -> whole, in one all-reduce
        both = comm.all_reduce(torch.stack((dense, moe)))
        return both[0], both[1]

    for layer in model.layers:
        layer.self_attn.o_proj.register_forward_hook(reduce)
        layer.reduce_partials = reduce_pair
    model.self_conditioning.down_proj.register_forward_hook(reduce)
    lo, hi = layout.vocab_range(comm.rank)
    vocab = VocabShard(model, comm, lo, hi, layout.vocab_sizes())
    model.embed = vocab.embed
    return vocab
