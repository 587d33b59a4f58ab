"""Tokenizer: a thin wrapper over a Hugging Face `tokenizers.Tokenizer` plus its config.

Contract:
- `Tokenizer.from_dir(path)` reads `tokenizer.json`, if present `tokenizer_config.json` (HF layout:
  `bos_token` / `eos_token` / `pad_token` as strings or `{"content": ...}` dicts, an optional Jinja
  `chat_template`) and, if present, `chat_template.jinja`, which takes priority over the config's
  template (as in transformers 5, which saves templates there). `save(path)` writes the files back.
- `encode` never lets the inner tokenizer add special tokens: the only special token it adds is
  `<bos>`, and only when asked, so a `tokenizer.json` whose post-processor adds BOS cannot double it.
- `apply_chat_template(messages, tools=None, **kwargs)` renders the Jinja template the way
  transformers' `apply_chat_template(..., tokenize=False)` does (same Jinja settings, the config's
  special tokens, `tools`, and switches such as `enable_thinking` passed through), else the
  fallback below. A template that fails to render raises `ValueError`. The result is text: encode
  it to get ids. A message's content is a string or a list of parts: `{"type": "text", "text": ...}`
  and image parts (`image`, `image_url`); each image part becomes one image placeholder token
  (`image_token`, default `<|image|>`) where the part stands, and templates see it as
  `{"type": "image"}`.
The tokenizer knows nothing about models or sampling.
"""
from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import tokenizers

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"          # Gemma 1-3 turns
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"                              # Gemma 4 turns
# the vocabularies blockdiff builds (default model, tests): ids 0..4 in this order
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", START_OF_TURN, END_OF_TURN)
IMAGE_TOKEN = "<|image|>"
IMAGE_PARTS = ("image", "image_url")
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")          # SentencePiece byte fallback


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable bytes stand for themselves, the rest from U+0100 on."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


BYTE_OF = _byte_of_char()


def _token_name(value: Any) -> str | None:
    # HF writes special tokens either as plain strings or as serialized AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path


class Tokenizer:
    """Encode/decode text and render chat prompts for one vocabulary."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict[str, Any] | None = None):
        self._tok = tokenizer
        self.config: dict[str, Any] = dict(config or {})
        self.bos_token = _token_name(self.config.get("bos_token"))
        self.eos_token = _token_name(self.config.get("eos_token"))
        self.pad_token = _token_name(self.config.get("pad_token"))
        if self.eos_token is None or self._tok.token_to_id(self.eos_token) is None:
            raise ValueError(f"tokenizer config needs an eos_token in the vocabulary, got {self.eos_token!r}")
        for name in (self.bos_token, self.pad_token):
            if name is not None and self._tok.token_to_id(name) is None:
                raise ValueError(f"special token {name!r} from tokenizer config is not in the vocabulary")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        tok = tokenizers.Tokenizer.from_file(str(_require_file(path / TOKENIZER_FILE)))
        config_path = path / CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if (path / CHAT_TEMPLATE_FILE).is_file():
            config["chat_template"] = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        return cls(tok, config)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / TOKENIZER_FILE))
        (path / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self._tok.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self._tok.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self._tok.token_to_id(self.pad_token)

    @property
    def image_token(self) -> str:
        """The text of the placeholder that stands for one image in a prompt."""
        return _token_name(self.config.get("image_token")) or IMAGE_TOKEN

    @property
    def eos_ids(self) -> list[int]:
        """Ids that end generation: EOS, plus the end-of-turn token (`<end_of_turn>`, Gemma 4's
        `<turn|>`) when the vocabulary has it, because a chat model closes its reply with that
        token rather than EOS."""
        ids = [self.eos_id]
        for name in (END_OF_TURN, TURN_CLOSE):
            eot = self._tok.token_to_id(name)
            if eot is not None and eot not in ids:
                ids.append(eot)
        return ids

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # HF also allows [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template or None

    def set_chat_template(self, template: str) -> None:
        """Replace the checkpoint's chat template (e.g. `serve --chat-template FILE`)."""
        if not isinstance(template, str) or not template.strip():
            raise ValueError("a chat template must be non-empty text")
        try:
            _compile(template)
        except Exception as err:       # a syntax error: say so now, not at the first request
            raise ValueError(f"the chat template does not compile: {err}") from None
        self.config["chat_template"] = template

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # through encode_batch, which releases the GIL: a server tokenizing a long prompt in a
        # worker thread does not stall its event loop
        ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        # A chat template may already start with the BOS text; special tokens in text are
        # matched as tokens, so prepending another would double it.
        if add_bos and self.bos_id is not None and not (ids and ids[0] == self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads), without any special tokens."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for, also when it holds only part of a UTF-8 character: a
        byte-fallback piece `<0xNN>`, or a byte-level BPE piece (GPT-2's byte-to-character map)."""
        piece = self._tok.id_to_token(token) or ""
        if (m := BYTE_PIECE.fullmatch(piece)) is not None:
            return bytes([int(m[1], 16)])
        if isinstance(self._tok.decoder, tokenizers.decoders.ByteLevel) and all(ch in BYTE_OF for ch in piece):
            return bytes(BYTE_OF[ch] for ch in piece)
        return self.decode([token], skip_special=False).encode("utf-8")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **template_kwargs) -> str:
        """Chat prompt text for `messages`; `tools` and `template_kwargs` (e.g. `enable_thinking=True`)
        reach the template as variables, as in transformers."""
        messages = [normalize_message(m, self.image_token) for m in messages]
        # transformers drops None values: templates test for a key's presence, not for None
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        if self.chat_template:
            return self._render_jinja(self.chat_template, messages, add_generation_prompt, tools, template_kwargs)
        return render_fallback_chat(messages, add_generation_prompt, gemma4=self.token_to_id(TURN_OPEN) is not None)

    def template_tokens(self) -> dict[str, str]:
        """The special tokens a template sees by name: every `*_token` of the config, and the named
        extra tokens (transformers' `special_tokens_map`)."""
        names = {k: _token_name(v) for k, v in self.config.items() if k.endswith("_token")}
        for key in ("extra_special_tokens", "model_specific_special_tokens"):
            if isinstance(self.config.get(key), dict):
                names.update({k: _token_name(v) for k, v in self.config[key].items()})
        return {k: v for k, v in names.items() if isinstance(v, str)}

    def _render_jinja(self, template: str, messages: list[dict], add_generation_prompt: bool,
                      tools: list[dict] | None, template_kwargs: dict) -> str:
        try:
            return _compile(template).render(messages=[_alias_reasoning(m) for m in messages], tools=tools,
                                             documents=None, add_generation_prompt=add_generation_prompt,
                                             **{**self.template_tokens(), **template_kwargs})
        except Exception as err:     # the template is the checkpoint's code: any failure in it is a bad template
            raise ValueError(f"the chat template failed to render: {err}") from None


