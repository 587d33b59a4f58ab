"""The `quantization_config` of a compressed-tensors checkpoint: written by `quantize`, read on load.

Contract:
- `build_config(plan)` turns {checkpoint module name: WeightArgs} into the JSON object that
  llm-compressor writes and vLLM / transformers read (`quant_method: "compressed-tensors"`, status
  `compressed`). Modules sharing args form one config group whose `targets` are `re:` patterns over
  module names (layer and expert indices generalised where every match shares the args).
- Formats: int8 with run-time activations is `int-quantized` (`weight` int8 + `weight_scale`); int4
  weight-only is `pack-quantized` (`weight_packed` int32 + `weight_scale` + `weight_shape`).
  Experts are written as per-expert linears (`...experts.{e}.gate_proj`), the layout MoE consumers use.
- `QuantConfig.from_dict(d).args_for(name)` resolves one module as compressed-tensors does: `ignore`
  first, then the first group whose target is the class name `Linear`, the exact name, or a `re:`
  pattern matched from the start of the name. It returns `WeightArgs`, `Fp8Args` (float8 weights,
  read by dequantizing), or None (not quantized). Anything else raises ValueError naming the module.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .scheme import WeightArgs

QUANT_METHOD = "compressed-tensors"
FORMAT_VERSION = "0.20.0"          # the compressed-tensors release whose layout this follows
IGNORE = ["lm_head", r"re:.*router\.proj$"]


def _args_json(args: WeightArgs) -> dict[str, Any]:
    strategy = "group" if args.group_size else "channel"
    return {"dynamic": False, "group_size": args.group_size, "num_bits": args.bits, "strategy": strategy,
            "symmetric": True, "type": "int"}


def _pattern(name: str, keep_layer: bool) -> str:
    """Module name -> anchored regex; expert indices (and layer indices unless kept) generalised."""
    out = re.escape(name)
    out = re.sub(r"experts\\\.\d+", r"experts\\.\\d+", out)
    if not keep_layer:
        out = re.sub(r"layers\\\.\d+", r"layers\\.\\d+", out)
    return "re:" + out + "$"


def build_config(plan: dict[str, WeightArgs]) -> dict[str, Any]:
    """plan: checkpoint module name -> args, for every quantized module."""
    by_general: dict[str, set[WeightArgs]] = {}
    for name, args in plan.items():
        by_general.setdefault(_pattern(name, False), set()).add(args)
    groups: dict[WeightArgs, list[str]] = {}
    for name, args in plan.items():
        general = _pattern(name, False)
        target = general if len(by_general[general]) == 1 else _pattern(name, True)
        if target not in groups.setdefault(args, []):
            groups[args].append(target)
    config_groups, formats = {}, set()
    for i, (args, targets) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0].bits, kv[0].group_size or 0))):
        fmt = "int-quantized" if args.dynamic_activations else "pack-quantized"
        formats.add(fmt)
        acts = {"dynamic": True, "group_size": None, "num_bits": 8, "strategy": "token", "symmetric": True,
                "type": "int"} if args.dynamic_activations else None
        config_groups[f"group_{i}"] = {"format": fmt, "input_activations": acts, "output_activations": None,
                                       "targets": targets, "weights": _args_json(args)}
    return {"config_groups": config_groups, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "global_compression_ratio": None, "ignore": list(IGNORE), "kv_cache_scheme": None,
            "quant_method": QUANT_METHOD, "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": FORMAT_VERSION}


def _matches(target: str, name: str, linear: bool = True) -> bool:
    if target == "Linear":                 # the class target: linears (experts' included), not the embedding
        return linear
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


@dataclass(frozen=True)
class Fp8Args:
    """float8_e4m3fn weights with one scale per output channel (else one per tensor)."""

    per_channel: bool


@dataclass
class Group:
    targets: list[str]
    weights: dict[str, Any] | None
    input_activations: dict[str, Any] | None
    format: str | None


@dataclass
class QuantConfig:
    groups: list[Group]
    ignore: list[str]
    format: str | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        if d.get("quant_method") != QUANT_METHOD:
            raise ValueError(f"quantization_config.quant_method {d.get('quant_method')!r} is not supported; "
                             f"blockdiff reads {QUANT_METHOD!r} checkpoints")
        if d.get("quantization_status", "compressed") != "compressed":
            raise ValueError(f"quantization_status {d.get('quantization_status')!r}: only 'compressed' checkpoints "
                             "hold quantized tensors")
        groups = []
        for key, g in (d.get("config_groups") or {}).items():
            if not isinstance(g, dict) or not isinstance(g.get("targets"), list):
                raise ValueError(f"quantization_config.config_groups.{key} must give a 'targets' list "
                                 "(preset-name groups are not supported)")
            groups.append(Group(g["targets"], g.get("weights"), g.get("input_activations"), g.get("format")))
        return cls(groups, list(d.get("ignore") or []), d.get("format"))

    def args_for(self, name: str, linear: bool = True) -> WeightArgs | Fp8Args | None:
        """`linear`: whether module `name` is a Linear (the class target `Linear` matches only those)."""
        if any(_matches(t, name) for t in self.ignore if t != "Linear"):
            return None
        for g in self.groups:
            if g.weights and any(_matches(t, name, linear) for t in g.targets):
                return _read_args(g, name, self.format)
        return None


def _read_args(g: Group, name: str, top_format: str | None) -> WeightArgs | Fp8Args:
    w, acts, fmt = g.weights, g.input_activations, g.format or top_format
    if w.get("type", "int") == "float" and w.get("num_bits") == 8 and w.get("strategy") in ("channel", "tensor"):
        return Fp8Args(w.get("strategy") == "channel")
    supported = (w.get("type", "int") == "int" and w.get("symmetric", True) and not w.get("dynamic")
                 and w.get("actorder") is None and w.get("strategy") in ("channel", "group", None))
    a8 = bool(acts) and acts.get("type", "int") == "int" and acts.get("num_bits") == 8 and acts.get("dynamic") is True
    if supported and w.get("num_bits") == 8 and fmt == "int-quantized" and w.get("strategy") == "channel" and a8:
        return WeightArgs(8, None, True)
    if supported and w.get("num_bits") == 4 and fmt == "pack-quantized" and acts is None:
        return WeightArgs(4, w.get("group_size") if w.get("strategy") == "group" else None)
    if supported and w.get("num_bits") == 8 and fmt == "pack-quantized" and acts is None and w.get("strategy") == "channel":
        return WeightArgs(8)              # weight-only int8 rows: blockdiff reads it for the embedding
    raise ValueError(f"module '{name}': quantization {w} with input activations {acts} in format {fmt!r} "
                     "is not supported (supported: int8 channel w8a8, int4 pack-quantized, fp8 channel/tensor, "
                     "int8 channel pack-quantized for the embedding)")
