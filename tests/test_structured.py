"""Structured output offline: every output that ends in "stop" matches its JSON schema or regex, on a
random-weight model (the worst case for a constraint); "length" when max_tokens cuts it; requests
with and without constraints share a batch without changing each other's tokens; bad constraints
are a ValueError naming the field."""
import json
import re

import jsonschema
import pytest
import torch

from blockdiff.engine.engine import LLM
from blockdiff.engine.request import SamplingParams
from blockdiff.random_model import create_random_model
from blockdiff.structured.constraint import compile_constraint
from blockdiff.structured.grammar import GrammarCompiler, GrammarSpec

FAST = dict(max_denoising_steps=4)
SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": -5, "maximum": 5}, "b": {"type": "boolean"}},
     "required": ["a", "b"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["x", "yy", 3]}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"s": {"type": "string", "pattern": "^[a-c]{2,4}$"}}, "required": ["s"],
     "additionalProperties": False},
    {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    {"type": "object", "properties": {"p": {"type": "object", "properties": {"q": {"type": "number", "minimum": 0,
                                                                                   "maximum": 1}},
                                            "required": ["q"], "additionalProperties": False},
                                      "t": {"type": "string", "maxLength": 3}},
     "required": ["p"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(create_random_model(tmp_path_factory.mktemp("structured") / "m", seed=3), max_num_seqs=8,
               max_model_len=512)


def test_every_stop_output_validates(llm):
    params = [SamplingParams(max_tokens=64, seed=seed, json_schema=schema, **FAST)
              for schema in SCHEMAS for seed in range(4)]
    outs = llm.generate(["x"] * len(params), params)
    stops = 0
    for p, out in zip(params, outs):
        assert out.finish_reason in ("stop", "length")
        if out.finish_reason == "stop":
            stops += 1
            jsonschema.validate(json.loads(out.text), json.loads(p.json_schema))
        else:
            assert len(out.token_ids) == 64
    assert stops >= len(params) // 2          # the property is not vacuous


def test_regex_and_json_object(llm):
    outs = llm.generate(["x", "x"], [SamplingParams(max_tokens=48, seed=1, regex=r"[a-z]{3,8}@example\.com", **FAST),
                                     SamplingParams(max_tokens=200, seed=2, json_object=True, **FAST)])
    assert outs[0].finish_reason == "stop" and re.fullmatch(r"[a-z]{3,8}@example\.com", outs[0].text)
    if outs[1].finish_reason == "stop":
        assert isinstance(json.loads(outs[1].text), dict)
    else:
        assert outs[1].text.startswith("{")


def test_max_tokens_cut_says_length(llm):
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 40}
    out = llm.generate(["x"], SamplingParams(max_tokens=20, seed=0, json_schema=schema, **FAST))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 20 and out.text.startswith("[")


def test_long_output_continues_across_canvases(llm):
    c = llm.model.config.canvas_length
    schema = {"type": "array", "items": {"enum": ["alpha", "beta"]}, "minItems": c, "maxItems": c}
    out = llm.generate(["x"], SamplingParams(max_tokens=8 * c, seed=0, json_schema=schema, **FAST))[0]
    assert out.finish_reason == "stop" and out.stats.canvases > 1
    jsonschema.validate(json.loads(out.text), schema)


def test_constrained_and_free_rows_do_not_affect_each_other(llm):
    constrained = SamplingParams(max_tokens=48, seed=7, json_schema=SCHEMAS[0], **FAST)
    free = SamplingParams(max_tokens=48, seed=8, **FAST)
    alone_c = llm.generate(["hello"], constrained)[0].token_ids
    alone_f = llm.generate(["world"], free)[0].token_ids
    mixed = llm.generate(["world", "hello", "world", "hello"], [free, constrained, free, constrained])
    assert [o.token_ids for o in mixed] == [alone_f, alone_c, alone_f, alone_c]
    assert alone_c != llm.generate(["hello"], SamplingParams(max_tokens=48, seed=7, **FAST))[0].token_ids


@pytest.mark.parametrize("kwargs, field", [
    (dict(json_schema={"type": "object", "not": {}}), "json_schema"),          # unsupported keyword
    (dict(json_schema={"type": "strng"}), "json_schema"),                      # invalid schema
    (dict(json_schema="{not json"), "json_schema"),
    (dict(json_schema=[1]), "json_schema"),
    (dict(regex="(("), "regex"),
    (dict(regex="a", json_object=True), "regex"),
    (dict(json_object=True, stop=["}"]), "stop"),
    (dict(json_object=True, ignore_eos=True), "ignore_eos"),
    (dict(json_object=1), "json_object"),
])
def test_bad_constraints_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


def test_commit_repairs_a_canvas_and_rolls_back_on_error(llm):
    tok = llm.tokenizer
    compiler = GrammarCompiler(tok.backend.to_str(), llm.model.config.vocab_size, llm.output.eos_ids)
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                         "required": ["n"], "additionalProperties": False})
    constraint = compile_constraint(compiler, GrammarSpec("json_schema", schema))
    digits = tok.encode("7", add_bos=False)
    canvas = tok.encode('{"n":xyz', add_bos=False)
    canvas += [canvas[-1]] * (16 - len(canvas))

    def prefer_digits(pos):                     # logits favouring "7", then "}", then EOS
        logits = torch.zeros(llm.model.config.vocab_size)
        logits[digits[0]], logits[tok.encode("}", add_bos=False)[0]], logits[min(llm.output.eos_ids)] = 3, 2, 1
        return logits

    def broken(pos):
        raise RuntimeError("no logits")

    with pytest.raises(RuntimeError):
        constraint.commit(canvas, broken)
    out = constraint.commit(canvas, prefer_digits)          # the failed commit left no trace
    text = tok.decode([t for t in out if t not in llm.output.eos_ids])
    assert text == '{"n":7}' and out[-1] in llm.output.eos_ids


