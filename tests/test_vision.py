"""The vision tower and image prompts against transformers 5.23.0 (eager), and their checkpoints."""
import json

import numpy as np
import pytest
import torch
from hf_oracle import CONFIGS, VISION, build_hf, load_hf
from PIL import Image
from safetensors.torch import load_file

import blockdiff
from blockdiff.checkpoint import CheckpointError
from blockdiff.model.attention import image_blocks
from blockdiff.random_model import create_random_model, tiny_vision_config

V = CONFIGS["spec"]["vocab_size"]
BOI, EOI, IMG = V - 3, V - 2, V - 1


def hf_processor():
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    return Gemma4ImageProcessorPil(patch_size=VISION["patch_size"], pooling_kernel_size=VISION["pooling_kernel_size"],
                                   max_soft_tokens=70)


def images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (120, 40, 4), dtype=np.uint8), "RGBA")]


@pytest.fixture(scope="module")
def vision_ckpt(tmp_path_factory):
    """The 'spec' text model with the full-option vision tower, saved by transformers, and processed images."""
    hf = build_hf("spec", vision=VISION)
    path = tmp_path_factory.mktemp("hf_vision")
    hf.save_pretrained(path)
    px = hf_processor()(images(), return_tensors="pt")
    return hf, path, px


def prompt(counts, row_text=(262, 263)):
    """<bos> t <boi> <image>*n0 <eoi> t t <boi> <image>*n1 <eoi> t: both images in one row."""
    a, b = row_text
    ids = [2, a, BOI] + [IMG] * counts[0] + [EOI, b, a, BOI] + [IMG] * counts[1] + [EOI, b]
    return torch.tensor([ids])


def reference_logits(hf, ids, px, canvas, bidirectional=True):
    """What transformers' generate() computes for the first canvas: the image-block mask is passed
    explicitly because its forward() builds it and drops it."""
    kwargs = {}
    if bidirectional:
        kwargs["attention_mask"] = hf.model.encoder.create_masks_for_generate(
            config=hf.config, inputs_embeds=torch.empty(1, ids.shape[1], 0, dtype=hf.dtype), attention_mask=None,
            past_key_values=None, position_ids=None, mm_token_type_ids=(ids == IMG).long())
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=px["pixel_values"], image_position_ids=px["image_position_ids"],
                  decoder_input_ids=canvas, **kwargs).logits


def counts(px):
    return [int(n) for n in px["num_soft_tokens_per_image"]]


def test_image_features_fp32_and_bf16(vision_ckpt):
    hf, path, px = vision_ckpt
    for dtype in (torch.float32, torch.bfloat16):
        ref_model = hf if dtype == torch.float32 else load_hf(path, dtype=dtype)
        ours = blockdiff.load_model(path, dtype=dtype)
        with torch.no_grad():
            ref = ref_model.model.encoder.get_image_features(px["pixel_values"], px["image_position_ids"]).pooler_output
        got = ours.image_features(px["pixel_values"], px["image_position_ids"])
        assert got.shape == (sum(counts(px)), CONFIGS["spec"]["hidden_size"]) and got.dtype == dtype
        if dtype == torch.float32:
            assert (got - ref).abs().max().item() < 1e-5
        else:
            assert torch.equal(got, ref)       # same kernels on both sides


