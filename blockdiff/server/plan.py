"""From a validated OpenAI request to engine work: token ids and one `SamplingParams` per choice.

Contract: `build_plan(req, tokenizer, limits, model_name)` returns a `Plan` or raises `ApiError`
(404 for an unknown model, 400 for anything the engine would refuse, so the engine thread never
sees a request it rejects). Conventions:
- Choice `j` of prompt `p` has index `p * n + j` (OpenAI's order) and, when the request has a
  seed, seed `seed + index`: the same request with the same seed gives the same choices.
- Chat prompts are the tokenizer's chat template (`Tokenizer.apply_chat_template`; without a
  template in tokenizer_config.json, the documented Gemma-style fallback) encoded with BOS. Image
  parts are decoded and processed here (the engine's `InputProcessor`): a bad image, a remote URL,
  too many images or images for a text-only model are 400s naming the problem.
- `max_tokens` (chat: also `max_completion_tokens`) is exact. Defaults: 16 for completions (as
  OpenAI); for chat, everything the context has room for, in whole canvases. The checkpoint's
  generation_config `max_new_tokens` never caps either.
- `response_format` and forced tool calls become the choice's structured-output constraint, and
  tools reach the chat template (`tools.py`).
- Knobs the request leaves out stay unset in its `SamplingParams`: the engine's defaults (server
  flags, then the checkpoint's generation_config.json) fill them. They are resolved here against
  `defaults` too, so a value that clashes with a default (t_max below the default t_min) is a 400.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..engine.input_processor import InputProcessor, PromptInputs
from ..engine.request import SamplingParams
from ..image_prompt import ImageInputs
from .protocol import KNOBS, ApiError, ChatCompletionRequest, CompletionRequest, FrameOptions
from .tools import Structured, structured_fields, template_messages


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    canvas_length: int
    max_model_len: int

    def room(self, prompt_len: int) -> int:
        """Most new tokens a prompt of this length leaves room for (the engine reserves whole canvases)."""
        return (self.max_model_len - prompt_len) // self.canvas_length * self.canvas_length


@dataclass(frozen=True)
class Choice:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    images: ImageInputs | None = None

    @property
    def prompt(self) -> list[int] | PromptInputs:
        """What the engine's `add_request` takes."""
        return PromptInputs(self.prompt_ids, None, self.images) if self.images else self.prompt_ids


@dataclass(frozen=True)
class Plan:
    kind: str                      # "chat" | "completion"
    model: str
    choices: list[Choice]
    prompt_tokens: int             # each prompt counted once, whatever n is
    stream: bool
    include_usage: bool
    frames: FrameOptions | None
    tool_call: bool = False        # the reply is a forced tool call (tools.py)


def build_plan(req: CompletionRequest | ChatCompletionRequest, inputs: InputProcessor, limits: Limits,
               model_name: str, defaults: SamplingParams | None = None) -> Plan:
    if req.model != model_name:
        raise ApiError(404, f"the model '{req.model}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    images = None
    structured = structured_fields(req)
    if isinstance(req, ChatCompletionRequest):
        chat = _chat_inputs(req, inputs, structured.tools)
        kind, param, prompts, images = "chat", "messages", [chat.ids], chat.images
        max_tokens = req.max_completion_tokens or req.max_tokens
    else:
        kind, param = "completion", "prompt"
        prompts = _completion_ids(req.prompt, inputs, limits.vocab_size)
        max_tokens = req.max_tokens
    choices = []
    for p, ids in enumerate(prompts):
        room = limits.room(len(ids))
        if room < 1:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this model's context is {limits.max_model_len} "
                           f"tokens with {limits.canvas_length}-token canvases", param=param,
                           code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"max_tokens={max_tokens} does not fit: the prompt ({len(ids)} tokens) leaves "
                           f"room for {room} new tokens (context {limits.max_model_len})", param="max_tokens",
                           code="context_length_exceeded")
        for j in range(req.n):
            index = p * req.n + j
            choices.append(Choice(index, ids, _sampling_params(req, max_tokens or room, index, defaults, structured),
                                  images))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Plan(kind, model_name, choices, sum(len(ids) for ids in prompts), req.stream, include_usage,
                req.blockdiff_frames, structured.tool_call)


def _chat_inputs(req: ChatCompletionRequest, inputs: InputProcessor, tools: list[dict] | None) -> PromptInputs:
    messages = template_messages(req)
    kwargs = {**(req.chat_template_kwargs or {}), **({"tools": tools} if tools else {})}
    try:
        return inputs.chat(messages, **kwargs)
    except ValueError as e:          # images (undecodable, remote, too many, a text-only model) or the template
        raise ApiError(400, str(e), param="messages", code="invalid_value") from None
    except Exception as e:           # a Jinja template may raise on roles it does not support
        raise ApiError(400, f"the chat template rejected these messages: {e}", param="messages") from None


def _completion_ids(prompt, inputs: InputProcessor, vocab_size: int) -> list[list[int]]:
    tokenizer = inputs.tokenizer
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif all(isinstance(x, str) for x in prompt):
        prompts = [tokenizer.encode(s) for s in prompt]
    elif all(isinstance(x, int) for x in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [list(x) for x in prompt]
    if len(prompts) > 16:
        raise ApiError(400, "at most 16 prompts per request", param="prompt", code="invalid_value")
    for ids in prompts:
        if not ids:
            raise ApiError(400, "a prompt encodes to no tokens", param="prompt", code="invalid_value")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ApiError(400, f"token ids must be in [0, {vocab_size})", param="prompt", code="invalid_value")
        try:
            inputs.process(ids)          # image placeholders without images
        except ValueError as e:
            raise ApiError(400, f"{e} (send images as chat image_url parts)", param="prompt",
                           code="invalid_value") from None
    return prompts


def _sampling_params(req, max_tokens: int, index: int, defaults: SamplingParams | None,
                     structured: Structured) -> SamplingParams:
    knobs = {k: getattr(req, k) for k in KNOBS if getattr(req, k) is not None}
    seed = None if req.seed is None else req.seed + index
    try:
        params = SamplingParams(max_tokens=max_tokens, stop=req.stop_list(), seed=seed, logprobs=_logprobs(req),
                                **knobs, **structured.params)
        return params.with_defaults(defaults or SamplingParams.built_in())
    except ValueError as e:          # cross-field rules, e.g. t_max > t_min: the message names the field
        field = str(e).split()[0]
        param = field if field in KNOBS + ("stop",) else structured.param if field in (
            "json_schema", "json_object") else None
        raise ApiError(400, str(e), param=param, code="invalid_value") from None


def _logprobs(req) -> int | None:
    """Top alternatives per token, or None: completions `logprobs: N`, chat `logprobs` + `top_logprobs`."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs
