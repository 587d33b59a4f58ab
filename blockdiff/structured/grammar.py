"""Grammar specs: what a request constrains its output to, checked and compiled with llguidance.

- `GrammarSpec(kind, source)`: kind "json_schema" (source: the schema as JSON text), "regex" or
  "json_object" (any JSON object). `check_spec(spec, field)` compiles the grammar without a vocabulary
  and raises `ValueError` naming `field` for an invalid schema, an unsupported keyword or a regex
  that does not compile: the rule `SamplingParams` applies when it is built.
- `GrammarCompiler(tokenizer, vocab_size, eos_ids)`: one per engine; builds llguidance's token
  table from the tokenizer's `tokenizer.json` once and makes a fresh `LLMatcher` per request.
  Every id in `eos_ids` counts as end of sequence: the matcher allows them exactly where the
  grammar may end. Ids at or above the tokenizer's vocabulary (padding rows of the embedding) are
  never allowed. Compiled grammars are cached per spec; each request gets a copy.
JSON is generated compactly (no free whitespace between tokens), which keeps outputs short and
the model away from whitespace loops.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import llguidance

KINDS = ("json_schema", "regex", "json_object")
# compact separators: a model cannot loop on insignificant whitespace
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
ANY_OBJECT = {"type": "object"}
CACHE = 64              # compiled grammars kept per engine


@dataclass(frozen=True)
class GrammarSpec:
    kind: str           # one of KINDS
    source: str         # the JSON schema text, the regex, or "" for json_object


def grammar_text(spec: GrammarSpec) -> str:
    """llguidance's grammar for a spec (not yet checked)."""
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.source)
    schema = ANY_OBJECT if spec.kind == "json_object" else json.loads(spec.source)
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)


@functools.lru_cache(maxsize=256)
def check_spec(spec: GrammarSpec, field: str) -> None:
    """Raise ValueError naming `field` if the grammar does not compile (bad schema, unsupported
    keyword, bad regex)."""
    try:
        text = grammar_text(spec)
    except ValueError as e:
        raise ValueError(f"{field} is not a valid {spec.kind.replace('_', ' ')}: {e}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    if is_error:
        raise ValueError(f"{field} is invalid or unsupported: {_first_line(messages[0])}")


def normalize_schema(schema, field: str = "json_schema") -> str:
    """A JSON schema given as a dict or JSON text -> its JSON text; ValueError naming `field` if it
    is not a JSON object (or boolean schema)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"{field} is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"{field} must be a JSON object (a JSON schema), got {type(schema).__name__}")
    try:
        return json.dumps(schema, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{field} is not JSON-serialisable: {e}") from None


def _first_line(message: str) -> str:
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    return " ".join(lines[:3])[:300]


class GrammarCompiler:
    """Per-engine: the token table for llguidance and a matcher factory."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: list[int]):
        self.vocab_size = vocab_size
        self.eos_ids = sorted(set(eos_ids))
        # n_vocab = the model's vocabulary: masks then cover every logit row
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=self.eos_ids)
        self._compiled: dict[GrammarSpec, llguidance.LLMatcher] = {}     # pristine matchers, never advanced

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher: a copy of the spec's compiled one (compiled on first use, kept for the
        last CACHE specs), so n choices or repeated schemas compile once."""
        base = self._compiled.get(spec)
        if base is None:
            base = llguidance.LLMatcher(self.tokenizer, grammar_text(spec), log_level=0)
            if base.is_error():
                raise ValueError(f"{spec.kind} does not compile for this vocabulary: {_first_line(base.get_error())}")
            if len(self._compiled) >= CACHE:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[spec] = base
        return base.deep_copy()