def test_guide_pins_the_frontier_and_leaves_the_matcher(llm):
    tok = llm.tokenizer
    compiler = GrammarCompiler(tok.backend.to_str(), llm.model.config.vocab_size, llm.output.eos_ids)
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "bb": {"type": "boolean"}},
              "required": ["a", "bb"], "additionalProperties": False}
    constraint = compile_constraint(compiler, GrammarSpec("json_schema", json.dumps(schema)))
    seven = tok.encode("7", add_bos=False)[0]
    canvas = tok.encode('{"a":x', add_bos=False) + [0] * 10

    def logits_at(pos):
        logits = torch.zeros(llm.model.config.vocab_size)
        logits[seven] = 1
        return logits

    pins = constraint.guide(canvas, logits_at)           # prefix, one repair ("7"), then forced ',"bb":'
    assert tok.decode(pins) == '{"a":7,"bb":'
    assert constraint.guide(canvas, logits_at) == pins   # the matcher did not move
    assert tok.decode(constraint.commit(canvas, logits_at)).startswith('{"a":7,"bb":')


def test_a_match_that_fills_the_canvas_ends_without_another_canvas(llm):
    c = llm.model.config.canvas_length
    out = llm.generate(["x"], SamplingParams(max_tokens=4 * c, seed=0, regex="a" * c, logprobs=1, **FAST))[0]
    assert out.text == "a" * c and out.finish_reason == "stop" and out.stats.canvases == 1
    assert len(out.logprobs) == c


def test_a_grammar_fault_fails_its_request_alone(llm):
    free = SamplingParams(max_tokens=32, seed=8, **FAST)
    alone = llm.generate(["world"], free)[0].token_ids
    bad = llm.add_request("hello", SamplingParams(max_tokens=32, seed=1, json_object=True, **FAST))

    def broken(*args):
        raise RuntimeError("grammar fault")
    llm.requests[bad].constraint.commit = llm.requests[bad].constraint.guide = broken
    good = llm.add_request("world", free)
    finals = {}
    while llm.has_unfinished():
        finals.update({o.request_id: o for o in llm.step() if o.finished})
    assert finals[bad].finish_reason == "error" and "grammar fault" in finals[bad].error
    assert finals[good].token_ids == alone


def test_logprobs_are_of_the_constrained_tokens(llm):
    out = llm.generate(["x"], SamplingParams(max_tokens=64, seed=0, json_schema=SCHEMAS[0], logprobs=2, **FAST))[0]
    assert out.finish_reason == "stop" and len(out.logprobs) == len(out.token_ids)
    assert all(tok in entry for tok, entry in zip(out.token_ids, out.logprobs))
    assert any(entry[tok].rank > 1 for tok, entry in zip(out.token_ids, out.logprobs))    # repaired tokens
