"""Random-weight checkpoints written directly in a quantized layout (benchmarks at released shapes).

Contract: `write_random_pack(config, scheme, dst)` writes the checkpoint directory that `blockdiff
quantize --scheme SCHEME` would write for a bf16 model of `config`'s shapes (same tensor names,
dtypes and shapes, same `quantization_config`; tests check it), but with random values made in place:
int8 weights uniform in [-127, 127], int4 weights as random int32 words (every word is eight valid
nibbles), per-row scales chosen so that a weight's standard deviation is about `std` (the random
init's), bf16 embedding / router ~ N(0, std), norms and scalars 1. Nothing is ever held in bf16 but
the tensors that stay bf16, and only one output shard is in memory at a time: the 26B-A4B shapes
are written in a few minutes with a few GB of memory. Written under a temporary name, renamed at the
end. `python -m blockdiff.quant.random_pack CONFIG_JSON SCHEME DST [EMBEDDING]` runs it in a process
of its own.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..config import ModelConfig
from ..hf_layout import OUR_VISION, to_checkpoint
from ..model.transformer import DiffusionGemma
from .convert import SHARD_BYTES, Item, Plan, decide, write_shards, written_atomically
from .ct_config import build_config
from .scheme import WeightArgs, get_scheme

Q_STD = {8: (255**2 / 12) ** 0.5, 4: (16**2 / 12) ** 0.5}     # std of uniform int8 [-127, 127] / int4 [-8, 7]


def plan_random(config: ModelConfig, scheme: str, embedding: str = "bf16") -> Plan:
    """What `plan_conversion` decides for a text-only bf16 checkpoint of these shapes, from the shapes alone."""
    chosen = get_scheme(scheme).with_embedding(embedding)
    with torch.device("meta"):
        model = DiffusionGemma(config)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and not n.endswith("router.proj") and not n.startswith(OUR_VISION)}
    plan = Plan()
    for name, t in sorted(model.state_dict().items(), key=lambda kv: to_checkpoint(kv[0])):
        if name.startswith(OUR_VISION):
            continue
        item = Item(to_checkpoint(name), Path(), tuple(t.shape))
        decide(item, name, 2, chosen, linears, plan)
        item.out_bytes = item.out_bytes or max(1, t.numel()) * 2
        plan.items.append(item)
    return plan


class RandomTensors:
    """`produce(item)` for `write_shards`: the item's output tensors, random, from one generator."""

    def __init__(self, seed: int, std: float):
        self.gen = torch.Generator().manual_seed(seed)
        self.std = std

    def __call__(self, item: Item) -> dict[str, torch.Tensor]:
        if item.kind == "copy":
            return {item.key: self.dense(item.shape)}
        if item.kind == "linear":                       # a linear, or the int8 embedding
            return self.linear(item.key.rpartition(".")[0], *item.shape, item.args)
        prefix, out = item.key.rpartition(".")[0], {}
        e, rows, k = item.shape
        parts = ("down_proj",) if item.key.endswith("down_proj") else ("gate_proj", "up_proj")
        for i in range(e):
            for part in parts:
                out.update(self.linear(f"{prefix}.{i}.{part}", rows // len(parts), k, item.args))
        return out

    def dense(self, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) < 2:
            return torch.ones(shape, dtype=torch.bfloat16)
        out = torch.empty(shape, dtype=torch.bfloat16)
        for rows in out.split(4096):                  # fp32 draws a slice at a time
            rows.copy_(torch.empty(rows.shape).normal_(0.0, self.std, generator=self.gen))
        return out

    def linear(self, module: str, n: int, k: int, args: WeightArgs) -> dict[str, torch.Tensor]:
        groups = k // (args.group_size or k)
        jitter = torch.empty(n, 1).uniform_(0.5, 1.5, generator=self.gen)
        scale = (jitter * (self.std / Q_STD[args.bits])).expand(n, groups).to(torch.bfloat16).contiguous()
        if args.bits == 8 and args.dynamic_activations:
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=self.gen)
            return {f"{module}.weight": q, f"{module}.weight_scale": scale}
        per_word = 32 // args.bits            # any int32 word holds valid int4 / int8 values
        words = torch.randint(-2**31, 2**31, (n, -(-k // per_word)), dtype=torch.int32, generator=self.gen)
        return {f"{module}.weight_packed": words, f"{module}.weight_scale": scale,
                f"{module}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}


def write_random_pack(config: ModelConfig, scheme: str, dst: str | Path, seed: int = 0, std: float = 0.02,
                      shard_bytes: int = SHARD_BYTES, progress: bool = False, embedding: str = "bf16") -> Path:
    dst = Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose a new directory")
    plan = plan_random(config, scheme, embedding)
    with written_atomically(dst) as tmp:
        write_shards(plan, tmp, shard_bytes, progress, RandomTensors(seed, std), "random pack")
        config = ModelConfig.from_dict({**config.to_dict(), "dtype": "bfloat16"})
        config.save(tmp / "config.json")
        raw = json.loads((tmp / "config.json").read_text())
        raw["quantization_config"] = build_config(plan.modules)
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return dst


if __name__ == "__main__":
    cfg_json, scheme_name, out_dir = sys.argv[1:4]
    write_random_pack(ModelConfig.from_dict(json.loads(cfg_json)), scheme_name, out_dir, progress=True,
                      embedding=(sys.argv[4:] or ["bf16"])[0])
