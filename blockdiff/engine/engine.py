"""LLM: the offline API, in the style of vLLM. Ties the scheduler (bookkeeping) to the runner (tensors).

    llm = LLM("path/to/model")
    outs = llm.generate(["Once upon a time"], SamplingParams(max_tokens=64, seed=0))
    outs = llm.generate({"prompt": "<|image|> What is this?", "multi_modal_data": {"image": pil_image}})
    outs = llm.chat([{"role": "user", "content": [{"type": "image", "image": pil_image},
                                                  {"type": "text", "text": "What is this?"}]}])
    for out in llm.stream("Hello", SamplingParams(max_tokens=64)): print(out.delta_text, end="")

Requests are batched continuously. `step()` is three calls: the scheduler's `schedule()` (admit,
commit finished canvases, one denoising step for every running canvas), the runner's
`execute(batch)` (the tensors) and `_update_from_output()` (the scheduler's counters, then the
output processor's text, stop strings and stats). A request's output depends only on its
prompt, parameters and seed, never on what else is in the batch; a request the runner fails
finishes alone with `finish_reason="error"` while the others go on.
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Iterator

import torch

from ..checkpoint import load_model
from ..config import ConfigError
from ..generation_config import GenerationDefaults, read_generation_config
from ..hardware import auto_dtype, reuse_freed_memory
from ..image_prompt import prefix_keys
from ..hub import METADATA_FILES, resolve_model
from ..model.slot_cache import ring_length
from ..model.transformer import DiffusionGemma
from ..structured.constraint import compile_constraint
from ..structured.grammar import GrammarCompiler
from ..tokenizer import Tokenizer
from .compiled import compile_model
from .input_processor import InputProcessor, PromptInputs
from .output import OutputProcessor
from .request import CanvasFrame, Request, RequestOutput, SamplingParams
from .runner import ModelRunner
from .scheduler import ScheduledBatch, Scheduler, StepResult


class LLM:
    def __init__(self, model: str | Path | DiffusionGemma, tokenizer: Tokenizer | str | Path | None = None,
                 dtype: str | torch.dtype | None = None, device: str = "cpu", max_num_seqs: int = 16,
                 max_model_len: int = 2048, sampler_memory_mb: float = 256, attention: str = "eager",
                 compile: bool | None = None, revision: str | None = None, generation_config: str = "auto",
                 sampling_defaults: SamplingParams | None = None, max_images_per_prompt: int = 4,
                 allowed_local_media_path: str | Path | None = None, tensor_parallel_size: int = 1):
        """`model`: a checkpoint directory or hub id (`hub.py`; `revision` picks a branch, tag or commit),
        loaded in `dtype` (default bf16 where fast), or a model object used as it is (in place, its
        experts switch to grouped matmuls: same values, another memory layout).
        Request defaults (`self.defaults`): `sampling_defaults` (e.g. the server's flags), then, with
        `generation_config="auto"`, the checkpoint's generation_config.json ("none": ignore the file),
        then the built-in values. `attention`: 'eager' (default) keeps every row's arithmetic independent of the
        batch; 'sdpa' is faster but its CPU flash kernel rounds differently with the batch's padded
        key length, so in bf16 a request's tokens can then depend on its neighbours.
        `compile`: torch.compile the model's layers (in place, see `compiled.py`) and the sampler,
        fusing their small elementwise kernels, after a one-off compile (minutes on a small CPU; the
        README's benchmark table has the speedups measured). Default (None): on for CUDA, off on
        CPU. Eager is the tested reference path. A model with a vision tower takes images (see
        `input_processor.py`), at most `max_images_per_prompt` per prompt, `file://` image URLs only
        under `allowed_local_media_path`; its image processor settings come from the checkpoint
        directory. `tensor_parallel_size` N > 1: the model is split over N worker processes, one per
        device (`cuda:0..N-1`, or N CPU ranks), which this engine starts and stops (`close()`, or the
        end of the process); the scheduler stays here and `self.model` is the model's structure on the
        meta device. Tokens equal one device's up to float summation order (see `distributed/`)."""
        source = None
        if not isinstance(model, DiffusionGemma):
            source = resolve_model(model, revision, METADATA_FILES)     # config, tokenizer, generation config
            tokenizer = tokenizer if tokenizer is not None else source
        if isinstance(tokenizer, (str, Path)):
            tokenizer = Tokenizer.from_dir(resolve_model(tokenizer, None, METADATA_FILES))
        self.tokenizer = tokenizer
        sizes = (max_num_seqs, max_model_len, sampler_memory_mb)
        if tensor_parallel_size == 1:
            self.runner = self._local_runner(model, dtype, device, revision, attention, compile, sizes)
        else:
            from ..distributed.executor import ParallelRunner

            self.runner = ParallelRunner(model, tensor_parallel_size, dtype=dtype, device=device, revision=revision,
                                         num_slots=max_num_seqs, max_len=max_model_len,
                                         sampler_memory_mb=sampler_memory_mb, attention=attention, compile=compile)
            self.model, self.compiled = self.runner.model, self.runner.compiled
        cfg = self.model.config
        self.generation = self._generation_config(source, generation_config)
        self.defaults = (sampling_defaults or SamplingParams()).with_defaults(
            SamplingParams(max_tokens=self.generation.max_new_tokens).with_defaults(self.generation.params)
        ).with_defaults(SamplingParams.built_in())
        # With a sliding-layer ring in the KV cache a slot may hold at most one canvas past a reused prefix.
        ring_slack = cfg.canvas_length if ring_length(cfg, max_model_len) is not None else None
        self.scheduler = Scheduler(max_num_seqs, max_model_len, cfg.canvas_length, ring_slack)
        eos_ids = set(cfg.eos_ids) | set(self.generation.eos_token_ids) | set(
            self.tokenizer.eos_ids if self.tokenizer else ())
        self.output = OutputProcessor(self._decode, eos_ids, self._decode_token)
        if isinstance(self.runner, ModelRunner):
            self.runner.eos_ids = tuple(sorted(eos_ids))
        self._grammars = None                   # structured.grammar.GrammarCompiler, built on first use
        self.inputs = InputProcessor.for_model(self.tokenizer, cfg, source, max_images_per_prompt,
                                               allowed_local_media_path)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.frames: list[CanvasFrame] = []     # frames of the last step, for requests that asked

    def _local_runner(self, model, dtype, device: str, revision: str | None, attention: str, compile: bool | None,
                      sizes: tuple[int, int, float]) -> ModelRunner:
        """The model on this process's device; sizes = (slots, max_model_len, sampler memory MB)."""
        if isinstance(model, DiffusionGemma):
            self.model = model
        else:
            self.model = load_model(model, dtype=dtype or auto_dtype(device), device=device, revision=revision)
            self.model.set_attention_impl(attention)
        if self.model.device.type == "cpu":
            reuse_freed_memory()
        self.model.use_grouped_experts()
        self.compiled = self.model.device.type == "cuda" if compile is None else bool(compile)
        if self.compiled:
            compile_model(self.model)
        return ModelRunner(self.model, *sizes, compile_sampler=self.compiled)

    @property
    def healthy(self) -> bool:
        """False once the engine cannot run steps any more (a tensor-parallel worker died)."""
        return getattr(self.runner, "error", None) is None

    def close(self) -> None:
        """Stop this engine's worker processes (tensor parallelism); nothing to do on one device."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _generation_config(self, source: Path | None, mode: str) -> GenerationDefaults:
        if mode not in ("auto", "none"):
            raise ValueError(f"generation_config must be 'auto' or 'none', got {mode!r}")
        gen = read_generation_config(source) if source is not None and mode == "auto" else GenerationDefaults()
        vocab = self.model.config.vocab_size
        for name, ids in (("eos_token_id", gen.eos_token_ids), ("pad_token_id", [gen.pad_token_id])):
            if any(i is not None and i >= vocab for i in ids):
                raise ConfigError(f"generation_config.json {name} {ids} is outside the vocabulary ({vocab} ids)")
        return gen

    # ---- requests ---------------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer else ""

    def _decode_token(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special=False) if self.tokenizer else ""

    def add_request(self, prompt: str | list[int] | dict | PromptInputs, params: SamplingParams | None = None,
                    request_id: str | None = None, frames: bool = False) -> str:
        """Queue a request: text, token ids, a vLLM-style dict with `multi_modal_data`, or prepared
        `PromptInputs`. With `frames`, every denoising step of its canvases is published in
        `self.frames` after the `step()` that ran it."""
        params = (params or SamplingParams()).with_defaults(self.defaults)   # request > server > checkpoint > built-in
        inputs = prompt if isinstance(prompt, PromptInputs) else self.inputs.process(prompt)
        ids, text = inputs.ids, inputs.text
        vocab = self.model.config.vocab_size
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt must be non-empty with token ids in [0, {vocab})")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"duplicate request_id {request_id!r}")
        if params.min_tokens and not isinstance(self.runner, ModelRunner):
            raise ValueError("min_tokens is not supported with tensor parallelism; pass min_tokens=0")
        seed = params.seed if params.seed is not None else random.randrange(2**62)
        keys = prefix_keys(ids, inputs.images, self.model.config.image_token_id) if inputs.images else None
        req = Request(request_id, ids, params, seed, prompt=text, frames=frames, images=inputs.images,
                      prefix_keys=keys, constraint=self._constraint(params))
        self.scheduler.add(req)
        self.requests[request_id] = req
        return request_id

    def _constraint(self, params: SamplingParams):
        """A fresh grammar matcher for a structured-output request (None for free text)."""
        return None if params.grammar is None else compile_constraint(self.prepare_grammar(params), params.grammar)

    def prepare_grammar(self, params: SamplingParams) -> GrammarCompiler | None:
        """Compile `params`' grammar (and, the first time, the vocabulary's token table: seconds for
        a 262k vocabulary) into the engine's cache, so that admitting the request is quick. A
        server calls it from a worker thread; `add_request` calls it too. ValueError if this
        engine cannot constrain (no tokenizer, tensor parallelism) or the grammar does not compile."""
        if params.grammar is None:
            return None
        if not isinstance(self.runner, ModelRunner) or self.tokenizer is None:
            raise ValueError("structured output (json_schema, regex, json_object) needs a tokenizer and a "
                             "single-device engine")
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer.backend.to_str(), self.model.config.vocab_size,
                                             self.output.eos_ids)
        self._grammars.matcher(params.grammar)
        return self._grammars

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is not None and not req.finished:
            req.finish_reason = "abort"
            self.scheduler.retire(req)
        self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- read-only facts for servers and monitors (they never touch the scheduler or the model) ----
    @property
    def running_ids(self) -> list[str]:
        return [r.request_id for r in self.scheduler.running]

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_slots(self) -> int:
        return self.scheduler.num_slots

    @property
    def supports_images(self) -> bool:
        return self.inputs.processor is not None

    @property
    def limits(self) -> tuple[int, int, int]:
        """(vocab_size, canvas_length, max_model_len)."""
        cfg = self.model.config
        return cfg.vocab_size, cfg.canvas_length, self.scheduler.max_model_len

    # ---- the loop ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, execute, update. Returns an output for every request that finished a canvas (or
        failed) in this step; finished requests are then forgotten by the engine."""
        batch = self.scheduler.schedule()
        if batch.empty:
            self.frames = []
            return []
        result = self.runner.execute(batch)
        return self._update_from_output(batch, result)

    def _update_from_output(self, batch: ScheduledBatch, result: StepResult) -> list[RequestOutput]:
        self.frames = self.output.frames(batch.running, result.frames)
        failed = [r for r in batch.running if r.request_id in result.failed]
        outputs = []
        for req, tokens in self.scheduler.update_from_output(batch, result):
            if req.constraint is not None and req.constraint.complete:
                tokens = tokens + [req.constraint.eos]      # the grammar can only end: no canvas of EOS to run
            outputs.append(self.output.on_canvas(req, tokens, result.logprobs.get(req.request_id)))
            if req.finish_reason is None:
                self.scheduler.queue_commit(req, tokens)
            else:
                self.scheduler.retire(req)
        outputs += [self.output.output(r) for r in failed]
        for out in outputs:
            if out.finished:
                self.requests.pop(out.request_id, None)
        return outputs

    # ---- convenience ---------------------------------------------------------------------------------
    def _add_all(self, prompts, sampling_params) -> list[str]:
        if isinstance(prompts, (str, dict, PromptInputs)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("sampling_params must be one SamplingParams or one per prompt")
        return [self.add_request(p, sp) for p, sp in zip(prompts, params)]

    def generate(self, prompts: str | list, sampling_params: SamplingParams | list | None = None) -> list[RequestOutput]:
        """Run prompts (text or token ids) to completion; outputs in prompt order."""
        ids = self._add_all(prompts, sampling_params)
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]

    def chat(self, messages: list, sampling_params: SamplingParams | list | None = None) -> list[RequestOutput]:
        """Run one conversation (a list of {"role", "content"} messages; content may hold image parts)
        or a list of conversations through the chat template, to completion."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.inputs.chat(c) for c in conversations], sampling_params)

    def warm_up(self) -> None:
        """Run the shapes a compiled engine meets (one and several rows, prefill, denoise, commit) so
        that compiling happens now rather than inside the first requests."""
        c = self.model.config.canvas_length
        fits = self.scheduler.capacity_needed(3, c + 1) <= self.scheduler.max_model_len
        params = SamplingParams(max_tokens=c + 1 if fits else 1, max_denoising_steps=2, fixed_steps=True,
                                ignore_eos=True, seed=0)
        for rows in (2, 1):
            self.generate([[1, 2, 3]] * rows, params)

    def stream(self, prompts: str | list, sampling_params: SamplingParams | list | None = None) -> Iterator[RequestOutput]:
        """Yield an output (with `delta_text`) each time a request commits a canvas."""
        ids = set(self._add_all(prompts, sampling_params))
        remaining = set(ids)
        while remaining:
            for out in self.step():
                if out.request_id in ids:
                    yield out
                    if out.finished:
                        remaining.discard(out.request_id)
