"""Structured output and tool calls of an OpenAI request: what to constrain, and the tool-call reply.

Contract:
- `structured_fields(req)` -> `Structured`: the `SamplingParams` fields of the request's
  constraint (`response_format`, or a forced tool call) with the request field each one came from,
  the tools to render into the chat template, and whether the reply is a tool call. Bad input is
  an `ApiError` 400 naming the field: a tool schema that does not compile, `tool_choice` naming an
  unknown function or "required" without tools, a forced call together with a JSON
  response_format.
- Tool choice: "none" and "auto" render the tools into the prompt and let the model answer in
  free text (the reply is `content`; no parsing of calls out of free text). "required" and a named
  function generate one call under a JSON schema: `{"name": <one of the functions>, "arguments":
  <that function's parameters schema>}`; `tool_message(text)` turns the generated JSON into
  OpenAI's `tool_calls` (id, type "function", function.name, function.arguments as JSON text).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from ..structured.grammar import GrammarSpec, check_spec, normalize_schema
from .protocol import ApiError, ChatCompletionRequest, NamedToolChoice

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class Structured:
    params: dict = field(default_factory=dict)     # SamplingParams fields: json_schema / json_object
    param: str | None = None                       # the request field they came from
    tools: list[dict] | None = None                # for the chat template
    tool_call: bool = False                        # the reply is a forced tool call


def structured_fields(req) -> Structured:
    tools = getattr(req, "tools", None) or []
    choice = getattr(req, "tool_choice", None)
    template_tools = [t.model_dump(exclude_none=True, by_alias=True) for t in tools] or None
    for i, t in enumerate(tools):
        _check_schema(t.function.parameters or NO_ARGUMENTS, f"tools.{i}.function.parameters")
    forced = _forced_functions(tools, choice)
    fmt = req.response_format
    if forced:
        if fmt is not None and fmt.type != "text":
            raise ApiError(400, "response_format cannot be combined with a forced tool call (tool_choice "
                           "'required' or a named function)", param="response_format", code="invalid_value")
        return Structured({"json_schema": call_schema(forced)}, "tool_choice", template_tools, True)
    if fmt is None or fmt.type == "text":
        return Structured(tools=template_tools)
    if fmt.type == "json_object":
        return Structured({"json_object": True}, "response_format", template_tools)
    schema = fmt.json_schema.schema_
    if schema is None:
        return Structured({"json_object": True}, "response_format.json_schema", template_tools)
    _check_schema(schema, "response_format.json_schema.schema")
    return Structured({"json_schema": schema}, "response_format.json_schema.schema", template_tools)


def _forced_functions(tools, choice) -> list:
    """The functions a forced call may use: all for "required", one for a named choice."""
    if isinstance(choice, NamedToolChoice):
        match = [t.function for t in tools if t.function.name == choice.function.name]
        if not match:
            raise ApiError(400, f"tool_choice names the function '{choice.function.name}', which is not in "
                           "'tools'", param="tool_choice", code="invalid_value")
        return match
    if choice == "required":
        if not tools:
            raise ApiError(400, "tool_choice 'required' needs 'tools'", param="tool_choice", code="invalid_value")
        return [t.function for t in tools]
    return []


def call_schema(functions) -> dict:
    """The JSON schema of one call to any of `functions`."""
    calls = [{"type": "object", "properties": {"name": {"const": f.name},
                                               "arguments": f.parameters or NO_ARGUMENTS},
              "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _check_schema(schema, param: str) -> None:
    try:
        check_spec(GrammarSpec("json_schema", normalize_schema(schema, param)), param)
    except ValueError as e:
        raise ApiError(400, str(e), param=param, code="invalid_value") from None


def tool_message(text: str) -> dict:
    """The assistant message of a forced call whose generated JSON is `text` (a complete match)."""
    call = json.loads(text)
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}]}


def template_messages(req: ChatCompletionRequest) -> list[dict]:
    """The request's messages as the chat template takes them (tool-call arguments as objects)."""
    out = []
    for m in req.messages:
        msg = {"role": "system" if m.role == "developer" else m.role, "content": m.template_content()}
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text
