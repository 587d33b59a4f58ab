"""Loading a checkpoint in the Hugging Face layout (`hf_layout.py`) into a `DiffusionGemma`.

Contract: `load_model(path_or_hub_id, dtype, device, revision)` reads config.json first (for a hub
id, before any weight is downloaded: `hub.py`), builds the model on the `meta` device, refuses with
`NotEnoughMemory` if its weights in `dtype` exceed the device's free memory, then assigns the loaded
tensors, so no memory is spent on a random init. Loading is strict: a missing, unexpected or wrongly
shaped tensor raises `CheckpointError` naming it. Safetensors only; nothing is unpickled.
A config.json with a `quantization_config` (compressed-tensors) gets quantized modules in place of the
linears and experts it names (`quant/load.py`); their integer tensors keep their dtype, `dtype` applies
to the float ones, and the memory check counts the quantized sizes. Each quantized module is converted
to its kernels' layout as soon as its last tensor has been read (`quant.load.StreamingPacker`), and
tensors are read straight into their own memory (`tensor_file.py`, no memory map), so loading peaks
at about the converted model plus one module, not at the checkpoint plus the converted model.
With a `shard` (one rank's part of a tensor-parallel model, `distributed/layout.py`), the model is
that rank's skeleton, only its slice of each tensor is read and checked, and the memory check
counts that part.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .hardware import check_fits, release_freed_memory
from .hf_layout import (DTYPES, VISION, CheckpointError, check_index, save_checkpoint, to_checkpoint, to_ours,
                        weight_files)
from .hub import METADATA_FILES, resolve_model
from .tensor_file import TensorFile
from .model.transformer import DiffusionGemma

__all__ = ["CheckpointError", "load_model", "resolve_dtype", "save_checkpoint"]


def resolve_dtype(dtype: str | torch.dtype | None, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or config.dtype
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(model: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               revision: str | None = None, check_memory: bool = True, shard=None) -> DiffusionGemma:
    """Load a DiffusionGemma checkpoint (a directory in the HF layout, or a hub id) onto `device` in
    `dtype` (default: the checkpoint's). The model gets a vision tower exactly when the checkpoint
    holds its tensors. The memory check runs on config.json alone, before any weight is fetched."""
    config = ModelConfig.from_file(resolve_model(model, revision, METADATA_FILES) / "config.json")
    torch_dtype = resolve_dtype(dtype, config)
    quant = config.extra.get("quantization_config")
    if check_memory:        # an upper bound: the vision tower counts if the config has one
        sized = _skeleton(config, quant, None, shard)
        nbytes = sum(t.numel() * _stored_dtype(t.dtype, torch_dtype).itemsize
                     for t in [*sized.parameters(), *sized.buffers()])
        check_fits(nbytes, device, f"the weights of {model} in {str(torch_dtype).removeprefix('torch.')}")
    path = resolve_model(model, revision)
    files = weight_files(path)
    keys = checkpoint_keys(files)
    settle_vision(config, keys)
    skeleton = _skeleton(config, quant, keys, shard)
    packer = None
    if quant is not None:
        from .quant.load import StreamingPacker
        packer = StreamingPacker(skeleton)
    model_obj = _load_weights(skeleton, path, files, torch_dtype, device, shard, packer)
    if packer is not None:
        packer.finish()
        if torch.device(device).type == "cpu":
            release_freed_memory()        # the compressed tensors' heap holes, between kept weights
    return model_obj


def _skeleton(config: ModelConfig, quant, keys: set[str] | None, shard=None) -> DiffusionGemma:
    """The model (or a rank's part) on the meta device, with quantized modules where a
    quantization_config says so."""
    with torch.device("meta"):
        model = DiffusionGemma(config) if shard is None else shard.skeleton(config)
    if quant is not None:
        from .quant.load import quantize_skeleton
        quantize_skeleton(model, quant, keys)
        if shard is not None:
            shard.finish_quantized(model)
    return model


def _stored_dtype(expected: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """Float tensors load in `dtype`; integer and float8 (quantized) ones as they are stored."""
    return dtype if expected.is_floating_point and expected.itemsize > 1 else expected


def _load_weights(model: DiffusionGemma, path: Path, files: list[Path], torch_dtype: torch.dtype,
                  device, shard=None, packer=None) -> DiffusionGemma:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    kinds = {name: t.dtype for name, t in model.state_dict().items()}
    state, found, loaded = {}, {}, set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                direct = TensorFile(file) if shard is None else None
                for key in f.keys():
                    found[key] = file.name
                    kind, name = to_ours(key)
                    shape = tuple(f.get_slice(key).get_shape())
                    if shard is not None:
                        name = shard.local_name(name)
                        if name is None:          # an expert another rank holds
                            continue
                        shape = shard.shape(name, shape)
                    if name not in expected:
                        raise CheckpointError(f"unexpected tensor '{key}' in {file.name}")
                    if shape != expected[name]:
                        raise CheckpointError(f"tensor '{key}' has shape {list(shape)}, expected {list(expected[name])}")
                    if kind == "load":
                        source = f if direct is None else direct
                        loaded.add(name)
                        state[name] = _read(source, key, kinds[name], torch_dtype, device, shard and (shard, name))
                        if packer is not None:
                            packer.take(name, state)
        except SafetensorError as err:
            raise CheckpointError(f"{file} is not a valid safetensors file: {err}") from None
    check_index(path, found)
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(to_checkpoint(n) for n in missing[:5])
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def checkpoint_keys(files: list[Path]) -> set[str]:
    keys = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                keys.update(f.keys())
        except SafetensorError as err:
            raise CheckpointError(f"{file} is not a valid safetensors file: {err}") from None
    return keys


def _read(f, key: str, expected: torch.dtype, dtype: torch.dtype, device, part=None) -> torch.Tensor:
    """One tensor (`part`: (shard, our name) reads that rank's slice): float ones cast to `dtype`;
    integer and float8 ones must be stored as expected."""
    if part is not None:
        t = part[0].read(f.get_slice(key), part[1])
    else:
        t = f.read(key) if isinstance(f, TensorFile) else f.get_tensor(key)
    if _stored_dtype(expected, dtype) == dtype and t.dtype.is_floating_point and t.dtype.itemsize > 1:
        return t.to(device=device, dtype=dtype)
    if t.dtype != expected:
        raise CheckpointError(f"tensor '{key}' has dtype {str(t.dtype).replace('torch.', '')}, "
                              f"expected {str(expected).replace('torch.', '')}")
    return t.to(device)


def settled_config(path: Path) -> ModelConfig:
    """config.json of a local checkpoint directory as `load_model` builds the model from it."""
    config = ModelConfig.from_file(path / "config.json")
    settle_vision(config, checkpoint_keys(weight_files(path)))
    return config


def settle_vision(config: ModelConfig, keys: set[str]) -> None:
    """Drop the vision config of a checkpoint without vision tensors (text-only; blockdiff writes a
    placeholder tower config for transformers' sake); a checkpoint with them needs the config."""
    has_vision = any(key.startswith(VISION) for key in keys)
    if not has_vision:
        config.vision_config = None
    elif config.vision_config is None:
        raise CheckpointError("checkpoint holds vision-tower tensors but config.json has no vision_config")
    else:
        config.check_image_tokens()
