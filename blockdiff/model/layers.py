"""Building blocks of a DiffusionGemma layer: RMSNorm, rotary tables, dense MLP, router and experts.

Numerics follow transformers 5.23.0 (its Gemma 4 norms, RoPE and MoE) so that fp32 matches to
~1e-6 and bf16 is bit-exact against its eager backends:
- RMSNorm computes in fp32 with `pow(mean(x^2) + eps, -0.5)` and a plain `w` scale (not `1 + w`).
- RoPE tables are built in fp32 from positions and cast once to the activation dtype.
- The router normalises and scales in the activation dtype, takes softmax/top-k in fp32.
- Experts accumulate in the activation dtype, ascending expert id (the reference's eager order).
Module and parameter names equal the checkpoint's, so loading is a plain name copy.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FULL, ModelConfig


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; `with_scale=False` is the weight-free variant (v_norm, router.norm)."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is one fused kernel that computes in fp32 and rounds once, equal bit for bit to
        # x.float() * pow(mean(x^2) + eps, -0.5) * w.float() cast back (checked by the bf16 parity tests).
        if self.weight is not None and self.weight.dtype != x.dtype:
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Rotary:
    """Per-layer-type RoPE frequencies. Not an nn.Module on purpose: `inv_freq` must stay fp32 when
    the model is cast to bf16 (transformers keeps it fp32 in `from_pretrained(dtype=bf16)`)."""

    def __init__(self, config: ModelConfig):
        self.inv_freq: dict[str, torch.Tensor] = {}
        for kind in set(config.layer_types):
            dim = config.global_head_dim if kind == FULL else config.head_dim
            params = config.rope_parameters[kind]
            theta = float(params.get("rope_theta", 10_000.0))
            # default: 1/theta^(2j/D) for all D/2 pairs; proportional: only the first
            # int(p*D//2) pairs rotate (exponent still over the full D), the rest get frequency 0.
            inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
            if params.get("rope_type", "default") == "proportional":
                rotated = int(params.get("partial_rotary_factor", 1.0) * dim // 2)
                inv[rotated:] = 0.0
                inv = inv / float(params.get("factor", 1.0))
            self.inv_freq[kind] = inv

    def cos_sin(self, kind: str, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, S) int -> cos, sin (B, S, 1, D) in `dtype`, ready to broadcast over heads."""
        inv = self.inv_freq[kind].to(positions.device)
        freqs = positions.float()[..., None] * inv          # (B, S, D/2) fp32
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation (not interleaved): x (B, S, H, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class MLP(nn.Module):
    """Gated GELU-tanh MLP: down(gelu(gate(x)) * up(x)). Used as the dense 'shared expert' and in the
    vision tower (there with `linear=` its clippable linear)."""

    def __init__(self, hidden: int, inner: int, linear=nn.Linear):
        super().__init__()
        self.gate_proj = linear(hidden, inner, bias=False)
        self.up_proj = linear(hidden, inner, bias=False)
        self.down_proj = linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Top-k expert choice from the *un-normalised* residual stream."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.top_k_experts
        self.root_size = config.hidden_size ** -0.5
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, H) -> weights (T, k) fp32, expert ids (T, k)."""
        z = self.norm(x) * self.scale * self.root_size
        probs = F.softmax(self.proj(z), dim=-1, dtype=torch.float32)
        weights, idx = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[idx], idx


@functools.cache
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch build runs `F.grouped_mm` on the device in `dtype` (probed once)."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        a, b = torch.ones(3, 16, device=device_type, dtype=dtype), torch.ones(2, 16, 16, device=device_type, dtype=dtype)
        F.grouped_mm(a, b, offs=torch.tensor([1, 3], device=device_type, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


class Experts(nn.Module):
    """E gated-GELU experts stored as stacked weights: gate_up (E, 2*I, H), down (E, H, I)."""
    # expert parallelism (`hold`): this module holds router ids [first, first + held), not all of them
    first, held, partial = 0, 0, False

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, i, h = config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.grouped = False

    def hold(self, first: int, held: int, routed: int) -> None:
        """Expert parallelism: this module holds the router's ids [first, first + held) of `routed`;
        token slots routed elsewhere add nothing here (the rank holding their expert adds them)."""
        self.first, self.held, self.partial = first, held, held < routed

    def use_grouped_mm(self) -> bool:
        """Inference: run all experts as two grouped matmuls, with fixed shapes and no host sync
        (what lets torch.compile take the whole layer). The weights keep their shapes and values but
        are stored input-major in memory, (E, H, 2I) and (E, I, H), the layout `grouped_mm` reads
        fast; training (grad enabled) keeps the per-expert loop. False where unsupported."""
        w = self.gate_up_proj
        if not self.grouped and grouped_mm_works(w.device.type, w.dtype):
            for p in (self.gate_up_proj, self.down_proj):
                p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)
            self.grouped = True
        return self.grouped

    def compiles_with_layer(self) -> bool:
        """Whether torch.compile can take this module with its layer: the per-expert loop's host sync
        would break the graph, and torch's compile-time shape rule for grouped_mm (CUDA-minded)
        accepts only bf16, though the CPU kernel also runs fp32."""
        return self.grouped and self.gate_up_proj.dtype == torch.bfloat16

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (T, H), weights/idx (T, k) -> (T, H).

        Token slots are sorted by expert once (stable, so each expert sees its tokens in ascending
        order), every expert runs on its contiguous chunk, and one `index_add_` accumulates in the
        activation dtype in ascending expert order per token: the reference's eager arithmetic.
        The grouped and the looped matmuls are different kernels: they agree within the dtype's
        rounding (tests), bit for bit only where a CPU happens to run the same blocking."""
        k = idx.shape[1]
        flat = idx.reshape(-1)
        if self.partial:                                         # other ranks' slots get id `held`: sorted last
            flat = flat - self.first
            mine = (flat >= 0) & (flat < self.held)
            flat = torch.where(mine, flat, self.held)
        order = torch.argsort(flat, stable=True)                 # slots grouped by expert
        token = order // k
        xs = x[token]                                            # (T*k, H)
        if self.grouped and not torch.is_grad_enabled():
            h = self._grouped(xs, flat[order])                   # rows past the last group: not computed
        else:
            h = self._looped(xs, flat)
        y = h * weights.reshape(-1)[order, None]                 # fp32 routing weights
        if self.partial:
            y = torch.where(mine[order, None], y, 0)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def _grouped(self, xs: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
        experts = torch.arange(self.gate_up_proj.shape[0], device=xs.device, dtype=sorted_ids.dtype)
        offs = torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)   # chunk ends
        gate, up = F.grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        return F.grouped_mm(gelu_tanh(gate) * up, self.down_proj.transpose(1, 2), offs=offs)

    def _looped(self, xs: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        held = self.gate_up_proj.shape[0]
        counts = torch.bincount(flat, minlength=held).tolist()   # the one host sync
        outs = []
        for e, chunk in enumerate(xs.split(counts)):
            if e == held:                                        # slots of other ranks' experts (sorted last)
                outs.append(chunk.new_zeros(chunk.shape[0], self.down_proj.shape[1]))
            elif chunk.shape[0]:
                gate, up = F.linear(chunk, self.gate_up_proj[e]).chunk(2, dim=-1)
                outs.append(F.linear(gelu_tanh(gate) * up, self.down_proj[e]))
        return torch.cat(outs)
