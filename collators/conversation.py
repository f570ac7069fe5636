"""Render (images, prompt, response) into model inputs: chat template, image loading, pixel budgets.

The canonical message form, used everywhere after loading:
    [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "..."}]}, ...]
Strings and plain `{"role", "content": str}` messages are accepted and converted.
"""

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

IMAGE_PART = {"type": "image", "text": None}


@dataclass
class PixelBudgetArguments:
    """How large an image may be: every entry point that renders images takes these two flags."""

    min_pixels: int | None = field(default=None, metadata={"help": "Pixel budget per image (Qwen: qwen-vl-utils default)."})
    max_pixels: int | None = field(default=None, metadata={"help": "Pixel budget per image (Qwen: qwen-vl-utils default)."})


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def to_messages(value, role: str) -> list[dict]:
    """A prompt or response (string, or a list of chat messages) as canonical messages."""
    if isinstance(value, str):
        return [{"role": role, "content": [text_part(value)]}]
    messages = []
    for message in value:
        content = message["content"]
        if isinstance(content, str):
            parts = [text_part(content)]
        else:
            parts = [IMAGE_PART if part.get("type") == "image" or part.get("image") is not None else text_part(part.get("text") or "") for part in content]
        messages.append({"role": message["role"], "content": parts})
    return messages


def count_image_parts(messages: list[dict]) -> int:
    return sum(part["type"] == "image" for message in messages for part in message["content"])


def conversation(prompt: list[dict], response: list[dict], num_images: int) -> list[dict]:
    """Prompt + response; images without a placeholder go first in the first user turn (Qwen's order)."""
    messages = [dict(m, content=list(m["content"])) for m in prompt] + response
    missing = num_images - count_image_parts(messages)
    if missing > 0:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = [IMAGE_PART] * missing + first_user["content"]
    return messages


def open_image(image, base_dir: str | Path | None = None) -> Image.Image:
    """A PIL image from a path (relative to `base_dir`), raw bytes, a PIL image or a datasets Image dict."""
    if isinstance(image, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        image = image["bytes"] if image.get("bytes") else image["path"]
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image))
    path = Path(image)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    return Image.open(path)


class ConversationRenderer:
    """Turns (images, prompt, response) items into one right-padded batch for the reward model.

    Qwen processors get their images through qwen-vl-utils, which resizes to the pixel budget
    (`min_pixels` / `max_pixels`, its defaults when unset, as in the Skywork-VL-Reward model card).
    """

    def __init__(self, processing_class, min_pixels: int | None = None, max_pixels: int | None = None):
        self.processing_class = processing_class
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.image_processor = getattr(processing_class, "image_processor", None)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels

    def load_image(self, image) -> Image.Image:
        image = open_image(image)
        patch_size = getattr(self.image_processor, "patch_size", None)
        if patch_size is None or getattr(self.image_processor, "merge_size", None) is None:
            return image.convert("RGB")
        from qwen_vl_utils import fetch_image

        element = {"image": image}
        if self.min_pixels is not None:
            element["min_pixels"] = self.min_pixels
        if self.max_pixels is not None:
            element["max_pixels"] = self.max_pixels
        return fetch_image(element, image_patch_size=patch_size)

    def load_images(self, items: list[dict]) -> list[Image.Image]:
        """Every image of `items`, in order (the order of their placeholders in the batch)."""
        images = [self.load_image(image) for item in items for image in item["images"]]
        if images and self.image_processor is None:
            raise ValueError(f"{type(self.processing_class).__name__} cannot process images; this is a text-only model")
        return images

    def render_text(self, prompt, response, num_images: int) -> str:
        messages = conversation(to_messages(prompt, "user"), to_messages(response, "assistant"), num_images)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def __call__(self, items: list[dict]) -> dict:
        """items: dicts with `images` (list, may be empty), `prompt` and `response`."""
        texts = [self.render_text(item["prompt"], item["response"], len(item["images"])) for item in items]
        images = self.load_images(items)
        kwargs = dict(text=texts, padding=True, padding_side="right", add_special_tokens=False, return_tensors="pt")
        if images:
            kwargs["images"] = images
        batch = dict(self.processing_class(**kwargs))
        batch.pop("token_type_ids", None)
        return batch
