"""The JSON schemas of `blockdiff bench --structured`: 32 shapes that programs ask for (nested
objects, arrays with bounds, enums, integers and numbers with ranges, strings with patterns and
lengths, optional fields, anyOf), each with a one-line request for the prompt."""
from __future__ import annotations

S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def obj(props: dict, required: list[str] | None = None) -> dict:
    """A closed object; every property required unless `required` says otherwise."""
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


def arr(items: dict, lo: int | None = None, hi: int | None = None) -> dict:
    out = {"type": "array", "items": items}
    out.update({k: v for k, v in (("minItems", lo), ("maxItems", hi)) if v is not None})
    return out


SUITE: list[tuple[str, dict]] = [
    ("a person", obj({"name": {**S, "maxLength": 20}, "age": {**I, "minimum": 0, "maximum": 120}})),
    ("a yes or no answer", obj({"answer": {"enum": ["yes", "no"]}})),
    ("a sentiment label", obj({"sentiment": {"enum": ["positive", "neutral", "negative"]},
                               "score": {**N, "minimum": 0, "maximum": 1}})),
    ("a book", obj({"title": {**S, "minLength": 1, "maxLength": 40}, "author": {**S, "maxLength": 30},
                    "year": {**I, "minimum": 1500, "maximum": 2030}})),
    ("a list of three tags", obj({"tags": arr({**S, "maxLength": 12}, 3, 3)})),
    ("an address", obj({"street": {**S, "maxLength": 30}, "city": {**S, "maxLength": 20},
                        "zip": {**S, "pattern": "^[0-9]{5}$"}})),
    ("a point", obj({"x": {**N, "minimum": -100, "maximum": 100}, "y": {**N, "minimum": -100, "maximum": 100}})),
    ("a colour", obj({"hex": {**S, "pattern": "^#[0-9a-f]{6}$"}})),
    ("a date", obj({"date": {**S, "pattern": "^[12][0-9]{3}-[01][0-9]-[0-3][0-9]$"}})),
    ("a rating", obj({"stars": {**I, "minimum": 1, "maximum": 5}, "comment": {**S, "maxLength": 40}},
                     ["stars"])),
    ("a weather call", obj({"city": {**S, "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}})),
    ("a list of numbers", arr({**I, "minimum": 0, "maximum": 9}, 1, 5)),
    ("a matrix", arr(arr({**I, "minimum": -9, "maximum": 9}, 2, 2), 2, 2)),
    ("a user with a nested profile", obj({"id": {**I, "minimum": 1}, "profile": obj({
        "nickname": {**S, "maxLength": 12}, "verified": B})})),
    ("an order", obj({"items": arr(obj({"sku": {**S, "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                        "qty": {**I, "minimum": 1, "maximum": 10}}), 1, 3),
                      "express": B})),
    ("an event", obj({"name": {**S, "maxLength": 25}, "when": {**S, "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
                      "attendees": {**I, "minimum": 0, "maximum": 500}})),
    ("an optional note", obj({"id": I, "note": {**S, "maxLength": 30}}, ["id"])),
    ("a search query", obj({"query": {**S, "minLength": 2, "maxLength": 30},
                            "limit": {**I, "minimum": 1, "maximum": 50}, "safe": B}, ["query"])),
    ("a value that is a number or null", obj({"value": {"anyOf": [{**N, "minimum": 0, "maximum": 10},
                                                                  {"type": "null"}]}})),
    ("an id or a name", obj({"ref": {"anyOf": [{**I, "minimum": 0, "maximum": 999}, {**S, "maxLength": 10}]}})),
    ("a shape", {"anyOf": [obj({"kind": {"const": "circle"}, "r": {**N, "minimum": 0, "maximum": 50}}),
                           obj({"kind": {"const": "square"}, "side": {**N, "minimum": 0, "maximum": 50}})]}),
    ("a boolean flag", obj({"enabled": B})),
    ("a priority", obj({"priority": {"enum": [1, 2, 3]}, "label": {"enum": ["low", "medium", "high"]}})),
    ("a temperature reading", obj({"celsius": {**N, "minimum": -50, "maximum": 60},
                                   "sensor": {**S, "pattern": "^s[0-9]{2}$"}})),
    ("a pair of words", arr({**S, "pattern": "^[a-z]{1,10}$"}, 2, 2)),
    ("a tree node", obj({"value": {**I, "minimum": 0, "maximum": 99},
                         "children": arr(obj({"value": {**I, "minimum": 0, "maximum": 99}}), 0, 2)})),
    ("a product", obj({"name": {**S, "maxLength": 20}, "price": {**N, "minimum": 0, "maximum": 1000},
                       "currency": {"enum": ["EUR", "USD", "GBP"]}, "in_stock": B})),
    ("a contact", obj({"email": {**S, "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"},
                       "phone": {**S, "pattern": "^[0-9]{3}-[0-9]{4}$"}}, ["email"])),
    ("a translation", obj({"source": {"enum": ["en", "fr", "de"]}, "target": {"enum": ["en", "fr", "de"]},
                           "text": {**S, "maxLength": 40}})),
    ("a to-do list", obj({"todos": arr(obj({"task": {**S, "maxLength": 20}, "done": B}), 1, 3)})),
    ("a version", obj({"version": {**S, "pattern": "^[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,2}$"}})),
    ("a classification with confidence", obj({"label": {"enum": ["spam", "ham"]},
                                              "confidence": {**N, "minimum": 0, "maximum": 1},
                                              "reasons": arr({**S, "maxLength": 20}, 0, 2)}, ["label"])),
]
