"""Loading a compressed-tensors checkpoint: the model's skeleton with quantized drop-ins.

Contract: `checkpoint.load_model` calls `quantize_skeleton(model, quantization_config)` on the
meta-device model before reading tensors, so the strict name/shape/dtype checks of the ordinary
loader apply to the quantized tensors too (a missing `weight_scale`, a dense tensor where the config
says quantized, a truncated file: one error naming the tensor). After the tensors are assigned,
`StreamingPacker` converts each quantized module to its kernels' layout as soon as the loader has
read its last tensor and drops the compressed-tensors copies, so the loader's peak is the converted
model plus one module's tensors, never the checkpoint plus the converted model.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..hf_layout import OUR_VISION, to_checkpoint
from ..model.layers import Experts
from ..model.transformer import DiffusionGemma
from .ct_config import Fp8Args, QuantConfig
from .embedding import QuantEmbedding
from .modules import Fp8Linear, QuantExperts, QuantLinear
from .scheme import WeightArgs


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _linear_for(module: nn.Linear, args: WeightArgs | Fp8Args, name: str) -> nn.Module:
    if isinstance(args, WeightArgs) and args.bits == 8 and not args.dynamic_activations:
        raise ValueError(f"module '{name}': int8 weight-only linears are not supported (int8 linears run w8a8)")
    if isinstance(args, Fp8Args):
        return Fp8Linear(module.in_features, module.out_features, (module.out_features, 1) if args.per_channel else (1,))
    return QuantLinear(module.in_features, module.out_features, args)


def quantize_skeleton(model: DiffusionGemma, quant: dict[str, Any], keys: set[str] | None) -> DiffusionGemma:
    """Swap, on a meta-device model, each module that `quant` (a quantization_config) quantizes.
    `keys`: the checkpoint's tensor names (None: not read yet, as for sizing). Fused experts
    (`experts.gate_up_proj`) stay dense whatever the targets say: compressed-tensors quantizes only
    per-expert linears."""
    if not isinstance(quant, dict):
        raise ValueError("config.json field 'quantization_config' must be an object")
    cfg = QuantConfig.from_dict(quant)
    swapped = 0
    with torch.device("meta"):
        for name, module in list(model.named_modules()):
            if name.startswith(OUR_VISION):
                continue                      # the vision tower stays in the float dtype
            ckpt = to_checkpoint(name)
            if isinstance(module, nn.Linear) and (args := cfg.args_for(ckpt)) is not None:
                _replace(model, name, _linear_for(module, args, ckpt))
                swapped += 1
            elif isinstance(module, nn.Embedding) and (args := cfg.args_for(ckpt, linear=False)) is not None:
                if args != WeightArgs(8):
                    raise ValueError(f"module '{ckpt}': only int8 rows (channel, weight-only) are supported "
                                     f"for the embedding, got {args}")
                _replace(model, name, QuantEmbedding(module.num_embeddings, module.embedding_dim))
                swapped += 1
            elif isinstance(module, Experts) and f"{ckpt}.gate_up_proj" not in (keys or ()):
                gate, up, down = (cfg.args_for(f"{ckpt}.0.{p}_proj") for p in ("gate", "up", "down"))
                if gate is None and up is None and down is None:
                    continue                  # dense experts whose tensors are missing: the loader names them
                if not all(isinstance(a, WeightArgs) for a in (gate, up, down)) or gate != up or gate.bits != down.bits:
                    if keys is None:
                        continue              # sizing only: dense experts are the upper bound
                    raise ValueError(f"experts of '{ckpt}': gate/up/down quantized as {gate}/{up}/{down}; "
                                     "blockdiff needs all three int4 or all three int8 (gate and up alike)")
                _replace(model, name, QuantExperts(model.config, gate, down))
                swapped += 1
    if not swapped:
        raise ValueError("quantization_config quantizes none of the model's linears or experts")
    return model


def pack_for_kernels(model: nn.Module) -> None:
    for module in list(model.modules()):
        if isinstance(module, (QuantLinear, Fp8Linear, QuantExperts, QuantEmbedding)):
            module.pack_for_kernels()


class StreamingPacker:
    """Packs the quantized modules of a skeleton while the loader reads tensors (by our names)."""

    def __init__(self, model: nn.Module):
        self.waiting: dict[str, tuple[nn.Module, set[str]]] = {}
        self.owner: dict[str, str] = {}
        self.missing: dict[str, int] = {}            # module -> tensors not read yet
        experts = ()
        for name, module in model.named_modules():
            if isinstance(module, QuantExperts):
                experts += (name + ".",)
            elif not isinstance(module, (QuantLinear, Fp8Linear, QuantEmbedding)) or name.startswith(experts):
                continue
            keys = {f"{name}.{k}" for k in module.state_dict()}
            self.waiting[name] = (module, keys)
            self.owner.update(dict.fromkeys(keys, name))
            self.missing[name] = len(keys)

    def take(self, key: str, state: dict[str, torch.Tensor]) -> None:
        """`key` has just been read into `state`: if that completes its module, load and pack it and
        remove its tensors from `state`."""
        name = self.owner.pop(key, None)
        if name is None:
            return
        self.missing[name] -= 1
        if self.missing[name]:
            return
        module, keys = self.waiting[name]
        del self.waiting[name]
        module.load_state_dict({k[len(name) + 1:]: state.pop(k) for k in keys}, strict=True, assign=True)
        module.pack_for_kernels()

    def finish(self) -> None:
        """After loading: every module has been packed (a missing tensor was named by the loader)."""
        for module, _ in self.waiting.values():
            module.pack_for_kernels()
