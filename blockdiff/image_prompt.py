"""Prompts with images: the image markers in the token ids and the pixels that travel with a request.

Contract:
- A prompt names each of its images with one image token (`image_token_id`, `<|image|>` as text),
  in image order. `expand_image_tokens` turns the i-th into begin-of-image, N_i image tokens,
  end-of-image, N_i from the image processor: what transformers' Gemma4Processor does to the text.
  The model later puts the image's soft tokens in place of those N_i tokens.
- `ImageInputs` holds a request's processed images and one content digest per image: caches that
  reuse computed prefixes key on these digests, never on the placeholder ids, which are the same
  for every image.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .image_processor import ImageProcessor


@dataclass(frozen=True)
class ImageTokens:
    image: int
    begin: int
    end: int


@dataclass
class ImageInputs:
    pixel_values: torch.Tensor          # (n, max_patches, 3 p^2) float32
    image_position_ids: torch.Tensor    # (n, max_patches, 2) int64
    num_soft_tokens: list[int]
    digests: list[str]                  # sha256 of each image's processed pixels and positions

    def __len__(self) -> int:
        return len(self.num_soft_tokens)

    def select(self, first: int) -> "ImageInputs":
        """The images from index `first` on (those after a reused prefix)."""
        return ImageInputs(self.pixel_values[first:], self.image_position_ids[first:], self.num_soft_tokens[first:],
                           self.digests[first:])


def process_images(images: list, processor: ImageProcessor, max_images: int) -> ImageInputs:
    """PIL images -> ImageInputs; more than `max_images` is a ValueError."""
    if len(images) > max_images:
        raise ValueError(f"{len(images)} images in one prompt; this server takes at most {max_images}")
    out = processor(images)
    digests = [hashlib.sha256(out.pixel_values[i].numpy().tobytes() + out.image_position_ids[i].numpy().tobytes())
               .hexdigest() for i in range(len(images))]
    return ImageInputs(out.pixel_values, out.image_position_ids, out.num_soft_tokens, digests)


def expand_image_tokens(ids: list[int], num_soft_tokens: list[int], tokens: ImageTokens) -> list[int]:
    """Replace the i-th image token of `ids` by [begin] + [image] * num_soft_tokens[i] + [end]."""
    found = ids.count(tokens.image)
    if found != len(num_soft_tokens):
        raise ValueError(f"the prompt has {found} image placeholder(s) but {len(num_soft_tokens)} image(s) "
                         "were given: put one image token in the prompt per image")
    out, images = [], iter(num_soft_tokens)
    for tok in ids:
        if tok == tokens.image:
            out += [tokens.begin] + [tokens.image] * next(images) + [tokens.end]
        else:
            out.append(tok)
    return out


def prefix_keys(ids: list[int], images: ImageInputs | None, image_token: int) -> list:
    """Per-token keys for prefix matching: the id, except that an image token is (id, image digest),
    so two prompts share a prefix only where their images are the same."""
    if not images:
        return list(ids)
    keys, run, index = [], False, -1
    for tok in ids:
        is_image = tok == image_token
        if is_image and not run:
            index += 1
        run = is_image
        keys.append((tok, images.digests[index]) if is_image else tok)
    return keys


def image_spans(ids: list[int], image_token: int) -> list[tuple[int, int]]:
    """[start, end) of each run of image tokens, in order."""
    spans, start = [], None
    for i, tok in enumerate(ids + [None]):
        if tok == image_token and start is None:
            start = i
        elif tok != image_token and start is not None:
            spans.append((start, i))
            start = None
    return spans
