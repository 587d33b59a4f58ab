"""Structured output and tool calls over HTTP with the real `openai` client on a loopback server:
response_format json_object / json_schema, tools with tool_choice required / named / none / auto,
tool results going back through the chat template, streaming, and 400s naming the field."""
import json

import httpx
import jsonschema
import openai
import pytest
from server_harness import KEY, MODEL, running_server

from blockdiff.random_model import create_random_model

FAST = {"max_denoising_steps": 4}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
    "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = create_random_model(tmp_path_factory.mktemp("structured") / "m", seed=3)
    with running_server(model_dir, max_model_len=2048) as s:          # byte tokens: tools take ~600
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat(client, **kw):
    kw = {"messages": ASK, "max_tokens": 64, "seed": 1, "extra_body": FAST, **kw}
    return client.chat.completions.create(model=MODEL, **kw)


def test_json_schema_response_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = chat(client, response_format=fmt, n=3)
    for c in r.choices:
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.message.content), PERSON)
    assert any(c.finish_reason == "stop" for c in r.choices)


def test_client_parse_with_a_pydantic_model(client):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        kind: Literal["cat", "dog"]
        legs: int = Field(ge=0, le=4)

    r = client.chat.completions.parse(model=MODEL, messages=ASK, max_tokens=64, seed=3, response_format=Pet,
                                      extra_body=FAST)
    assert r.choices[0].finish_reason == "stop" and isinstance(r.choices[0].message.parsed, Pet)


def test_json_object_response_and_completions(client):
    r = chat(client, response_format={"type": "json_object"}, max_tokens=256)
    assert r.choices[0].message.content.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}    # completions: an extra field
    c = client.completions.create(model=MODEL, prompt="x", max_tokens=64, seed=2,
                                  extra_body={**FAST, "response_format": fmt})
    assert c.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(c.choices[0].text), PERSON)


def test_streamed_json_schema_equals_the_whole_answer(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    whole = chat(client, response_format=fmt).choices[0]
    chunks = list(chat(client, response_format=fmt, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_call(client, tool_choice):
    r = chat(client, tools=[WEATHER, TIME], tool_choice=tool_choice)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_streamed_tool_call_matches(client):
    kw = dict(tools=[WEATHER], tool_choice="required")
    whole = chat(client, **kw).choices[0].message.tool_calls[0]
    chunks = [c for c in chat(client, stream=True, **kw) if c.choices]
    calls = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id and calls[0].function.name == whole.function.name
    assert "".join(d.function.arguments or "" for d in calls) == whole.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("tool_choice", ["none", "auto"])
def test_free_tool_choice_answers_in_text(client, tool_choice):
    c = chat(client, tools=[WEATHER], tool_choice=tool_choice, max_tokens=16, extra_body={**FAST, "ignore_eos": True})
    c = c.choices[0]
    assert c.finish_reason == "length" and c.message.tool_calls is None and c.message.content


def test_tool_results_go_back_into_the_prompt(server, client):
    call = chat(client, tools=[WEATHER], tool_choice="required").choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"}]
    r = chat(client, messages=history, tools=[WEATHER], max_tokens=16, extra_body={**FAST, "ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    history[1]["tool_calls"][0]["function"]["arguments"] = json.loads(call.function.arguments)  # as templates take it
    prompt = server.llm.tokenizer.apply_chat_template(history, tools=[WEATHER])
    assert "21 degrees and sunny" in prompt and call.function.name in prompt
    assert r.usage.prompt_tokens == len(server.llm.tokenizer.encode(prompt))


BAD = [  # (body changes, param)
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(("}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
]


@pytest.mark.parametrize("change,param", BAD)
def test_bad_structured_requests_are_400_naming_the_field(server, change, param):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 8, **change}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
