"""Trainer checkpoints: a resumable snapshot of a run, with no pickle anywhere.

Layout of `out_dir/checkpoint/`:
- `config.json` + `model.safetensors`: the fp32 master weights in the Hugging Face layout
  (`checkpoint.save_checkpoint`), so the directory loads in blockdiff and transformers as it is;
- `tokenizer.json` / `tokenizer_config.json` copied from the data directory, when given;
- `optimizer.safetensors`: AdamW's per-parameter tensors as `state.<param name>.<key>`;
- `trainer_state.json`: step, tokens seen, the optimizer's param_groups (hyper-parameters only)
  and the training config. All randomness is derived from (seed, step), so the step is the RNG state.
A save writes `checkpoint.tmp` and then swaps directories, so a crash mid-save leaves the previous
checkpoint intact.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoint import load_model, save_checkpoint
from ..hf_layout import save_tensors
from ..config import ModelConfig
from ..model.transformer import DiffusionGemma

OPTIM_FILE, STATE_FILE = "optimizer.safetensors", "trainer_state.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Snapshot:
    model: DiffusionGemma
    optim_state: dict
    step: int
    tokens: int


def save(path: str | Path, model_state: dict[str, torch.Tensor], config: ModelConfig, optim_state: dict,
         step: int, tokens: int, train_config: dict, tokenizer_dir: Path | None = None) -> None:
    """model_state / optim_state: full CPU state keyed by names under `prefix`-free model names."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.device("meta"):
        model = DiffusionGemma(config)
    model.load_state_dict(model_state, strict=True, assign=True)
    save_checkpoint(model, tmp)
    tensors = {f"state.{name}.{key}": value.contiguous() for name, entry in optim_state["state"].items()
               for key, value in entry.items()}
    save_tensors(tensors, tmp / OPTIM_FILE)
    meta = {"step": step, "tokens": tokens, "param_groups": optim_state["param_groups"], "config": train_config}
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    for name in TOKENIZER_FILES if tokenizer_dir else ():
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, tmp / name)
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load(path: str | Path) -> Snapshot:
    """Read a checkpoint written by `save` (fp32 model on the CPU, optimizer state keyed by name)."""
    path = Path(path)
    meta = json.loads((path / STATE_FILE).read_text())
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path / OPTIM_FILE)).items():
        name, field = key[len("state."):].rsplit(".", 1)
        state.setdefault(name, {})[field] = value.clone()   # own, aligned memory (not the file's buffer)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    model = load_model(path, dtype="float32")
    with torch.no_grad():     # fresh allocations: kernels then take the same vector paths as before the save
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    return Snapshot(model, {"state": state, "param_groups": groups}, meta["step"], meta["tokens"])


def exists(path: str | Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()
