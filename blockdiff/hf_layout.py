"""The Hugging Face checkpoint layout: tensor names, weight files, and writing a checkpoint.

Contract:
- Name mapping is declarative (`to_ours`): `model.decoder.X` <-> `X`; the encoder's only untied
  tensors, `model.encoder.language_model.layers.{i}.layer_scalar`, <-> `layers.{i}.encoder_layer_scalar`.
  Tied copies (`lm_head.weight`, other `model.encoder.language_model.*`) are accepted and
  shape-checked but not loaded twice. The vision tower and its embedder, `model.encoder.vision_tower.X`
  and `model.encoder.embed_vision.X`, <-> `vision_tower.X` and `embed_vision.X`.
- `check_index` holds the shards to their index: every tensor in the shard it names, no others.
- `save_checkpoint` writes what `transformers.DiffusionGemmaForBlockDiffusion.from_pretrained` reads:
  `config.json` + `model.safetensors`, or shards with `model.safetensors.index.json`.
- `save_tensors` writes one safetensors file, readable as any new file of this process is (every
  writer of weight files goes through it).
This module knows the layout, not the model class, so the model can save itself through it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEC, ENC = "model.decoder.", "model.encoder.language_model."
ENC_SCALAR = re.compile(r"^model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$")
VISION = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
OUR_VISION = ("vision_tower.", "embed_vision.")
TIED = "tied"


def process_umask() -> int:
    """The umask, read without setting it (`os.umask` would change it for every thread meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), 0o022)
    except OSError:                     # no procfs: the usual default
        return 0o022


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' `save_file`, then the file's mode set to what `open` would give (0o666 less the
    umask): safetensors writes through a private temporary file and keeps its 0o600, which would hide
    checkpoints from every other user (a server's account, say)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~process_umask())


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file or tensor."""


def to_ours(key: str) -> tuple[str, str]:
    """Checkpoint key -> (kind, our name): kind is 'load' or 'tied' (check shape only)."""
    if key.startswith(DEC):
        return "load", key[len(DEC):]
    if m := ENC_SCALAR.match(key):
        return "load", f"layers.{m.group(1)}.encoder_layer_scalar"
    if key.startswith(ENC):
        return TIED, key[len(ENC):]
    if key == "lm_head.weight":
        return TIED, "embed_tokens.weight"
    if key.startswith(VISION):
        return "load", key[len("model.encoder."):]
    raise CheckpointError(f"unexpected tensor '{key}' in checkpoint")


def to_checkpoint(name: str) -> str:
    if name.startswith(OUR_VISION):
        return "model.encoder." + name
    m = re.match(r"^layers\.(\d+)\.encoder_layer_scalar$", name)
    return f"{ENC}layers.{m.group(1)}.layer_scalar" if m else DEC + name


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint shard {f} is missing")
    return files


def check_index(path: Path, found: dict[str, str]) -> None:
    """With an index, `found` (tensor -> the shard file name that holds it) must be what it says."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    weight_map = json.loads(index.read_text())["weight_map"]          # weight_files() has validated it
    for key, file in weight_map.items():
        if found.get(key) != file:
            where = f"it is in {found[key]}" if key in found else "no shard has it"
            raise CheckpointError(f"the index puts tensor '{key}' in {file}, but {where}")
    extra = sorted(set(found) - set(weight_map))
    if extra:
        raise CheckpointError(f"tensor '{extra[0]}' in {found[extra[0]]} is missing from the index")


def save_checkpoint(model, path: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors (sharded with an index if `max_shard_bytes` is exceeded)."""
    if "quantization_config" in model.config.extra:
        raise ValueError("a quantized model holds its weights in its kernels' layout and cannot be saved; "
                         "keep the quantized directory, or quantize the float checkpoint again")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {to_checkpoint(n): t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
    config = model.config
    config.dtype = next(k for k, v in DTYPES.items() if v == model.dtype)
    config.save(path / "config.json")
    shards = _shard(tensors, max_shard_bytes)
    for stale in list(path.glob("model*.safetensors")) + [path / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_tensors(shards[0], path / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(shard, path / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if max_bytes and current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += nbytes
    return shards + [current]
