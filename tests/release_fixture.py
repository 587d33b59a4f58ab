"""Test-only: a tiny random checkpoint with the file set of the released google/diffusiongemma-26B-A4B-it.

`build_release_checkpoint(dir)` writes, through transformers 5.23.0 where it writes those files itself:
- config.json: the released structure (layer pattern 5 sliding + 1 full, global vs sliding head dims
  and KV heads, sliding window, MoE, bidirectional "vision" attention, top-level eos [1, 106], the
  released image token ids, a bf16 checkpoint, a vision config) at tiny widths;
- sharded safetensors + model.safetensors.index.json, with text and vision tensors under the
  released names;
- generation_config.json in the released layout (`sampler_config` object, eos [1, 106, 50]) with
  values that differ from the built-in ones, so tests can tell which one a request got;
- tokenizer.json + tokenizer_config.json: a synthetic Gemma-family vocabulary of 262,144 entries
  (no real one ships in a registry package: the `gemma` wheel downloads its vocabulary at run time).
  Same pipeline as transformers' GemmaTokenizer (BPE with byte fallback, "▁" for spaces), control
  tokens at the ids the public Gemma 4 vocabulary uses where known (<eos> 1, <|tool_response> 50,
  <|turn> 105, <turn|> 106, image tokens 255999 / 258880 / 258882), word merges for English text;
- chat_template.jinja: a Gemma 4 turn-format template written for these tests (system prompt,
  `enable_thinking`, `tools`), and processor_config.json.
`install_in_hub_cache(src, cache, repo_id)` copies a checkpoint into huggingface_hub's cache layout.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

VOCAB = 262_144
CANVAS = 8
GENERATION = {"max_new_tokens": 16, "max_denoising_steps": 5, "t_min": 0.3, "t_max": 0.9, "stability_threshold": 2,
              "confidence_threshold": 0.01, "entropy_bound": 0.2, "eos_token_id": [1, 106, 50], "pad_token_id": 0,
              "bos_token_id": 2}
CONTROL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 50: "<|tool_response>", 105: "<|turn>",
           106: "<turn|>", 255999: "<|image>", 258880: "<|image|>", 258882: "<image|>"}
MORE_CONTROL = ["<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
                "<tool_response|>", '<|"|>']
WORDS = ("the of and to in is was he that it for you with as his on be at by had not are but from or have an they "
         "which one were her all she there would their we him been has when who will more no if out so said what up "
         "its about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little state good very make world still own "
         "see men work long get here between both life being under never day same another know while last might us "
         "great old year off come since against go came right used take three hello king said once upon weather "
         "today tell story short answer question think tool call system user model reply").split()

# Gemma 4 turn format, written for these tests: <|turn>ROLE\n...<turn|>\n, "assistant" is "model";
# an optional system turn carries <|think|> (thinking on), the system prompt and tool declarations.
CHAT_TEMPLATE = """{{- bos_token -}}
{%- set loop_messages = messages -%}
{%- set has_system = messages and messages[0]['role'] in ['system', 'developer'] -%}
{%- if has_system or tools or enable_thinking is defined and enable_thinking -%}
{{- '<|turn>system\\n' -}}
{%- if enable_thinking is defined and enable_thinking -%}{{- '<|think|>' -}}{%- endif -%}
{%- if has_system -%}{{- messages[0]['content'] | trim -}}{%- set loop_messages = messages[1:] -%}{%- endif -%}
{%- for tool in tools or [] -%}{{- '<|tool>' + tool | tojson + '<tool|>' -}}{%- endfor -%}
{{- '<turn|>\\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message['role'] in ['system', 'developer'] -%}
{{- raise_exception('a system prompt must be the first message') -}}
{%- endif -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{- '<|turn>' + role + '\\n' + message['content'] | trim + '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|turn>model\\n' -}}
{%- if not (enable_thinking is defined and enable_thinking) -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""


def gemma_tokenizer():
    """A 262,144-entry tokenizers.Tokenizer with the GemmaTokenizer pipeline."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab = dict((tok, i) for i, tok in CONTROL.items())
    free = iter(i for i in range(5, 256) if i not in CONTROL)
    for tok in MORE_CONTROL:
        vocab[tok] = next(free)
    vocab.update({f"<unused{i}>": i for i in free})
    pieces, merges = [f"<0x{b:02X}>" for b in range(256)], []
    pieces += [chr(c) for c in range(32, 127) if chr(c) != " "] + ["▁", "\n"]
    for word in dict.fromkeys(WORDS):                 # left-to-right merges: ▁ + w -> ▁w, ▁w + o -> ▁wo, ...
        for prev in ("▁", ""):                        # words after a space, and at the start of a line
            for ch in word:
                if prev:
                    merges.append((prev, ch))
                prev += ch
                pieces.append(prev)
    ids = (i for i in range(256, VOCAB) if i not in CONTROL)
    for piece in dict.fromkeys(pieces):
        vocab[piece] = next(ids)
    taken, filler = set(vocab.values()), 0
    for i in range(VOCAB):                            # pieces nobody merges into: the vocabulary's size only
        if i not in taken:
            vocab[f"<filler{filler}>"], filler = i, filler + 1
    merges = list(dict.fromkeys(merges))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in [*CONTROL.values(), *MORE_CONTROL]])
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB
    return tok


def tokenizer_config() -> dict:
    return {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
            "unk_token": "<unk>", "mask_token": "<mask>", "padding_side": "left", "model_max_length": 1000000,
            "processor_class": "Gemma4Processor", "add_bos_token": True,
            "extra_special_tokens": {"boi_token": "<|image>", "image_token": "<|image|>", "eoi_token": "<image|>"}}


def hf_release_model(seed: int = 0):
    """The tiny transformers model: the released config structure (SPEC 1.4) at tiny widths."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig
    from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

    torch.manual_seed(seed)
    text = DiffusionGemmaTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
        layer_types=["sliding_attention"] * 5 + ["full_attention"], num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=16,
        max_position_embeddings=VOCAB, num_experts=8, top_k_experts=2, moe_intermediate_size=16,
        use_bidirectional_attention="vision", final_logit_softcapping=30.0, rms_norm_eps=1e-6,
        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=8, position_embedding_size=16, patch_size=4,
                                pooling_kernel_size=3, use_clipped_linears=False, standardize=True)
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=CANVAS, boi_token_id=255999,
                                  eoi_token_id=258882, image_token_id=258880, eos_token_id=[1, 106],
                                  attn_implementation="eager")
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    model.set_experts_implementation("eager")
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.ndim == 1:                       # HF inits norms and scales to 1.0: perturb them
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
        model.lm_head.weight.mul_(40.0)               # logits of random weights are near 0: give them a shape
        for enc, dec in zip(model.model.encoder.language_model.layers, model.model.decoder.layers):
            enc.layer_scalar.copy_(1.0 + 0.1 * torch.randn_like(enc.layer_scalar))
            dec.layer_scalar.copy_(enc.layer_scalar)
    return model


def build_release_checkpoint(path: str | Path, seed: int = 0) -> Path:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (DiffusionGemmaGenerationConfig,
                                                                                EntropyBoundSamplerConfig)

    path = Path(path)
    model = hf_release_model(seed).to(torch.bfloat16)   # the release is bf16; rotary tables are not saved
    model.save_pretrained(path, max_shard_size="8MB")
    gen = dict(GENERATION)
    gen["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=gen.pop("entropy_bound"))
    DiffusionGemmaGenerationConfig(**gen).save_pretrained(path)
    gemma_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (path / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Gemma4Processor", "image_seq_length": 280, "audio_seq_length": 750,
         "image_processor": {"image_processor_type": "Gemma4ImageProcessor", "patch_size": 4,
                             "pooling_kernel_size": 3, "max_soft_tokens": 280}}, indent=2) + "\n")
    return path


def install_in_hub_cache(src: Path, cache: Path, repo_id: str, commit: str = "c0ffee" * 6 + "beef",
                         ref: str = "main") -> Path:
    """Put `src`'s files in huggingface_hub's cache layout: models--org--name/{blobs, snapshots/COMMIT
    (relative links into blobs), refs/REF}. Returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(src.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.name
        if not link.exists():
            link.symlink_to(Path("../../blobs") / digest)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot
