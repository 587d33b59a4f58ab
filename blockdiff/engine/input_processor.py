"""InputProcessor: what a user passes as a prompt -> the token ids and processed images of one request.

Accepted prompts, in vLLM's shapes:
- text (encoded with BOS) or a list of token ids;
- `{"prompt": text}` or `{"prompt_token_ids": ids}`, optionally with `"multi_modal_data": {"image":
  image or [images]}`: the prompt holds one image placeholder (the tokenizer's `image_token`,
  `<|image|>`; in ids, `image_token_id`) per image, in order;
- chat messages (`chat()`) whose content parts may be images: `{"type": "image", "image": ...}` or
  `{"type": "image_url", "image_url": {"url": ...}}`; the chat template puts the placeholders.
An image is a PIL image, PNG/JPEG/WebP bytes, a `data:` URL, or a `file://` URL of a file under
`allowed_local_media_path` (refused when that is None); remote URLs are refused. Each placeholder becomes
begin-of-image, N image tokens, end-of-image (N from the image processor). Bad input raises
`ValueError` naming the problem: images for a text-only model, too many, undecodable data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..config import ModelConfig
from ..image_processor import ImageProcessor, decode_data_url, load_image
from ..image_prompt import ImageInputs, ImageTokens, expand_image_tokens, process_images
from ..tokenizer import Tokenizer

MAX_FILE_BYTES = 64 << 20


@dataclass
class PromptInputs:
    ids: list[int]
    text: str | None
    images: ImageInputs | None = None


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, config: ModelConfig, processor: ImageProcessor | None,
                 max_images: int = 4, allowed_local_media_path: str | Path | None = None):
        self.tokenizer, self.config, self.processor, self.max_images = tokenizer, config, processor, max_images
        self.tokens = ImageTokens(config.image_token_id, config.boi_token_id, config.eoi_token_id)
        self.local_dir = Path(allowed_local_media_path).resolve() if allowed_local_media_path else None

    @classmethod
    def for_model(cls, tokenizer: Tokenizer | None, config: ModelConfig, model_dir: str | Path | None,
                  max_images: int, allowed_local_media_path: str | Path | None = None) -> "InputProcessor":
        """The image processor comes from the checkpoint directory when the model has a vision tower."""
        vision = config.vision_config
        processor = ImageProcessor.from_dir(model_dir, vision) if vision else None
        return cls(tokenizer, config, processor, max_images, allowed_local_media_path)

    def process(self, prompt) -> PromptInputs:
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}
            if unknown or ("prompt" in prompt) == ("prompt_token_ids" in prompt):
                raise ValueError("a dict prompt needs exactly one of 'prompt' and 'prompt_token_ids', and "
                                 "optionally 'multi_modal_data'")
            data = prompt.get("multi_modal_data") or {}
            if not isinstance(data, dict) or set(data) - {"image"}:
                raise ValueError("multi_modal_data takes only 'image': an image or a list of images")
            images = data.get("image", [])
            images = images if isinstance(images, (list, tuple)) else [images]
            base = self._text_or_ids(prompt.get("prompt", prompt.get("prompt_token_ids")))
            return self._with_images(base, images)
        return self._with_images(self._text_or_ids(prompt), [])

    def chat(self, messages: list[dict], **template_kwargs) -> PromptInputs:
        """Render the chat template (`template_kwargs`, e.g. `tools` or `enable_thinking`, reach it as
        variables); image parts become placeholders and their images are taken in order."""
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: chat needs one")
        if not isinstance(messages, list):
            raise ValueError("messages must be a list of {'role', 'content'} dicts")
        images = [part for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                  for part in m["content"] if isinstance(part, dict) and part.get("type") in ("image", "image_url")]
        text = self.tokenizer.apply_chat_template(messages, **template_kwargs)
        return self._with_images(PromptInputs(self.tokenizer.encode(text), text), [_part_image(p) for p in images])

    def _text_or_ids(self, prompt) -> PromptInputs:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token ids")
            return PromptInputs(self.tokenizer.encode(prompt), prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError("a prompt is text, a list of token ids, or a dict with 'prompt' / 'prompt_token_ids'")
        return PromptInputs([int(t) for t in prompt], None)

    def _with_images(self, base: PromptInputs, images: list) -> PromptInputs:
        if not images:
            if self.processor is not None and self.tokens.image in base.ids:
                raise ValueError("the prompt has image placeholders but no images were given")
            return base
        if self.processor is None:
            raise ValueError("this model takes text only: its checkpoint has no vision tower")
        inputs = process_images([self._decode(im) for im in images], self.processor, self.max_images)
        return PromptInputs(expand_image_tokens(base.ids, inputs.num_soft_tokens, self.tokens), base.text, inputs)

    def _decode(self, image) -> Image.Image:
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, (bytes, bytearray)):
            return load_image(bytes(image), self.processor.max_pixels)
        if isinstance(image, str):
            data = self._local_file(image[len("file://"):]) if image.startswith("file://") else decode_data_url(image)
            return load_image(data, self.processor.max_pixels)
        raise ValueError(f"an image must be a PIL image, image bytes or a data URL, got {type(image).__name__}")


    def _local_file(self, path: str) -> bytes:
        if self.local_dir is None:
            raise ValueError("file:// image URLs are refused: no local media directory is allowed")
        file = Path(path).resolve()
        if not file.is_relative_to(self.local_dir) or not file.is_file():
            raise ValueError(f"file:// image URLs must name a file under {self.local_dir}")
        if file.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"image file {file.name} is over {MAX_FILE_BYTES} bytes")
        return file.read_bytes()


def _part_image(part: dict):
    if part.get("type") == "image":
        return part.get("image")
    url = part.get("image_url")
    return url.get("url") if isinstance(url, dict) else url
