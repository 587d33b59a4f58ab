"""A tiny random DiffusionGemma checkpoint with a byte-level tokenizer, made locally, no download.

Used by tests and benchmarks that need a real checkpoint directory. The text it writes is noise: its weights are random.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .config import ModelConfig
from .model.init import init_weights
from .model.transformer import DiffusionGemma
from .tokenizer import SPECIAL_TOKENS


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                layer_types=["sliding_attention", "full_attention"] * 2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                sliding_window=64, num_experts=4, top_k_experts=2, moe_intermediate_size=32, canvas_length=16,
                max_position_embeddings=4096)
    base.update(overrides)
    return ModelConfig(**base)


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges: one token per byte, plus the special tokens at ids 0..4."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def create_random_model(path: str | Path, config: ModelConfig | None = None, seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json to `path`."""
    path = Path(path)
    config = config or tiny_config(vocab_size=byte_tokenizer().get_vocab_size())
    model = init_weights(DiffusionGemma(config), seed=seed).to(dtype)
    model.save_pretrained(path)
    byte_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, indent=2) + "\n")
    return path
