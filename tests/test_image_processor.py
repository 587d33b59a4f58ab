"""The image processor against transformers' Gemma4ImageProcessorPil, its settings, and untrusted bytes."""
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from blockdiff.config import VisionConfig
from blockdiff.image_processor import ImageProcessor, load_image

RNG = np.random.default_rng(0)


def random_image(height, width, mode):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = RNG.integers(0, 256, (height, width, channels)[:3 if channels > 1 else 2], dtype=np.uint8)
    return Image.fromarray(data, mode)


def palette_with_transparency():
    image = random_image(40, 60, "L").convert("P")
    image.info["transparency"] = 3
    return image


IMAGES = [random_image(50, 90, "RGB"), random_image(120, 40, "RGBA"), random_image(30, 200, "L"),
          random_image(16, 24, "RGB"), random_image(48, 88, "RGB"), random_image(7, 300, "L").convert("LA"),
          random_image(1, 1, "RGB"), random_image(480, 640, "RGB"), palette_with_transparency()]


@pytest.mark.parametrize("patch,pool,soft", [(4, 2, 70), (4, 2, 280), (8, 3, 140)])
def test_equal_to_transformers(patch, pool, soft):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    ref = Gemma4ImageProcessorPil(patch_size=patch, pooling_kernel_size=pool, max_soft_tokens=soft)(
        IMAGES, return_tensors="pt")
    got = ImageProcessor(patch_size=patch, pooling_kernel_size=pool, max_soft_tokens=soft)(IMAGES)
    assert got.pixel_values.dtype == torch.float32 and got.image_position_ids.dtype == torch.int64
    assert torch.equal(got.pixel_values, ref["pixel_values"])
    assert torch.equal(got.image_position_ids, ref["image_position_ids"])
    assert got.num_soft_tokens == [int(n) for n in ref["num_soft_tokens_per_image"]]


def test_released_sizes():
    """Resized sizes and soft-token counts of the released settings (p=16, k=3) at every budget."""
    table = {(480, 640): [(336, 432, 63), (480, 624, 130), (672, 912, 266), (960, 1296, 540), (1344, 1824, 1064)],
             (100, 3000): [(48, 2160, 45), (96, 3072, 128), (144, 4368, 273), (192, 6192, 516), (288, 8784, 1098)]}
    for (h, w), rows in table.items():
        for soft, (th, tw, n) in zip((70, 140, 280, 560, 1120), rows):
            proc = ImageProcessor(max_soft_tokens=soft)
            assert proc.target_size(h, w) == (th, tw)
            assert th * tw // (16 * 16 * 9) == n


def test_extreme_aspect_ratio_is_one_row_of_blocks():
    out = ImageProcessor(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)([random_image(1, 2000, "L")])
    assert out.num_soft_tokens == [70] and out.image_position_ids[0].amax(0).tolist() == [139, 1]


def test_patch_layout():
    """Feature (dy*p + dx)*3 + c inside a patch; patches row-major with (x, y) positions."""
    rows, cols = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    probe = np.stack([rows, cols, np.full_like(rows, 200)], -1).astype(np.uint8)
    out = ImageProcessor(patch_size=4, pooling_kernel_size=2, max_soft_tokens=280, do_rescale=False,
                         do_resize=False)(
        [Image.fromarray(probe)])
    pv, pos = out.pixel_values[0], out.image_position_ids[0]
    assert pv[0, :6].tolist() == [0, 0, 200, 0, 1, 200] and pv[0, 12:15].tolist() == [1, 0, 200]
    assert pv[1, :3].tolist() == [0, 4, 200] and pos[1].tolist() == [1, 0]
    assert pv[16, :3].tolist() == [4, 0, 200] and pos[16].tolist() == [0, 1]
    assert (pos[256:] == -1).all() and (pv[256:] == 0).all()


def test_settings_from_checkpoint_files(tmp_path):
    vision = VisionConfig(patch_size=4, pooling_kernel_size=2, extra={"default_output_length": 140})
    assert ImageProcessor.from_dir(tmp_path, vision).max_soft_tokens == 140      # no file: the vision config
    ImageProcessor(patch_size=4, pooling_kernel_size=2, max_soft_tokens=560).save(tmp_path)
    assert ImageProcessor.from_dir(tmp_path, vision).max_soft_tokens == 560
    nested = {"image_processor": {"patch_size": 4, "pooling_kernel_size": 2, "max_soft_tokens": 1120}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))           # takes precedence
    assert ImageProcessor.from_dir(tmp_path, vision).max_soft_tokens == 1120
    with pytest.raises(ValueError, match="differ from the vision tower"):
        ImageProcessor.from_dir(tmp_path, VisionConfig(patch_size=16, pooling_kernel_size=3))
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        ImageProcessor(max_soft_tokens=100)


def test_saved_settings_load_in_transformers(tmp_path):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    ImageProcessor(patch_size=4, pooling_kernel_size=2, max_soft_tokens=140).save(tmp_path)
    ref = Gemma4ImageProcessorPil.from_pretrained(tmp_path)
    assert (ref.patch_size, ref.pooling_kernel_size, ref.max_soft_tokens) == (4, 2, 140)


def encoded(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_load_image_formats(fmt):
    image = load_image(encoded(random_image(20, 30, "RGB"), fmt))
    assert image.size == (30, 20)


def png_claiming(width, height):
    """A 1x1 PNG whose header says width x height."""
    png = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def test_load_image_bad_input():
    png = encoded(random_image(20, 30, "RGB"), "PNG")
    with pytest.raises(ValueError, match="not a recognised image"):
        load_image(b"hello, not an image")
    with pytest.raises(ValueError, match="corrupt or truncated|cannot be read"):
        load_image(png[: len(png) // 2])
    with pytest.raises(ValueError, match="unsupported image format GIF"):
        load_image(encoded(random_image(20, 30, "RGB"), "GIF"))
    with pytest.raises(ValueError, match="over the 100-pixel limit"):
        load_image(png, max_pixels=100)
    for side in (6000, 20000):       # bombs: a huge size in the header of a tiny file
        with pytest.raises(ValueError, match="pixel limit"):
            load_image(png_claiming(side, side))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64), st.integers(0, 400), st.sampled_from(["PNG", "JPEG", "WEBP"]))
def test_fuzzed_bytes_decode_or_raise_value_error(junk, cut, fmt):
    """Random bytes, truncations and corruptions of real files: a PIL image or a ValueError, nothing else."""
    good = encoded(random_image(12, 17, "RGB"), fmt)
    for data in (junk, good[:cut], good[:cut] + junk + good[cut + len(junk):]):
        try:
            image = load_image(data)
        except ValueError:
            continue
        assert image.size[0] > 0 and image.size[1] > 0
