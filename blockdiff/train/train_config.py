"""TrainConfig: the typed settings of a training run, read from a JSON file and validated.

Contract: the JSON object's keys are TrainConfig's fields; `model` holds ModelConfig's fields (the
text config, plus `canvas_length`). Unknown keys, wrong types and bad values raise `ConfigError`
naming the field, when the config is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from ..config import ConfigError, ModelConfig, read_json_object
from .objective import Objective


@dataclass
class TrainConfig:
    out_dir: str
    model: dict
    data_dir: str = "data/corpus"
    objective: str = "diffusion"         # 'diffusion' or 'ar' (the encoder-only baseline)
    seq_len: int = 256                   # clean tokens per sequence; a multiple of canvas_length
    batch_size: int = 32                 # sequences per optimizer step, over all ranks
    micro_batch_size: int = 8            # sequences per forward pass on one rank
    max_steps: int = 10_000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 200
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    eps: float = 1e-3                    # corruption rate t ~ U(eps, 1)
    self_cond_p: float = 0.5
    encoder_loss_weight: float = 1.0
    init_std: float = 0.02
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    attn_impl: str = "eager"              # eager was faster than sdpa for training on CPU
    bf16: bool = True                    # bf16 autocast on CUDA and on CPUs with native bf16 matmuls
                                         # (weights and optimizer stay fp32); ~1.8x on these CPUs
    compile: bool = False                # torch.compile the vocab-side ops (head, softcap, CE): ~1.3x
    fsdp: bool = False                   # FSDP2 instead of DDP under torchrun
    threads: int | None = None           # torch CPU threads per process (None: torch's default)
    init_from: str | None = None         # a checkpoint directory whose weights start a new run (e.g. the AR
                                         # baseline's, for AR-initialised diffusion); a resumed run ignores it

    def __post_init__(self):
        _check_types(self)
        positive = ("seq_len", "batch_size", "micro_batch_size", "max_steps", "log_every", "eval_every",
                    "eval_batches", "checkpoint_every", "lr", "init_std")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"train config field '{name}' must be positive, got {getattr(self, name)!r}")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError("train config field 'batch_size' must be a multiple of 'micro_batch_size'")
        if not 0 <= self.min_lr <= self.lr or self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("train config needs 0 <= min_lr <= lr and non-negative warmup_steps, grad_clip, "
                              "weight_decay")
        if self.attn_impl not in ("eager", "sdpa"):
            raise ConfigError(f"train config field 'attn_impl' must be 'eager' or 'sdpa', got {self.attn_impl!r}")
        try:
            self.objective_spec()
        except ValueError as err:
            raise ConfigError(f"train config: {err}") from None
        config = self.model_config()
        if self.objective == "diffusion" and self.seq_len % config.canvas_length:
            raise ConfigError(f"train config field 'seq_len' ({self.seq_len}) must be a multiple of the model's "
                              f"canvas_length ({config.canvas_length})")

    def model_config(self) -> ModelConfig:
        try:
            return ModelConfig(**self.model)
        except TypeError as err:
            raise ConfigError(f"train config field 'model': {err}") from None

    def objective_spec(self) -> Objective:
        return Objective(self.objective, self.eps, self.self_cond_p, self.encoder_loss_weight)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown train config field(s): {', '.join(unknown)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.name in ("out_dir", "model"))
        if missing:
            raise ConfigError(f"train config is missing required field(s): {', '.join(missing)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(read_json_object(path, "train config"))


TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict, "list": list}


def _check_types(cfg: TrainConfig) -> None:
    """Field annotations are strings here ('int', 'int | None'): check values against them."""
    for f in fields(cfg):
        value, names = getattr(cfg, f.name), [n.strip() for n in str(f.type).split("|")]
        if value is None and "None" in names:
            continue
        kind = TYPES[names[0]]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError(f"train config field '{f.name}' must be {f.type}, got {value!r}")
