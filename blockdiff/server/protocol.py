"""OpenAI request bodies: parsing and validation. No engine, no HTTP framework here.

Contract: `parse_request(raw_bytes, CompletionRequest | ChatCompletionRequest)` returns a validated
pydantic model or raises `ApiError` (status 400) whose message names the offending field. Rules:
- Bodies are strict JSON objects: no NaN/Infinity, no type coercion ("5" is not an integer), no
  invalid Unicode (a lone UTF-16 surrogate such as "\\ud800" anywhere, keys included, is a 400
  naming the field).
- Fields OpenAI defines but this server cannot honour (`UNSUPPORTED`, e.g. logit_bias, penalties,
  echo) are accepted only with their neutral value (null, 0, false,
  {}, ...); any other value is a 400 naming the field. Unknown fields are a 400 too: nothing is
  silently ignored. A request kind that defines one of these fields itself validates it instead.
- Logprobs: completions `logprobs: N` (0..20); chat `logprobs: true` with `top_logprobs: N`
  (0..20; N > 0 without `logprobs: true` is a 400, as OpenAI).
- The diffusion knobs are extra top-level fields with the names of `SamplingParams`
  (max_denoising_steps, fixed_steps, entropy_bound, t_min, t_max, confidence_threshold,
  stability_threshold, top_k, ignore_eos, min_tokens). The openai client sends them with `extra_body={...}`.
- `blockdiff_frames: {"max_fps": 20}` asks a streaming request for live denoising frames.
- Chat content parts are `text` and `image_url` (`{"url": "data:image/png;base64,..."}`); what an
  image URL may be is checked when the prompt is built (plan.py), not here.
- Chat: `chat_template_kwargs` (as vLLM) are variables for the chat template, such as
  `{"enable_thinking": true}`.
- Structured output, as OpenAI spells it: `response_format` ({"type": "text" | "json_object" |
  "json_schema", "json_schema": {"name", "schema", "strict", "description"}}); chat `tools`
  ({"type": "function", "function": {"name", "description", "parameters", "strict"}}) and
  `tool_choice` ("none" | "auto" | "required" | {"type": "function", "function": {"name"}});
  messages may be `role: "tool"` (with `tool_call_id`) and assistant turns with `tool_calls`.
  Schemas are compiled when the plan is built (plan.py / tools.py), so a bad one is a 400 there.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..diffusion.params import FLOAT32_MAX, INT64_MAX, MAX_DENOISING_STEPS, MAX_LOGPROBS, MAX_STABILITY

MAX_N = 16                  # choices per request
MAX_STOP = 4                # stop strings, as OpenAI
MAX_SEED = 2**62            # seeds are int64 in the sampler; choice i uses seed + i

# field -> neutral values that change nothing and are therefore accepted
UNSUPPORTED: dict[str, tuple] = {
    "logit_bias": ({},), "presence_penalty": (0,), "frequency_penalty": (0,), "repetition_penalty": (1,),
    "logprobs": (False,), "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "suffix": ("",),
    "functions": ([],),
    "function_call": ("none",), "parallel_tool_calls": (True, False), "store": (False,),
    "metadata": ({},), "modalities": (["text"],), "audio": (), "prediction": (), "reasoning_effort": (),
    "web_search_options": (), "service_tier": ("auto", "default"), "min_p": (0,),
}


class ApiError(Exception):
    """An error answered with an OpenAI error body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"      # OpenAI's rule for function and schema names


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")    # None: any JSON object
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None     # a JSON schema; None: no arguments
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(_Strict):
    name: str
    arguments: str                               # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


class StreamOptions(_Strict):
    include_usage: bool = False


class FrameOptions(_Strict):
    """Live denoising frames in the stream, at most `max_fps` per choice (the latest wins)."""
    max_fps: float = Field(20.0, gt=0, le=240)


class _Common(_Strict):
    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None                      # opaque end-user id, as OpenAI: recorded nowhere
    # diffusion knobs: the names and meaning of SamplingParams
    # (bounds: what the engine runs, and the int64 / float32 tensors the values land in)
    top_k: int | None = Field(None, ge=0, le=INT64_MAX)
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(None, ge=0, le=INT64_MAX)      # vLLM's: no end-of-sequence before this many
    max_denoising_steps: int | None = Field(None, ge=1, le=MAX_DENOISING_STEPS)
    fixed_steps: bool | None = None
    entropy_bound: float | None = Field(None, gt=0, le=FLOAT32_MAX)
    t_min: float | None = Field(None, ge=0, le=FLOAT32_MAX)
    t_max: float | None = Field(None, ge=0, le=FLOAT32_MAX)
    confidence_threshold: float | None = Field(None, gt=0, le=FLOAT32_MAX)
    stability_threshold: int | None = Field(None, ge=0, le=MAX_STABILITY)
    blockdiff_frames: FrameOptions | None = None
    response_format: ResponseFormat | None = None

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


