"""The tensor- and expert-parallel layout of a DiffusionGemma model over N ranks.

Contract: `Layout.check(config, N)` validates N against the model (a `ValueError` naming the field
it does not divide); `layout.shard(rank)` says what rank `r` holds, by parameter name, as the
slice of the full checkpoint tensor (the loader reads only that slice) and builds the rank's
meta-device skeleton with those shapes. What is split, and along which axis:
- attention: q/k/v projections by heads (column parallel, dim 0), o_proj by the same heads
  (row parallel, dim 1). KV heads are split when N divides them; when N is a multiple of them,
  each KV head is held by N / kv ranks (the ranks whose query heads use it), as in vLLM.
- dense MLP and the self-conditioning MLP: gate/up by columns (dim 0), down by rows (dim 1).
- experts: whole experts per rank (expert parallel): rank r holds ids [r E/N, (r+1) E/N).
- the tied embedding / LM head: by vocabulary rows, contiguous ranges, the first V mod N ranks
  one row more (the vocabulary need not divide).
- everything else (norms, router, layer scalars, a vision tower) is replicated.
Quantized checkpoints split the same way: int4 values packed 8 to an int32 word along K and their
group scales are sliced along the same axis as the weight (a group or word that would straddle two
ranks is a `ValueError` naming the tensor), per-channel and per-tensor scales along the split axis
are held whole, and the per-expert tensors of quantized experts are renumbered from the rank's first
expert.
A rank's model is built from `local_config()` (heads, KV heads and intermediate size per rank), so
the model's own modules have the shard shapes; only the embedding and the experts are resized.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..model.transformer import DiffusionGemma
from ..quant.modules import QuantExperts, QuantLinear

# (pattern over our parameter names, what the rank holds). A linear's tensors are its dense `weight`,
# or, quantized (compressed-tensors), its int8/fp8 `weight` or int4 `weight_packed` and `weight_scale`.
LINEAR = r"(?:weight|weight_packed|weight_scale)"
RULES = (
    (re.compile(r"embed_tokens\.weight"), "vocab"),
    (re.compile(rf"layers\.\d+\.self_attn\.q_proj\.{LINEAR}"), "rows"),
    (re.compile(rf"layers\.(\d+)\.self_attn\.[kv]_proj\.{LINEAR}"), "kv_rows"),
    (re.compile(rf"layers\.\d+\.self_attn\.o_proj\.{LINEAR}"), "columns"),
    (re.compile(rf"(?:layers\.\d+\.mlp|self_conditioning)\.(?:gate|up)_proj\.{LINEAR}"), "rows"),
    (re.compile(rf"(?:layers\.\d+\.mlp|self_conditioning)\.down_proj\.{LINEAR}"), "columns"),
    (re.compile(r"layers\.\d+\.experts\.(?:gate_up|down)_proj"), "rows"),    # dim 0 is the expert
)
QUANT_EXPERT = re.compile(r"(layers\.\d+\.experts)\.(\d+)\.(.+)")       # quantized experts: one per name


def _check_divides(world: int, value: int, field: str, why: str) -> None:
    if value % world:
        raise ValueError(f"tensor_parallel_size {world} must divide {field} ({value}): {why}")


@dataclass(frozen=True)
class Layout:
    config: ModelConfig          # the full model's
    world: int

    @classmethod
    def check(cls, config: ModelConfig, world) -> Layout:
        """The layout of `config` over `world` ranks, or a ValueError naming what does not divide."""
        if not isinstance(world, int) or isinstance(world, bool) or world < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {world!r}")
        _check_divides(world, config.num_attention_heads, "num_attention_heads", "query heads are split across ranks")
        kv_fields = {"num_key_value_heads": config.num_key_value_heads,
                     "num_global_key_value_heads": config.num_global_key_value_heads}
        for field, kv in kv_fields.items():
            if kv is not None and kv % world and world % kv:
                raise ValueError(f"tensor_parallel_size {world} must divide {field} ({kv}) or be a multiple of "
                                 "it: key/value heads are split across ranks, or each held by several")
        _check_divides(world, config.intermediate_size, "intermediate_size", "MLP columns are split across ranks")
        _check_divides(world, config.num_experts, "num_experts", "experts are split across ranks")
        if config.vocab_size < world:
            raise ValueError(f"tensor_parallel_size {world} exceeds vocab_size ({config.vocab_size})")
        return cls(config, world)

    def local_config(self) -> ModelConfig:
        """The config a rank builds its modules from: its share of heads, KV heads and MLP columns.
        vocab_size and num_experts stay global (the sampler's noise and the router use them)."""
        c, n = self.config, self.world
        gkv = c.num_global_key_value_heads
        return dataclasses.replace(
            c, num_attention_heads=c.num_attention_heads // n, num_key_value_heads=max(1, c.num_key_value_heads // n),
            num_global_key_value_heads=None if gkv is None else max(1, gkv // n),
            intermediate_size=c.intermediate_size // n)

    def vocab_range(self, rank: int) -> tuple[int, int]:
        """Token ids [lo, hi) whose embedding rows `rank` holds."""
        base, extra = divmod(self.config.vocab_size, self.world)
        lo = rank * base + min(rank, extra)
        return lo, lo + base + (rank < extra)

    def vocab_sizes(self) -> list[int]:
        return [hi - lo for lo, hi in map(self.vocab_range, range(self.world))]

    def expert_range(self, rank: int) -> tuple[int, int]:
        n = self.config.num_experts // self.world
        return rank * n, (rank + 1) * n

    def shard(self, rank: int) -> Shard:
        return Shard(self, rank)


@dataclass(frozen=True)
class Shard:
    """What one rank holds; `checkpoint.load_model(..., shard=)` reads through it."""
    layout: Layout
    rank: int

    def index(self, name: str, shape: tuple[int, ...]) -> tuple[slice, ...]:
        """The slice of the full tensor `name` (of `shape`) that this rank holds; () = all of it."""
        for pattern, kind in RULES:
            m = pattern.fullmatch(name)
            if m:
                return self._slice(kind, m, name, shape)
        return ()

    def _slice(self, kind: str, m: re.Match, name: str, shape: tuple[int, ...]) -> tuple[slice, ...]:
        r, n = self.rank, self.layout.world
        if kind == "vocab":
            return (slice(*self.layout.vocab_range(r)),)
        dim = 0 if kind != "columns" else 1
        if len(shape) <= dim or shape[dim] == 1:    # a per-tensor or per-channel scale: all of it
            return ()
        if kind == "kv_rows":        # whole KV heads: split, or each held by n / kv ranks
            layer = int(m.group(1))
            kv, d = self.layout.config.layer_kv_heads(layer), self.layout.config.layer_head_dim(layer)
            first = r * kv // n
            return (slice(first * d, (first + max(1, kv // n)) * d),)
        if shape[dim] % n:           # int4 words of 8 values and scale groups must not straddle two ranks
            raise ValueError(f"tensor '{name}' of shape {list(shape)} does not split into {n} equal parts "
                             f"along dim {dim} (a quantization group or packed word would straddle two ranks)")
        size = shape[dim] // n
        return (slice(None),) * dim + (slice(r * size, (r + 1) * size),)

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this rank's slice of `name`."""
        out = list(shape)
        for i, s in enumerate(self.index(name, shape)):
            out[i] = len(range(*s.indices(shape[i])))
        return tuple(out)

    def local_name(self, name: str) -> str | None:
        """The rank's name for checkpoint tensor `name`: a quantized expert's tensors are numbered
        from the rank's first expert, and are None on the ranks that do not hold that expert."""
        m = QUANT_EXPERT.fullmatch(name)
        if m is None:
            return name
        lo, hi = self.layout.expert_range(self.rank)
        e = int(m.group(2))
        return f"{m.group(1)}.{e - lo}.{m.group(3)}" if lo <= e < hi else None

    def read(self, tensor_slice, name: str) -> torch.Tensor:
        """This rank's part of a full tensor: a torch tensor or a safetensors slice (read lazily). An
        int4 linear's `weight_shape` (its (N, K)) becomes the shape of the rank's slice."""
        if name.endswith(".weight_shape"):
            full = tuple(int(v) for v in tensor_slice[:])
            return torch.tensor(self.shape(name.removesuffix("_shape"), full), dtype=torch.int64)
        full = tuple(tensor_slice.shape) if isinstance(tensor_slice, torch.Tensor) else tuple(tensor_slice.get_shape())
        index = self.index(name, full)
        return tensor_slice[index] if index else tensor_slice[:]

    def skeleton(self, config: ModelConfig | None = None) -> DiffusionGemma:
        """The rank's model on the meta device: local heads and MLP columns (from the local config),
        its vocabulary rows, and its E / N experts (router ids [lo, hi)). `config`: the layout's, as
        the loader settled it (a vision tower only where the checkpoint holds one); a vision tower is
        held whole by every rank."""
        layout = self.layout if config is None else Layout(config, self.layout.world)
        with torch.device("meta"):
            model = DiffusionGemma(layout.local_config())
            lo, hi = layout.vocab_range(self.rank)
            model.embed_tokens = torch.nn.Embedding(hi - lo, layout.config.hidden_size)
            first, last = layout.expert_range(self.rank)
            for layer in model.layers:
                experts = layer.experts
                for name in ("gate_up_proj", "down_proj"):           # (E, ...) -> (E / N, ...)
                    setattr(experts, name, torch.nn.Parameter(getattr(experts, name)[first:last]))
                experts.hold(first, last - first, layout.config.num_experts)
        return model

    def finish_quantized(self, model: DiffusionGemma) -> None:
        """After the quantized modules replaced the skeleton's (`quant.load.quantize_skeleton` builds
        every expert, and int4 linears with the rank's input size): keep this rank's E / N experts,
        and refuse an int4 linear whose scale groups straddle two ranks."""
        first, last = self.layout.expert_range(self.rank)
        for name, module in model.named_modules():
            if isinstance(module, QuantExperts) and module.num_experts > last - first:
                for e in range(last - first, module.num_experts):
                    del module._modules[str(e)]
                module.num_experts = last - first
                module.hold(first, last - first, self.layout.config.num_experts)
            elif isinstance(module, QuantLinear) and module.args.bits == 4 and module.args.group_size and \
                    module.in_features % module.args.group_size:
                raise ValueError(f"'{name}': int4 groups of {module.args.group_size} inputs do not split over "
                                 f"{self.layout.world} ranks ({module.in_features} inputs per rank); quantize "
                                 "with smaller groups or use fewer ranks")
