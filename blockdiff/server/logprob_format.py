"""OpenAI `logprobs` objects from the engine's per-token entries. Plain dict builders, no I/O.

An entry is vLLM's layout (`engine.request.Logprob`): {token id: Logprob}, the token's own id first,
then its top-N alternatives, most probable first (the token itself appears once, with its own
rank). The log-probabilities are those of block diffusion (see `diffusion/logprobs.py`).
- Completions (the legacy format): {tokens, token_logprobs, top_logprobs, text_offset}; each
  top_logprobs dict maps token text -> logprob for the top N plus the token itself (up to N + 1
  keys, as OpenAI); text_offset is where each token's text starts in the choice's text.
- Chat: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal":
  null}; `bytes` are the token's own UTF-8 bytes (a part of a character for a split one), top
  lists hold exactly the top N.
"""
from __future__ import annotations

from ..engine.request import Logprob
from ..tokenizer import Tokenizer

Entry = dict[int, Logprob]


def completion_logprobs(entries: list[Entry], offsets: list[int]) -> dict:
    tokens, values, tops = [], [], []
    for entry in entries:
        own = next(iter(entry.values()))
        tokens.append(own.decoded_token)
        values.append(own.logprob)
        top: dict[str, float] = {}
        for lp in sorted(entry.values(), key=lambda lp: lp.rank):     # stable: ties keep the entry's order
            top.setdefault(lp.decoded_token, lp.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": list(offsets)}


def chat_logprobs(entries: list[Entry], n: int, tokenizer: Tokenizer) -> dict:
    """`n`: the request's top_logprobs."""
    def item(token: int, lp: Logprob) -> dict:
        return {"token": lp.decoded_token, "logprob": lp.logprob, "bytes": list(tokenizer.token_bytes(token))}

    content = []
    for entry in entries:
        own_id = next(iter(entry))
        # n + 1 keys: the token is not among its top n (listed first only as itself); n keys: it is
        alternatives = list(entry.items())[1:] if len(entry) > n else sorted(entry.items(), key=lambda kv: kv[1].rank)
        content.append({**item(own_id, entry[own_id]), "top_logprobs": [item(t, lp) for t, lp in alternatives[:n]]})
    return {"content": content, "refusal": None}
