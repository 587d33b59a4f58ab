"""The Gemma 4 image processor: decoded images -> patchified pixels, patch positions, soft-token counts.

Contract: `ImageProcessor(settings)(images)` gives what transformers 5.23.0's `Gemma4ImageProcessorPil`
gives for the same PIL images and settings, value for value:
1. RGB: alpha (an `A` band or a transparency key) is composited onto opaque white; grey is replicated.
2. Resize, aspect preserved, to the largest size whose sides are multiples of k*p (pooling kernel
   times patch size) and whose patch count fits `max_soft_tokens * k^2`; small images are upscaled.
   Pillow's resampler on uint8 (bicubic by default), skipped when the size already fits.
3. Rescale to [0, 1] (x * 1/255 in float64, stored as float32); optional mean/std normalisation.
4. Patchify row-major; inside a patch, feature (dy * p + dx) * 3 + channel. Positions are (x, y) =
   (column, row); rows past the image's patches are zero pixels at position (-1, -1).
Settings come from the checkpoint's `processor_config.json` (`image_processor` entry) or
`preprocessor_config.json`; without either, from the vision config. `load_image` turns untrusted
bytes into a PIL image or raises `ValueError` naming the problem (format, size cap, corrupt data).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp"}   # MPO: camera JPEG
MAX_PIXELS = 32_000_000           # decoded-size cap: a 32-megapixel image is ~100 MB as RGB uint8
CONFIG_FILES = ("processor_config.json", "preprocessor_config.json")


@dataclass
class ProcessedImages:
    pixel_values: torch.Tensor          # (n, max_patches, 3 p^2) float32 in [0, 1]
    image_position_ids: torch.Tensor    # (n, max_patches, 2) int64 (x, y); (-1, -1) = padding
    num_soft_tokens: list[int]          # per image: the image-token run length in the prompt


@dataclass
class ImageProcessor:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = 280
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    image_std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {self.max_soft_tokens}")
        for name in ("patch_size", "pooling_kernel_size", "max_pixels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"image processor '{name}' must be a positive integer, got {getattr(self, name)!r}")
        self.resample = Image.Resampling(self.resample)

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size ** 2

    # ---- settings ---------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path | None, vision=None) -> "ImageProcessor":
        """Settings from a checkpoint directory (None: none); `vision` (a VisionConfig) supplies patch
        and pooling sizes when no processor file exists and must agree with the file when one does."""
        settings = _read_settings(Path(path)) if path is not None else None
        if settings is None and vision is not None:
            settings = {"patch_size": vision.patch_size, "pooling_kernel_size": vision.pooling_kernel_size,
                        "max_soft_tokens": vision.extra.get("default_output_length", 280)}
        known = set(cls.__dataclass_fields__) - {"max_pixels"}
        proc = cls(**{k: v for k, v in (settings or {}).items() if k in known})
        if vision is not None and (proc.patch_size, proc.pooling_kernel_size) != (vision.patch_size,
                                                                                  vision.pooling_kernel_size):
            raise ValueError(f"image processor patch/pooling sizes {proc.patch_size}/{proc.pooling_kernel_size} "
                             f"differ from the vision tower's {vision.patch_size}/{vision.pooling_kernel_size}")
        return proc

    def save(self, path: str | Path) -> None:
        """Write `preprocessor_config.json` in the layout transformers reads."""
        data = {k: v for k, v in asdict(self).items() if k != "max_pixels"}
        data.update(resample=int(self.resample), image_processor_type="Gemma4ImageProcessor")
        (Path(path) / "preprocessor_config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    # ---- processing -------------------------------------------------------------------------------
    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The resized (height, width): multiples of k*p holding at most `max_patches` patches."""
        p, k = self.patch_size, self.pooling_kernel_size
        side = k * p
        factor = math.sqrt(self.max_patches * p * p / (height * width))
        h, w = math.floor(factor * height / side) * side, math.floor(factor * width / side) * side
        longest = (self.max_patches // k ** 2) * side
        if h == 0:       # very wide: one row of pooling blocks, width from the aspect ratio
            h, w = side, min(math.floor(width / height) * side, longest)
        elif w == 0:
            h, w = min(math.floor(height / width) * side, longest), side
        return h, w

    def __call__(self, images: list[Image.Image]) -> ProcessedImages:
        pixels, positions, counts = [], [], []
        for image in images:
            patches, pos = self.patchify(self.prepare(image))
            counts.append(len(patches) // self.pooling_kernel_size ** 2)
            pad = self.max_patches - len(patches)
            pixels.append(np.pad(patches, ((0, pad), (0, 0))))
            positions.append(np.pad(pos, ((0, pad), (0, 0)), constant_values=-1))
        dim = 3 * self.patch_size ** 2
        return ProcessedImages(torch.from_numpy(np.stack(pixels)) if pixels else torch.zeros(0, self.max_patches, dim),
                               torch.from_numpy(np.stack(positions)) if positions else
                               torch.zeros(0, self.max_patches, 2, dtype=torch.long), counts)

    def prepare(self, image: Image.Image) -> np.ndarray:
        """RGB, resize, rescale, normalise: (H', W', 3) float32."""
        if image.width * image.height > self.max_pixels:
            raise ValueError(f"image of {image.width}x{image.height} pixels is over the {self.max_pixels}-pixel limit")
        image = to_rgb(image)
        if self.do_resize:
            h, w = self.target_size(image.height, image.width)
            if (h, w) != (image.height, image.width):
                image = image.resize((w, h), resample=self.resample)
        array = np.asarray(image)
        if self.do_rescale:
            array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            mean, std = np.asarray(self.image_mean, np.float32), np.asarray(self.image_std, np.float32)
            array = ((array - mean) / std).astype(np.float32)
        return array

    def patchify(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) -> patches (n, p*p*3) row-major and their (x, y) positions (n, 2) int64."""
        p = self.patch_size
        rows, cols = array.shape[0] // p, array.shape[1] // p
        patches = array[:rows * p, :cols * p].reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4)
        grid_x, grid_y = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
        return patches.reshape(rows * cols, -1), np.stack([grid_x, grid_y], -1).reshape(-1, 2).astype(np.int64)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto opaque white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode untrusted PNG, JPEG or WebP bytes, checking the pixel count before decoding the pixels."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError("image data is not a recognised image (send PNG, JPEG or WebP)") from None
    except Image.DecompressionBombError as err:     # Pillow's own cap, far above ours
        raise ValueError(f"image is over the {max_pixels}-pixel limit: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"image data cannot be read: {err}") from None
    if image.format not in FORMATS:
        raise ValueError(f"unsupported image format {image.format}; send PNG, JPEG or WebP")
    if image.width * image.height > max_pixels:
        raise ValueError(f"image of {image.width}x{image.height} pixels is over the {max_pixels}-pixel limit")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"image data is corrupt or truncated: {err}") from None
    return image


def decode_data_url(url: str) -> bytes:
    """The bytes of a `data:image/png|jpeg|webp;base64,...` URL. Remote URLs are refused: images are
    never fetched."""
    if url.startswith(("http://", "https://")):
        raise ValueError("image URLs are not fetched (no outbound requests): send the image inline as a "
                         "data:image/png;base64,... URL")
    match = re.fullmatch(r"data:([^;,]*)((?:;[^;,]*)*);base64,(.*)", url, re.S)
    if match is None:
        raise ValueError("an image URL must be a base64 data URL: data:image/png;base64,...")
    if match.group(1) not in FORMATS.values():
        raise ValueError(f"unsupported image type {match.group(1)!r}; send image/png, image/jpeg or image/webp")
    try:
        return base64.b64decode(match.group(3), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the image data URL is not valid base64") from None


def _read_settings(path: Path) -> dict | None:
    for name in CONFIG_FILES:
        file = path / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from None
        if name == CONFIG_FILES[0]:
            data = data.get("image_processor") if isinstance(data, dict) else None
            if data is None:
                continue
        if not isinstance(data, dict):
            raise ValueError(f"{file} must hold a JSON object")
        return data
    return None
