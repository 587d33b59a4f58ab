"""Tokenizer: a thin wrapper over a Hugging Face `tokenizers.Tokenizer` plus its config.

Contract:
- `Tokenizer.from_dir(path)` reads `tokenizer.json` and, if present, `tokenizer_config.json`
  (HF layout: `bos_token` / `eos_token` / `pad_token` as strings or `{"content": ...}` dicts, an
  optional Jinja `chat_template`). `save(path)` writes both files back.
- `encode` never lets the inner tokenizer add special tokens: the only special token it adds is
  `<bos>`, and only when asked, so a `tokenizer.json` whose post-processor adds BOS cannot double it.
- `apply_chat_template` renders the config's Jinja template when there is one (needs jinja2),
  else the Gemma-style fallback below. The result is text: encode it to get ids. A message's
  content is a string or a list of parts: `{"type": "text", "text": ...}` and image parts (`image`,
  `image_url`); each image part becomes one image placeholder token (`image_token`, default
  `<|image|>`) where the part stands, and the templates see it as `{"type": "image"}`.
The tokenizer knows nothing about models or sampling.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import tokenizers

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
# the vocabularies blockdiff builds (default model, tests): ids 0..4 in this order
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", START_OF_TURN, END_OF_TURN)
IMAGE_TOKEN = "<|image|>"
IMAGE_PARTS = ("image", "image_url")


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
        """Ids that end generation: EOS, plus `<end_of_turn>` when the vocabulary has it,
        because a chat model closes its reply with that token rather than EOS."""
        ids = [self.eos_id]
        eot = self._tok.token_to_id(END_OF_TURN)
        if eot is not None and eot not in ids:
            ids.append(eot)
        return ids

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

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        messages = [normalize_message(m, self.image_token) for m in messages]
        template = self.config.get("chat_template")
        if isinstance(template, list):  # HF also allows [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template:
            return self._render_jinja(template, messages, add_generation_prompt)
        return render_fallback_chat(messages, add_generation_prompt)

    def _render_jinja(self, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        # Same environment settings as transformers, so templates written for HF render alike.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token,
            pad_token=self.pad_token or "",
        )


def render_fallback_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Gemma-style chat text: `<start_of_turn>{role}\\n{content}<end_of_turn>\\n` per message,
    with role "assistant" written as "model", then `<start_of_turn>model\\n` to prompt a reply.
    No BOS here: `Tokenizer.encode(text, add_bos=True)` adds it."""
    parts = []
    for m in messages:
        role = "model" if m["role"] == "assistant" else m["role"]
        content = m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
        parts.append(f"{START_OF_TURN}{role}\n{content}{END_OF_TURN}\n")
    if add_generation_prompt:
        parts.append(f"{START_OF_TURN}model\n")
    return "".join(parts)


def normalize_message(message: Any, image_token: str) -> dict:
    """Check a chat message; list content becomes text parts (`text` filled) and image parts reduced
    to `{"type": "image", "text": image_token}`, so templates and the fallback place the marker."""
    if not (isinstance(message, dict) and isinstance(message.get("role"), str)):
        raise ValueError(f"each message needs a string 'role' and a 'content', got {message!r}")
    content = message.get("content")
    if isinstance(content, str):
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