def _alias_reasoning(message: dict) -> dict:
    """transformers passes a message's reasoning under all of its names; templates read one of them."""
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """The template in transformers' Jinja environment: sandboxed, trim_blocks + lstrip_blocks, loop
    controls, a `tojson` that does not escape HTML, `raise_exception` and `strftime_now`."""
    import jinja2.ext
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_fallback_chat(messages: list[dict], add_generation_prompt: bool = True, gemma4: bool = False) -> str:
    """Gemma-style chat text for checkpoints without a template: `<start_of_turn>{role}\\n{content}
    <end_of_turn>\\n` per message (Gemma 4 vocabularies: `<|turn>{role}\\n{content}<turn|>\\n`), with
    role "assistant" written as "model", then the opening of a model turn to prompt a reply.
    No BOS here: `Tokenizer.encode(text, add_bos=True)` adds it."""
    start, end = (TURN_OPEN, TURN_CLOSE) if gemma4 else (START_OF_TURN, END_OF_TURN)
    parts = []
    for m in messages:
        role = "model" if m["role"] == "assistant" else m["role"]
        if m.get("content") is None:
            raise ValueError(f"without a chat template each message needs 'content', got {m!r}")
        content = m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
        parts.append(f"{start}{role}\n{content}{end}\n")
    if add_generation_prompt:
        parts.append(f"{start}model\n")
    return "".join(parts)


def normalize_message(message: Any, image_token: str) -> dict:
    """Check a chat message; list content becomes text parts (`text` filled) and image parts reduced
    to `{"type": "image", "text": image_token}`, so templates and the fallback place the marker."""
    if not (isinstance(message, dict) and isinstance(message.get("role"), str)):
        raise ValueError(f"each message needs a string 'role' and a 'content', got {message!r}")
    content = message.get("content")
    if content is None or isinstance(content, str):        # None: e.g. an assistant turn of tool calls
        return message
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in IMAGE_PARTS:
            parts.append({"type": "image", "text": image_token})
        else:
            raise ValueError(f"unsupported message content part {part!r}: expected 'text' or 'image_url' parts")
    return {**message, "content": parts}

