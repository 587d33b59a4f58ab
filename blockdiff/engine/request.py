"""Requests, per-request sampling parameters and outputs. Plain Python: no torch here.

- `SamplingParams`: the usual fields (max_tokens, min_tokens, temperature, top_k, top_p, stop, seed) plus the
  diffusion knobs; invalid values raise `ValueError` naming the field. `max_tokens` and the knobs
  may be left unset (None): the engine fills them at admission (see `diffusion/params.py`).
  `json_schema` / `regex` / `json_object` constrain the output (see `structured/`).
- `Request`: one sequence's lifecycle (waiting -> running -> finished), its token ids and stats.
- `RequestOutput`: what `LLM.generate` returns and what streaming yields at each commit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..diffusion.params import BUILT_IN, MAX_LOGPROBS, DiffusionParams, check_bool, check_int, check_number
from ..structured.grammar import GrammarSpec, check_spec, normalize_schema

BUILT_IN_MAX_TOKENS = 256     # transformers' default max_new_tokens (also the released checkpoint's)
OFF_WHEN_NONE = ("logprobs", "json_schema", "regex")  # fields whose None means "off", not "left to the defaults"


@dataclass(frozen=True)
class SamplingParams(DiffusionParams):
    """Per-request settings: the diffusion knobs of `DiffusionParams` (max_denoising_steps, t_min,
    t_max, entropy_bound, confidence_threshold, stability_threshold, temperature, fixed_steps) and
    the usual ones below. None (unset) means the engine's default: the server's flags, else the
    checkpoint's generation_config.json, else the built-in value."""
    max_tokens: int | None = None
    top_k: int | None = None          # 0 = off
    top_p: float | None = None        # 1.0 = off
    stop: tuple[str, ...] = ()
    seed: int | None = None           # None: drawn by the engine
    ignore_eos: bool = False
    min_tokens: int | None = None     # end-of-sequence tokens are barred before this many tokens (0 = off)
    # structured output (at most one): a JSON schema (dict or JSON text; kept as JSON text), a
    # regular expression, or any JSON object. The output then matches it whenever it ends in "stop".
    json_schema: dict | str | None = None
    regex: str | None = None
    json_object: bool = False
    logprobs: int | None = None       # None: off; N: each token's logprob and its top-N alternatives

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not all(isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a string or a list of strings")
        if self.max_tokens is not None:
            check_int(self.max_tokens, "max_tokens", 1)
        if self.top_k is not None:
            check_int(self.top_k, "top_k", 0)
        if self.top_p is not None:
            check_number(self.top_p, "top_p", 0.0, inclusive=False, maximum=1.0)
        if self.seed is not None:
            check_int(self.seed, "seed", 0)
        check_bool(self.ignore_eos, "ignore_eos")
        if self.min_tokens is not None:
            check_int(self.min_tokens, "min_tokens", 0)
        if self.logprobs is not None:
            check_int(self.logprobs, "logprobs", 0, MAX_LOGPROBS)
        self._check_structured()

    def _check_structured(self) -> None:
        check_bool(self.json_object, "json_object")
        if self.json_schema is not None:
            object.__setattr__(self, "json_schema", normalize_schema(self.json_schema))
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError(f"regex must be a string, got {type(self.regex).__name__}")
        given = [n for n in ("json_schema", "regex") if getattr(self, n) is not None] + (
            ["json_object"] if self.json_object else [])
        if len(given) > 1:
            raise ValueError(f"{given[0]} and {given[1]} cannot be combined: give one constraint")
        if given:
            if self.stop:
                raise ValueError(f"stop cannot be combined with {given[0]}: a stop string could cut the output")
            if self.ignore_eos:
                raise ValueError(f"ignore_eos cannot be combined with {given[0]}: the output ends where the "
                                 "grammar ends")
            check_spec(self.grammar, given[0])

    @property
    def grammar(self) -> GrammarSpec | None:
        """The structured-output constraint, or None for free text."""
        if self.json_schema is not None:
            return GrammarSpec("json_schema", self.json_schema)
        if self.regex is not None:
            return GrammarSpec("regex", self.regex)
        return GrammarSpec("json_object", "") if self.json_object else None

    @property
    def unset(self) -> list[str]:
        return [name for name in super().unset if name not in OFF_WHEN_NONE]

    @classmethod
    def built_in(cls) -> SamplingParams:
        """Every field at its built-in default: the last layer a request is resolved against."""
        return cls(max_tokens=BUILT_IN_MAX_TOKENS, top_k=0, top_p=1.0, min_tokens=0).with_defaults(BUILT_IN)


@dataclass
class CanvasFrame:
    """One denoising step of one request's canvas, for live visualisation (only if asked for)."""
    request_id: str
    canvas: int                 # canvas ordinal within the request, from 0
    step: int                   # steps done in this canvas, from 1
    max_steps: int
    tokens: list[int]           # current argmax per position
    accepted: list[bool]        # accepted by the entropy bound at this step
    max_prob: list[float]       # max probability per position


@dataclass(frozen=True)
class Logprob:
    """One token's log-probability under its position's final denoising step (see
    `diffusion/logprobs.py`), its rank there (1 = the most probable) and its text alone."""
    logprob: float
    rank: int
    decoded_token: str


@dataclass
class CanvasLogprobs:
    """The runner's logprobs of one committed canvas, per position (C,): the committed token's
    logprob and rank, and the top-N ids and logprobs, most probable first."""
    logprob: list[float]
    rank: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """Everything about one request, in one record: its input, where it is in its lifecycle and
    in its current canvas (the scheduler's counters), its KV slot, and its output so far (the
    output processor's text state)."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    prompt: str | None = None
    frames: bool = False        # emit a CanvasFrame after every denoising step
    images: Any = None          # image_prompt.ImageInputs for the prompt's image tokens, or None
    prefix_keys: list | None = None   # prompt ids with image tokens keyed by image content (prefix reuse)
    constraint: Any = None      # structured.constraint.Constraint for structured output, or None
    status: Status = Status.WAITING
    slot: int | None = None
    # scheduler: position in the canvas loop
    canvases: int = 0
    steps_in_canvas: int = 0
    steps_per_canvas: list[int] = field(default_factory=list)
    committed_ids: list[int] = field(default_factory=list)    # every canvas token encoded in the slot, uncut
    pending_commit: list[int] | None = None                   # a finished canvas to encode next step
    # output processor: what the user sees
    output_ids: list[int] = field(default_factory=list)      # cut at EOS / max_tokens / stop string
    text: str = ""
    sent: int = 0                                             # characters of `text` already streamed
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)   # per output id, if asked
    token_ends: list[int] = field(default_factory=list)       # per output id: where its text ends in `text`
    logprobs_sent: int = 0                                    # entries of `logprobs` already streamed
    finish_reason: str | None = None
    error: str | None = None                                  # why the engine failed this request
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def context_len(self) -> int:
        """Positions whose K/V are in the slot: the prompt plus every committed canvas."""
        return len(self.prompt_ids) + len(self.committed_ids)

    @property
    def cache_keys(self) -> list:
        """What the slot allocator matches prefixes on: the prompt ids, images keyed by content."""
        return self.prefix_keys if self.prefix_keys is not None else self.prompt_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class RequestStats:
    canvases: int
    steps_per_canvas: list[int]
    time_to_first_token: float | None    # seconds from arrival to the first committed canvas
    latency: float | None                # seconds from arrival to finish
    tokens_per_second: float | None      # output tokens / latency (end to end)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None             # "stop" | "length" | "abort" | "error" | None while running
    stats: RequestStats
    delta_text: str = ""                  # new text since the previous output of this request (streaming)
    delta_token_ids: list[int] = field(default_factory=list)
    error: str | None = None              # with finish_reason "error": what failed
    # with SamplingParams.logprobs, one entry per token of `text` (vLLM's layout: the token's own id
    # first, then its top-N alternatives; all of token_ids once finished), where each token's text
    # starts in `text`, and the entries new since the previous output (streaming); else None
    logprobs: list[dict[int, Logprob]] | None = None
    text_offsets: list[int] | None = None
    delta_logprobs: list[dict[int, Logprob]] | None = None
