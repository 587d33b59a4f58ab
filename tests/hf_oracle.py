"""Test-only oracle: tiny random transformers DiffusionGemma models (no downloads).

transformers is a test dependency only; blockdiff itself never imports it.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Three tiny configs that differ in layer pattern, GQA ratio, experts/top-k, head dims, sliding
# window (relative to the prompts used) and canvas length.
CONFIGS = {
    "spec": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                 num_global_key_value_heads=1, sliding_window=8, num_experts=4, top_k_experts=2,
                 moe_intermediate_size=24, canvas_length=8),
    "default_pattern": dict(vocab_size=300, hidden_size=32, intermediate_size=40, num_hidden_layers=6,
                            layer_types=None, num_attention_heads=8, num_key_value_heads=8, head_dim=8,
                            global_head_dim=16, num_global_key_value_heads=2, sliding_window=4, num_experts=8,
                            top_k_experts=1, moe_intermediate_size=12, canvas_length=16, partial_rotary_factor=0.5),
    "full_first": dict(vocab_size=1000, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                       layer_types=["full_attention", "sliding_attention", "full_attention"],
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=64,
                       num_global_key_value_heads=None, sliding_window=16, num_experts=2, top_k_experts=2,
                       moe_intermediate_size=20, canvas_length=4),
}


# A vision tower that exercises every option: 2 layers, standardize, clipped linears (bounds set
# finite by `build_hf`), pooling 2x2 over 4x4 patches.
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              head_dim=16, patch_size=4, pooling_kernel_size=2, position_embedding_size=64, standardize=True,
              use_clipped_linears=True)
TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=8, position_embedding_size=16, patch_size=4, pooling_kernel_size=2)


def build_hf(name: str, seed: int = 0, attn: str = "eager", experts: str = "eager", vision: dict | None = None):
    """A random `DiffusionGemmaForBlockDiffusion` for CONFIGS[name], with every 1-d weight perturbed
    (HF inits norms and scales to exactly 1.0, which would hide mistakes). `vision`: Gemma4VisionConfig
    kwargs (default TINY_VISION); its position table, standardize buffers and clip bounds are perturbed too."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig
    from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

    spec = dict(CONFIGS[name])
    canvas = spec.pop("canvas_length")
    partial = spec.pop("partial_rotary_factor", 0.25)
    torch.manual_seed(seed)
    text = DiffusionGemmaTextConfig(
        **spec, max_position_embeddings=1024, use_bidirectional_attention="vision",
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": partial,
                                            "rope_theta": 1_000_000.0}},
        final_logit_softcapping=30.0, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = Gemma4VisionConfig(**(vision or TINY_VISION))
    v = spec["vocab_size"]
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas,
                                  boi_token_id=v - 3, eoi_token_id=v - 2, image_token_id=v - 1,
                                  attn_implementation=attn)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    model.set_experts_implementation(experts)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
        for enc, dec in zip(model.model.encoder.language_model.layers, model.model.decoder.layers):
            enc.layer_scalar.copy_(1.0 + 0.1 * torch.randn_like(enc.layer_scalar))
            dec.layer_scalar.copy_(enc.layer_scalar)
        _perturb_vision(model.model.encoder.vision_tower)
    return model


def _perturb_vision(tower) -> None:
    table = tower.patch_embedder.position_embedding_table
    table.copy_(1.0 + 0.1 * torch.randn_like(table))
    if tower.config.standardize:
        tower.std_bias.normal_(0.0, 0.5)
        tower.std_scale.normal_(1.0, 0.2)
    for m in tower.modules():
        if hasattr(m, "input_min"):
            m.input_min.fill_(-1.5), m.input_max.fill_(1.5), m.output_min.fill_(-0.8), m.output_max.fill_(0.8)


def load_hf(path, dtype=torch.float32, attn: str = "eager", experts: str = "eager"):
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype, attn_implementation=attn).eval()
    model.set_experts_implementation(experts)
    return model
