"""Structured output: JSON schemas, regular expressions and JSON objects as constraints on what a
request commits (`grammar.py`: specs and compilation with llguidance; `constraint.py`: one
request's matcher and its constrained commit)."""
