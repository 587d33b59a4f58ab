"""Loading a checkpoint in the Hugging Face layout (`hf_layout.py`) into a `DiffusionGemma`.

Contract: `load_model(path_or_hub_id, dtype, device, revision)` reads config.json first (for a hub
id, before any weight is downloaded: `hub.py`), builds the model on the `meta` device, refuses with
`NotEnoughMemory` if its weights in `dtype` exceed the device's free memory, then assigns the loaded
tensors, so no memory is spent on a random init. Loading is strict: a missing, unexpected or wrongly
shaped tensor raises `CheckpointError` naming it. Safetensors only; nothing is unpickled.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .hardware import check_fits
from .hf_layout import (DTYPES, VISION, CheckpointError, check_index, save_checkpoint, to_checkpoint, to_ours,
                        weight_files)
from .hub import METADATA_FILES, resolve_model
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
               revision: str | None = None, check_memory: bool = True) -> DiffusionGemma:
    """Load a DiffusionGemma checkpoint (a directory in the HF layout, or a hub id) onto `device` in
    `dtype` (default: the checkpoint's). The model gets a vision tower exactly when the checkpoint
    holds its tensors. The memory check runs on config.json alone, before any weight is fetched."""
    config = ModelConfig.from_file(resolve_model(model, revision, METADATA_FILES) / "config.json")
    torch_dtype = resolve_dtype(dtype, config)
    if check_memory:        # an upper bound: the vision tower counts if the config has one
        with torch.device("meta"):
            sized = DiffusionGemma(config)
        nbytes = sum(t.numel() for t in [*sized.parameters(), *sized.buffers()]) * torch_dtype.itemsize
        check_fits(nbytes, device, f"the weights of {model} in {str(torch_dtype).removeprefix('torch.')}")
    path = resolve_model(model, revision)
    files = weight_files(path)
    _settle_vision(config, files)
    with torch.device("meta"):
        model_obj = DiffusionGemma(config)
    return _load_weights(model_obj, path, files, torch_dtype, device)


def _load_weights(model: DiffusionGemma, path: Path, files: list[Path], torch_dtype: torch.dtype,
                  device) -> DiffusionGemma:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state, found = {}, {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    found[key] = file.name
                    kind, name = to_ours(key)
                    shape = tuple(f.get_slice(key).get_shape())
                    if name not in expected:
                        raise CheckpointError(f"unexpected tensor '{key}' in {file.name}")
                    if shape != expected[name]:
                        raise CheckpointError(f"tensor '{key}' has shape {list(shape)}, expected {list(expected[name])}")
                    if kind == "load":
                        state[name] = f.get_tensor(key).to(device=device, dtype=torch_dtype)
        except SafetensorError as err:
            raise CheckpointError(f"{file} is not a valid safetensors file: {err}") from None
    check_index(path, found)
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(to_checkpoint(n) for n in missing[:5])
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _settle_vision(config: ModelConfig, files: list[Path]) -> None:
    """Drop the vision config of a checkpoint without vision tensors (text-only; blockdiff writes a
    placeholder tower config for transformers' sake); a checkpoint with them needs the config."""
    has_vision = False
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                has_vision = has_vision or any(key.startswith(VISION) for key in f.keys())
        except SafetensorError as err:
            raise CheckpointError(f"{file} is not a valid safetensors file: {err}") from None
    if not has_vision:
        config.vision_config = None
    elif config.vision_config is None:
        raise CheckpointError("checkpoint holds vision-tower tensors but config.json has no vision_config")
    else:
        config.check_image_tokens()
