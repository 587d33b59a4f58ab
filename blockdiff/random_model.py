"""A tiny random DiffusionGemma checkpoint with a byte-level tokenizer, made locally, no download.

Used by tests and benchmarks that need a real checkpoint directory. The text it writes is noise: its
weights are random. With a vision config (`tiny_vision_config()`) it is multimodal: the tokenizer
gains the three image tokens after the bytes, the config's image token ids point at them, and a
`preprocessor_config.json` is written.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .config import ModelConfig
from .image_processor import ImageProcessor
from .model.init import init_weights
from .model.transformer import DiffusionGemma
from .tokenizer import SPECIAL_TOKENS

IMAGE_SPECIALS = {"boi_token_id": "<|image>", "image_token_id": "<|image|>", "eoi_token_id": "<image|>"}
# Sides of up to 140 patches: the longest grid at 70 soft tokens (p=4, k=2); wider needs more rows.
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=2,
                   position_embedding_size=160, standardize=True)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                layer_types=["sliding_attention", "full_attention"] * 2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                sliding_window=64, num_experts=4, top_k_experts=2, moe_intermediate_size=32, canvas_length=16,
                max_position_embeddings=4096)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_vision_config(**overrides) -> ModelConfig:
    """`tiny_config` with a small vision tower whose image tokens bidirectionally attend, as released."""
    base = dict(vocab_size=len(SPECIAL_TOKENS) + 256 + len(IMAGE_SPECIALS), vision_config=dict(TINY_VISION))
    base.update(overrides)
    config = tiny_config(**base)
    config.text_extra["use_bidirectional_attention"] = "vision"
    return config


def byte_tokenizer(extra_specials: tuple[str, ...] = ()) -> Tokenizer:
    """Byte-level BPE without merges: one token per byte, plus the special tokens at ids 0..4 and
    `extra_specials` after the bytes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS) + list(extra_specials))
    return tok


def create_random_model(path: str | Path, config: ModelConfig | None = None, seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json to `path`."""
    path = Path(path)
    config = config or tiny_config(vocab_size=byte_tokenizer().get_vocab_size())
    specials = tuple(IMAGE_SPECIALS.values()) if config.vision_config else ()
    tokenizer = byte_tokenizer(specials)
    if specials:
        for name, token in IMAGE_SPECIALS.items():
            setattr(config, name, tokenizer.token_to_id(token))
    model = init_weights(DiffusionGemma(config), seed=seed).to(dtype)
    model.save_pretrained(path)
    if specials:
        vision = config.vision_config
        ImageProcessor(vision.patch_size, vision.pooling_kernel_size, max_soft_tokens=70).save(path)
    tokenizer.save(str(path / "tokenizer.json"))
    tok_config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    if specials:
        tok_config.update(boi_token=specials[0], image_token=specials[1], eoi_token=specials[2])
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return path