def test_block_logits_with_images_fp32(vision_ckpt):
    hf, path, px = vision_ckpt
    ours = blockdiff.load_model(path)
    ids = prompt(counts(px))
    canvas = torch.randint(0, V, (1, CONFIGS["spec"]["canvas_length"]), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(hf, ids, px, canvas)
    got = ours.block_logits(ids, canvas, pixel_values=px["pixel_values"], image_position_ids=px["image_position_ids"])
    assert (got - ref).abs().max().item() < 1e-4
    causal = reference_logits(hf, ids, px, canvas, bidirectional=False)
    assert (causal - ref).abs().max().item() > 1e-2, "the image-block mask made no difference: the test is blind"
    no_image = ours.block_logits(ids, canvas)
    assert (no_image - ref).abs().max().item() > 1e-2


def test_block_logits_with_images_bf16_bit_exact(vision_ckpt):
    _, path, px = vision_ckpt
    hf, ours = load_hf(path, dtype=torch.bfloat16), blockdiff.load_model(path, dtype="bfloat16")
    ids = prompt(counts(px))
    canvas = torch.randint(0, V, (1, CONFIGS["spec"]["canvas_length"]), generator=torch.Generator().manual_seed(2))
    ref = reference_logits(hf, ids, px, canvas)
    got = ours.block_logits(ids, canvas, pixel_values=px["pixel_values"], image_position_ids=px["image_position_ids"])
    assert torch.equal(got, ref)


def test_generate_with_an_image_is_token_identical(vision_ckpt):
    hf, path, px = vision_ckpt
    ours = blockdiff.load_model(path)
    ids = prompt(counts(px))
    images_kw = dict(pixel_values=px["pixel_values"], image_position_ids=px["image_position_ids"])
    torch.manual_seed(5)
    ref = hf.generate(ids, mm_token_type_ids=(ids == IMG).long(), max_new_tokens=16, max_denoising_steps=2,
                      **images_kw).sequences
    torch.manual_seed(5)
    got = blockdiff.reference_generate(ours, ids, max_new_tokens=16, max_denoising_steps=2, **images_kw)
    assert torch.equal(got, ref)


def test_image_blocks_match_the_reference_mask():
    """Runs of image tokens get one id each, as transformers numbers its bidirectional blocks."""
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import get_block_sequence_ids_for_mask
    is_image = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(image_blocks(is_image), get_block_sequence_ids_for_mask(is_image.long(), "cpu"))


def test_count_mismatch_is_a_value_error(vision_ckpt):
    _, path, px = vision_ckpt
    ours = blockdiff.load_model(path)
    ids = prompt([counts(px)[0], counts(px)[1] - 1])
    with pytest.raises(ValueError, match="image tokens but its images give"):
        ours.block_logits(ids, ids[:, :8], pixel_values=px["pixel_values"], image_position_ids=px["image_position_ids"])


def test_hf_checkpoint_round_trip_keeps_every_tensor(vision_ckpt, tmp_path):
    _, path, _ = vision_ckpt
    blockdiff.load_model(path).save_pretrained(tmp_path / "rt")
    original, saved = load_file(path / "model.safetensors"), load_file(tmp_path / "rt" / "model.safetensors")
    assert set(saved) == set(original) and any("vision_tower" in k for k in saved)
    for key, tensor in original.items():
        assert torch.equal(saved[key], tensor), key
    first, again = (json.loads((p / "config.json").read_text()) for p in (path, tmp_path / "rt"))
    assert again["vision_config"] == first["vision_config"]
    assert [again[k] for k in ("boi_token_id", "eoi_token_id", "image_token_id")] == [BOI, EOI, IMG]


def test_blockdiff_multimodal_checkpoint_loads_in_transformers(tmp_path):
    path = create_random_model(tmp_path / "m", tiny_vision_config(), seed=4)
    ours = blockdiff.load_model(path)
    assert ours.supports_images
    hf = load_hf(path)
    img = np.random.default_rng(3).integers(0, 256, (37, 61, 3), dtype=np.uint8)
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    px = Gemma4ImageProcessorPil.from_pretrained(path)([Image.fromarray(img)], return_tensors="pt")
    with torch.no_grad():
        ref = hf.model.encoder.get_image_features(px["pixel_values"], px["image_position_ids"]).pooler_output
    assert (ours.image_features(px["pixel_values"], px["image_position_ids"]) - ref).abs().max().item() < 1e-5


def test_text_only_checkpoint_has_no_tower_and_refuses_images(tmp_path):
    path = create_random_model(tmp_path / "t")
    model = blockdiff.load_model(path)
    assert not model.supports_images and model.config.vision_config is None
    with pytest.raises(ValueError, match="no vision tower"):
        model.image_features(torch.zeros(1, 4, 48), torch.zeros(1, 4, 2, dtype=torch.long))


def test_partial_vision_tensors_are_named(tmp_path):
    path = create_random_model(tmp_path / "m", tiny_vision_config())
    tensors = load_file(path / "model.safetensors")
    key = "model.encoder.vision_tower.encoder.layers.0.self_attn.q_norm.weight"
    del tensors[key]
    from safetensors.torch import save_file
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=key):
        blockdiff.load_model(path)


def test_patch_grid_past_the_position_table_is_a_value_error(tmp_path):
    model = blockdiff.load_model(create_random_model(tmp_path / "m", tiny_vision_config()))
    pos = torch.tensor([[[200, 0], [0, 0], [1, 0], [-1, -1]]])
    with pytest.raises(ValueError, match="positions the tower knows"):
        model.image_features(torch.zeros(1, 4, 48), pos)