KNOBS = ("temperature", "top_p", "top_k", "ignore_eos", "min_tokens", "max_denoising_steps", "fixed_steps", "entropy_bound",
         "t_min", "t_max", "confidence_threshold", "stability_threshold")


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)     # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


PART_TYPES = ("text", "image_url")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str                                     # data:image/png|jpeg|webp;base64,... (or file:// if allowed)
    detail: Literal["auto", "low", "high"] | None = None    # accepted; the processor's budget decides


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None      # None: an assistant turn of tool calls
    tool_calls: list[ToolCall] | None = None     # assistant turns
    tool_call_id: str | None = None              # tool turns: the call this result answers
    name: str | None = None

    def template_content(self) -> str | list[dict]:
        """What the chat template gets: the text, or text and image parts in order."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        return [p.model_dump(exclude_none=True) for p in self.content]


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    chat_template_kwargs: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)   # None: as many as the context allows
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


def _reject_constant(name: str) -> Any:
    raise ApiError(400, f"invalid JSON: {name} is not a valid JSON number", code="invalid_json")


def _neutral(value: Any, neutral: Any) -> bool:
    if isinstance(value, bool) or isinstance(neutral, bool):     # True == 1 in Python: compare types
        return type(value) is type(neutral) and value == neutral
    return value == neutral


def parse_request(raw: bytes, model: type[_Common]) -> _Common:
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:     # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"invalid JSON body: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    _check_unicode(body, "")
    if isinstance(body.get("messages"), list):
        _check_part_types(body["messages"])
    for name, neutral in UNSUPPORTED.items():
        if name in body and name not in model.model_fields:
            value = body.pop(name)
            if value is not None and not any(_neutral(value, n) for n in neutral):
                raise ApiError(400, f"'{name}' is not supported by this server (send null or omit it)",
                               param=name, code="unsupported_parameter")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise _from_validation(e) from None
    _check_common(req)
    return req


def _check_unicode(value: Any, path: str) -> None:
    """Reject strings that are not valid Unicode (lone surrogates cannot be encoded as UTF-8)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"'{path or 'body'}' contains invalid Unicode (a lone UTF-16 surrogate)",
                           param=path or None, code="invalid_value") from None
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{path}.{i}" if path else str(i))
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, path)
            _check_unicode(item, f"{path}.{key}" if path else key)


def _check_part_types(messages: list) -> None:
    """A content part of a type this server does not take gets a message that says so."""
    for i, m in enumerate(messages):
        parts = m.get("content") if isinstance(m, dict) else None
        for j, part in enumerate(parts if isinstance(parts, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind not in PART_TYPES:
                raise ApiError(400, f"content part type '{kind}' is not supported (supported: "
                               f"{', '.join(PART_TYPES)})", param=f"messages.{i}.content.{j}.type",
                               code="invalid_value")


def _from_validation(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"] if not _is_type_tag(p)]
    param = ".".join(loc) or None
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"unknown field '{param}'", param=param, code="unknown_parameter")
    if err["type"] == "missing":
        return ApiError(400, f"'{param}' is required", param=param, code="missing_required_parameter")
    return ApiError(400, f"invalid '{param}': {err['msg']}", param=param, code="invalid_value")


def _is_type_tag(part) -> bool:
    """Union members show up in error locations as 'str', 'list[int]', 'TextPart', ...: not fields."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool") or part[:1].isupper())


def _check_common(req: _Common) -> None:
    stops = req.stop_list()
    if len(stops) > MAX_STOP or not all(stops):
        raise ApiError(400, f"'stop' takes 1 to {MAX_STOP} non-empty strings", param="stop", code="invalid_value")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
    if req.blockdiff_frames is not None and not req.stream:
        raise ApiError(400, "'blockdiff_frames' needs 'stream': true", param="blockdiff_frames")
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs and not req.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    if isinstance(req, CompletionRequest) and isinstance(req.prompt, list) and not req.prompt:
        raise ApiError(400, "'prompt' must not be empty", param="prompt", code="invalid_value")
    if req.response_format is not None and req.response_format.type == "json_schema" \
            and req.response_format.json_schema is None:
        raise ApiError(400, "response_format of type 'json_schema' needs 'json_schema': {\"name\", \"schema\"}",
                       param="response_format.json_schema", code="missing_required_parameter")
    if isinstance(req, ChatCompletionRequest):
        _check_messages(req.messages)


def _check_messages(messages: list[Message]) -> None:
    for i, m in enumerate(messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise ApiError(400, f"'messages.{i}.content' is required (only an assistant turn with tool_calls "
                           "may omit it)", param=f"messages.{i}.content", code="missing_required_parameter")
        if m.tool_calls is not None and m.role != "assistant":
            raise ApiError(400, f"'messages.{i}.tool_calls' is only allowed in assistant messages",
                           param=f"messages.{i}.tool_calls", code="invalid_value")
        if (m.role == "tool") != (m.tool_call_id is not None):
            raise ApiError(400, f"'messages.{i}.tool_call_id' is required in tool messages and only there",
                           param=f"messages.{i}.tool_call_id", code="invalid_value")
