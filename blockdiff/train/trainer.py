"""`blockdiff train CONFIG`: the training loop and the `train` subcommand.

Contract:
- The settings are a `TrainConfig` (train_config.py), read from a JSON file.
- `train(cfg, resume, max_steps)` runs AdamW with linear warmup + cosine decay, gradient accumulation,
  clipping, periodic validation and checkpoints to `out_dir/checkpoint/` (see `state.py`), and logs
  to `out_dir/log.jsonl` and `out_dir/loss.png`. Under torchrun it trains with DDP or FSDP2.
- Determinism: micro-batch i of step s (numbered across ranks) draws its windows and its noise from
  a generator seeded by (seed, s, i) alone. So a resumed run repeats the uninterrupted run's losses,
  and N processes see exactly the batches one process sees with N times the accumulation.
- `--max-steps N` stops this run early; the schedule still spans `max_steps` of the config, so the
  next `--resume` continues the same run. A resumed run must have the checkpoint's model config.
- `kill PID` (SIGTERM) or Ctrl-C checkpoints a single-process run before it exits.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import load_model
from ..config import ConfigError
from ..hardware import auto_dtype, reuse_freed_memory
from ..model.init import init_weights
from ..model.transformer import DiffusionGemma
from . import distributed, monitor, state
from .objective import TrainingModel
from .train_config import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "learning_rate", "train"]


@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    out_dir: Path


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr` over warmup_steps, then cosine decay to `min_lr` at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def batch_generator(seed: int, split: str, step: int, index: int) -> torch.Generator:
    """The generator of one micro-batch, a function of its coordinates alone."""
    digest = hashlib.blake2b(f"{seed}:{split}:{step}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def build_optimizer(model: DiffusionGemma, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only; norms, scales and biases are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def train(cfg: TrainConfig, resume: bool = False, max_steps: int | None = None) -> TrainResult:
    from .data import TokenDataset

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = distributed.setup()
    try:
        return Run(cfg, d, TokenDataset(cfg.data_dir), resume).loop(min(max_steps or cfg.max_steps, cfg.max_steps))
    finally:
        distributed.teardown(d)


class Run:
    """One training run in this process: the wrapped model, optimizer, data and records."""

    def __init__(self, cfg: TrainConfig, d: distributed.Dist, data, resume: bool):
        self.cfg, self.d, self.data = cfg, d, data
        self.out = Path(cfg.out_dir)
        self.ckpt = self.out / "checkpoint"
        self.accum = cfg.batch_size // (cfg.micro_batch_size * d.world)
        if self.accum * cfg.micro_batch_size * d.world != cfg.batch_size:
            raise ConfigError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size x world size "
                              f"({cfg.micro_batch_size} x {d.world})")
        vocab = data.meta["vocab_size"]
        if vocab > cfg.model_config().vocab_size:
            raise ConfigError(f"the data's vocabulary ({vocab}) exceeds the model's vocab_size")
        snapshot = state.load(self.ckpt) if resume and state.exists(self.ckpt) else None
        if resume and snapshot is None and d.main:
            print(f"blockdiff: no checkpoint in {self.ckpt}; starting a new run", file=sys.stderr)
        if snapshot and snapshot.model.config.to_dict() != _as_saved(cfg.model_config()):
            raise ConfigError(f"the model in {self.ckpt} differs from the config's 'model'; "
                              "resume with the config that started the run")
        if d.device.type == "cpu":
            reuse_freed_memory()        # vocab-sized activations and grads: no page faults per step
        model = snapshot.model if snapshot else self._new_model()
        model.set_attention_impl(cfg.attn_impl)
        if cfg.objective == "ar":       # the AR baseline never uses self-conditioning
            model.self_conditioning.requires_grad_(False)
        self.module = TrainingModel(model.to(d.device).train(), cfg.objective_spec(), cfg.compile)
        self.wrapped = distributed.wrap(self.module, d, cfg.fsdp)
        self.optimizer = build_optimizer(model, cfg)
        if snapshot:
            optim_state = _rename(snapshot.optim_state, lambda name: PREFIX + name)
            distributed.load_optim_state(self.wrapped, self.optimizer, optim_state)
        self.step = snapshot.step if snapshot else 0
        self.tokens = snapshot.tokens if snapshot else 0
        self.log = monitor.RunLog(self.out / "log.jsonl")
        if d.main:
            self.log.truncate_after(self.step)
        fast_bf16 = auto_dtype(d.device) == torch.bfloat16
        # No cast cache under FSDP2: it re-gathers the same parameter objects for the second
        # (self-conditioned) pass, and a bf16 copy cached during the no-grad first pass has no grad path.
        self.autocast = (torch.autocast(d.device.type, dtype=torch.bfloat16, cache_enabled=not cfg.fsdp)
                         if cfg.bf16 and fast_bf16 else contextlib.nullcontext())

    def _new_model(self) -> DiffusionGemma:
        model = DiffusionGemma(self.cfg.model_config())
        if self.cfg.init_from is None:
            init_weights(model, self.cfg.init_std, seed=self.cfg.seed)
            return model
        # AR-initialised diffusion (as DiffusionGemma, Dream and DiffuLLaMA start from AR weights): every
        # weight comes from the checkpoint; the canvas length and the stored dtype are not weights' shapes,
        # so they may differ (an exported checkpoint is stored in bf16).
        source = load_model(self.cfg.init_from, dtype=torch.float32)
        free = ("canvas_length", "dtype")
        theirs, ours = source.config.to_dict(), model.config.to_dict()
        if {k: v for k, v in theirs.items() if k not in free} != {k: v for k, v in ours.items() if k not in free}:
            raise ConfigError(f"init_from {self.cfg.init_from}: its model differs from the config's 'model' "
                              "(only canvas_length may differ)")
        model.load_state_dict(source.state_dict(), strict=True)
        return model

    # ---- one optimizer step -------------------------------------------------------------------
    def micro_batch(self, split: str, step: int, index: int):
        gen = batch_generator(self.cfg.seed, split, step, index)
        x = self.data.get_batch(split, self.cfg.micro_batch_size, self.cfg.seq_len, gen)
        return x.to(self.d.device), gen

    def sync_grads(self, on: bool):
        if not self.d.active:
            return contextlib.nullcontext()
        if self.cfg.fsdp:
            self.wrapped.set_requires_gradient_sync(on)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if on else self.wrapped.no_sync()

    def train_step(self) -> dict:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.cfg)
        totals = torch.zeros(3)
        for micro in range(self.accum):
            x, gen = self.micro_batch("train", self.step, micro * self.d.world + self.d.rank)
            with self.sync_grads(micro == self.accum - 1):
                with self.autocast:
                    losses = self.wrapped(x, gen)
                (losses.loss / self.accum).backward()
            totals += _parts(losses) / self.accum
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.cfg.batch_size * self.cfg.seq_len
        loss, decoder, encoder = distributed.all_mean(totals, self.d).tolist()
        return {"loss": loss, "decoder": decoder if self.cfg.objective == "diffusion" else None,
                "encoder": encoder, "grad_norm": float(norm), "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean losses over `eval_batches` fixed validation micro-batches (the same at every eval)."""
        self.module.eval()
        totals, per_rank = torch.zeros(3), math.ceil(self.cfg.eval_batches / self.d.world)
        for i in range(per_rank):       # every rank runs the same number of forwards (FSDP needs it)
            x, gen = self.micro_batch("val", 0, i * self.d.world + self.d.rank)
            with self.autocast:
                totals += _parts(self.wrapped(x, gen))
        self.module.train()
        loss, decoder, encoder = (distributed.all_mean(totals, self.d) / per_rank).tolist()
        return {"val_loss": loss, "val_decoder": decoder if self.cfg.objective == "diffusion" else None,
                "val_encoder": encoder}

    # ---- the loop -----------------------------------------------------------------------------
    def loop(self, stop: int) -> TrainResult:
        cfg, d = self.cfg, self.d
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not d.main, unit="step",
                   dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)
        last, val, window_t, window_tok = None, None, time.perf_counter(), self.tokens
        with _sigterm_as_interrupt(d):
            try:
                while self.step < stop:
                    last = self.train_step()
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == stop:
                        now = time.perf_counter()
                        rate = (self.tokens - window_tok) / (now - window_t)
                        window_t, window_tok = now, self.tokens
                        self.record({"kind": "train", **last, "tokens": self.tokens, "tok_per_s": rate})
                        bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{rate:,.0f}", lr=f"{last['lr']:.2e}")
                    if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                        val = self.evaluate()
                        self.record({"kind": "val", **val})
                        bar.write(f"step {self.step}: val loss {val['val_loss']:.4f}") if d.main else None
                    if self.step % cfg.checkpoint_every == 0 or self.step == stop:
                        self.save()
            except KeyboardInterrupt:
                if not d.active:        # a lone process saves where it stopped; ranks could not agree
                    self.save()
                raise
            finally:
                bar.close()
        return TrainResult(self.step, last and last["loss"], val and val["val_loss"], self.out)

    def record(self, entry: dict) -> None:
        if self.d.main:
            self.log.write({"step": self.step, **entry, "time": round(time.time(), 3)})

    def save(self) -> None:
        model_state = distributed.full_model_state(self.wrapped)
        optim_state = distributed.full_optim_state(self.wrapped, self.optimizer)
        if self.d.main:      # names in the checkpoint are the model's own, without the wrapper's prefix
            strip = lambda name: name.removeprefix(PREFIX)   # noqa: E731
            model_state = {strip(k): v for k, v in model_state.items()}
            state.save(self.ckpt, model_state, self.cfg.model_config(), _rename(optim_state, strip), self.step, self.tokens, asdict(self.cfg), Path(self.cfg.data_dir) / "tokenizer")
            monitor.plot(self.log.read(), self.out / "loss.png", f"{self.cfg.objective}: {self.out.name}")
        distributed.barrier(self.d)


PREFIX = "model."     # TrainingModel's attribute holding the DiffusionGemma


def _rename(optim_state: dict, fn) -> dict:
    """The optimizer state with every parameter name mapped through `fn`."""
    return {"state": {fn(k): v for k, v in optim_state["state"].items()},
            "param_groups": [{**g, "params": [fn(p) for p in g["params"]]} for g in optim_state["param_groups"]]}


def _as_saved(config) -> dict:
    """A model config as a float32 checkpoint writes it (save_checkpoint records the weights' dtype)."""
    config.dtype = "float32"
    return config.to_dict()


def _parts(losses) -> torch.Tensor:
    decoder = losses.decoder if losses.decoder is not None else torch.zeros(())
    return torch.stack([losses.loss.detach(), decoder, losses.encoder]).float().cpu()


@contextlib.contextmanager
def _sigterm_as_interrupt(d: distributed.Dist):
    """`kill PID` checkpoints a single-process run just like Ctrl-C does."""
    if d.active:
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
