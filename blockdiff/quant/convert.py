"""`blockdiff quantize SRC DST --scheme ...`: a checkpoint directory -> a compressed-tensors one.

Contract:
- Streaming: one pass over the source headers checks every tensor (names, shapes, that a group size
  fits, nothing missing) before anything is written; then tensors are read one at a time (experts one
  expert at a time) and written in shards of at most `shard_bytes`, so the peak memory is about one
  output shard plus the tensor being converted, never the whole model.
- Atomic: everything is written under a temporary sibling of DST that is renamed to DST at the end; an
  interrupted run leaves no directory named DST (and removes its temporary one when it can).
- Output: config.json (the source's, plus `quantization_config`), safetensors shards with an index,
  and every other file of the source directory except its model card (tokenizer, generation config).
  The router, norms and scalars are copied in their stored dtype, and so is the embedding (tied LM
  head) unless `embedding="int8"` (weight-only int8 rows, `pack-quantized`); tied
  encoder copies are not written (the loader ties them); the vision tower is copied unquantized.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig, read_json_object
from ..checkpoint import checkpoint_keys, settle_vision
from ..hf_layout import OUR_VISION, TIED, CheckpointError, save_tensors, to_checkpoint, to_ours, weight_files
from ..model.transformer import DiffusionGemma
from .ct_config import build_config
from .scheme import Scheme, WeightArgs, get_scheme, pack_int4, pack_int8, quantize_weight

SHARD_BYTES = 2 * 2**30
NOT_COPIED = {"config.json", "model.safetensors.index.json", "README.md"}
ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2}   # others: 1 byte


@dataclass
class Item:
    """One source tensor and what becomes of it: copied, or quantized as a linear or as experts."""

    key: str
    file: Path
    shape: tuple[int, ...]
    kind: str = "copy"                 # "copy" | "linear" | "experts"
    args: WeightArgs | None = None
    out_bytes: int = 0


@dataclass
class Plan:
    items: list[Item] = field(default_factory=list)
    modules: dict[str, WeightArgs] = field(default_factory=dict)   # checkpoint module name -> args


def ct_tensors(module: str, w: torch.Tensor, args: WeightArgs) -> dict[str, torch.Tensor]:
    """A float (N, K) weight -> the compressed-tensors tensors of linear `module`."""
    q, scale = quantize_weight(w, args)
    if args.bits == 8 and args.dynamic_activations:
        return {f"{module}.weight": q, f"{module}.weight_scale": scale}
    packed = pack_int4(q) if args.bits == 4 else pack_int8(q)
    return {f"{module}.weight_packed": packed, f"{module}.weight_scale": scale,
            f"{module}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}


def _ct_bytes(n: int, k: int, args: WeightArgs, scale_bytes: int) -> int:
    per_word = 32 // args.bits
    body = n * k if args.dynamic_activations else n * ((k + per_word - 1) // per_word) * 4 + 16
    return body + n * (k // (args.group_size or k)) * scale_bytes


def plan_conversion(config: ModelConfig, files: list[Path], scheme: Scheme) -> Plan:
    """Check every source tensor against the model's shapes and decide its fate; nothing is read but
    headers. The vision tower, if any, is copied as it is."""
    settle_vision(config, checkpoint_keys(files))
    with torch.device("meta"):
        model = DiffusionGemma(config)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and not n.endswith("router.proj") and not n.startswith(OUR_VISION)}
    plan, seen = Plan(), set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    shape, nbytes = tuple(sl.get_shape()), ITEMSIZE.get(sl.get_dtype(), 1)
                    item = Item(key, file, shape)
                    kind, name = to_ours(key)
                    if name not in expected:
                        raise CheckpointError(f"unexpected tensor '{key}' in {file.name}")
                    if shape != expected[name]:
                        raise CheckpointError(f"tensor '{key}' has shape {list(shape)}, expected {list(expected[name])}")
                    seen.add(name)
                    if kind == TIED:
                        continue
                    decide(item, name, nbytes, scheme, linears, plan)
                    item.out_bytes = item.out_bytes or max(1, torch.Size(shape).numel()) * nbytes
                    plan.items.append(item)
        except SafetensorError as err:
            raise CheckpointError(f"{file} is not a valid safetensors file: {err}") from None
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(to_checkpoint(n) for n in missing[:5])
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
    return plan


def decide(item: Item, name: str, nbytes: int, scheme: Scheme, linears: set[str], plan: Plan) -> None:
    module = to_checkpoint(name).rpartition(".")[0]
    if name == "embed_tokens.weight" and scheme.embedding is not None:
        n, k = item.shape
        item.kind, item.args = "linear", scheme.embedding
        plan.modules[module] = item.args
        item.out_bytes = _ct_bytes(n, k, item.args, nbytes)
    elif name in linears and scheme.linears is not None:
        n, k = item.shape
        item.kind, item.args = "linear", scheme.linears.for_input_size(k, item.key)
        plan.modules[module] = item.args
        item.out_bytes = _ct_bytes(n, k, item.args, nbytes)
    elif name.startswith("layers.") and ".experts." in name and scheme.experts is not None:
        e, rows, k = item.shape
        item.kind, item.args = "experts", scheme.experts.for_input_size(k, item.key)
        parts = ("down",) if name.endswith("down_proj") else ("gate", "up")
        for p in parts:
            plan.modules[f"{module}.0.{p}_proj"] = item.args
        item.out_bytes = e * len(parts) * _ct_bytes(rows // len(parts), k, item.args, nbytes)


def convert_item(item: Item, f) -> dict[str, torch.Tensor]:
    """The output tensors of one planned source tensor (experts read one expert at a time)."""
    if item.kind == "copy":
        return {item.key: f.get_tensor(item.key)}
    if item.kind == "linear":
        return ct_tensors(item.key.rpartition(".")[0], f.get_tensor(item.key), item.args)
    out, sl = {}, f.get_slice(item.key)
    prefix = item.key.rpartition(".")[0]
    inner = item.shape[1] // 2
    for e in range(item.shape[0]):
        w = sl[e:e + 1][0]                               # (2I, H) gate rows then up rows, or (H, I)
        if item.key.endswith("down_proj"):
            out.update(ct_tensors(f"{prefix}.{e}.down_proj", w, item.args))
        else:
            out.update(ct_tensors(f"{prefix}.{e}.gate_proj", w[:inner], item.args))
            out.update(ct_tensors(f"{prefix}.{e}.up_proj", w[inner:], item.args))
    return out


def shards(items: list[Item], shard_bytes: int) -> list[list[Item]]:
    out, size = [[]], 0
    for item in items:
        if out[-1] and size + item.out_bytes > shard_bytes:
            out.append([])
            size = 0
        out[-1].append(item)
        size += item.out_bytes
    return out


def quantize(src: str | Path, dst: str | Path, scheme: str, shard_bytes: int = SHARD_BYTES,
             progress: bool = True, embedding: str = "bf16") -> Path:
    """Write the compressed-tensors version of checkpoint `src` to the new directory `dst`;
    `embedding`: 'bf16' keeps the embedding (tied LM head) as stored, 'int8' quantizes it."""
    src, dst, chosen = Path(src), Path(dst), get_scheme(scheme).with_embedding(embedding)
    raw = read_json_object(src / "config.json", "config.json")
    if "quantization_config" in raw:
        raise ValueError(f"{src} is already quantized ({raw['quantization_config'].get('quant_method', '?')}); "
                         "quantize a checkpoint with float weights")
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose a new directory")
    config = ModelConfig.from_dict(raw)
    plan = plan_conversion(config, weight_files(src), chosen)
    with written_atomically(dst) as tmp:
        write_shards(plan, tmp, shard_bytes, progress)
        for extra in sorted(src.iterdir()):
            if extra.is_file() and extra.name not in NOT_COPIED and not extra.name.endswith(".safetensors"):
                shutil.copy2(extra, tmp / extra.name)
        raw["quantization_config"] = build_config(plan.modules)
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return dst


@contextmanager
def written_atomically(dst: Path):
    """A temporary sibling directory to write into, renamed to `dst` when the block completes and
    removed when it raises (an interrupt included): `dst` never exists half written."""
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        yield tmp
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_and_convert(item: Item) -> dict[str, torch.Tensor]:
    with safe_open(str(item.file), framework="pt", device="cpu") as f:
        return convert_item(item, f)


def write_shards(plan: Plan, out: Path, shard_bytes: int, progress: bool, produce=_read_and_convert,
                 desc: str = "quantize") -> None:
    """Write the output tensors of every planned item (`produce(item)` -> {name: tensor}) into
    safetensors shards of at most about `shard_bytes`, with their index."""
    from tqdm import tqdm

    groups = shards(plan.items, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, total = {}, 0
    bar = tqdm(total=len(plan.items), unit="tensor", desc=desc, disable=not progress, file=sys.stderr)
    for name, group in zip(names, groups):
        tensors = {}
        for item in group:
            tensors.update(produce(item))
            bar.update(1)
        save_tensors({k: v.contiguous() for k, v in tensors.items()}, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
