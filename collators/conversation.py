"""Render (images, prompt, response) into model inputs: chat template, image loading, pixel budgets.

The canonical message form, used everywhere after loading:
    [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "..."}]}, ...]
Strings and plain `{"role", "content": str}` messages are accepted and converted.
"""

import copy
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


def pixel_budget(processing_class) -> tuple[int | None, int | None]:
    """(min_pixels, max_pixels) the processor resizes images to; (None, None) for processors without one."""
    size = getattr(getattr(processing_class, "image_processor", None), "size", None)
    if size is None:
        return None, None
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    return get("shortest_edge"), get("longest_edge")


def set_pixel_budget(processing_class, min_pixels: int | None, max_pixels: int | None) -> None:
    """Writes the budget into the processor's image processor, so `save_pretrained` stores it with the checkpoint
    and every later load resizes as training did. Unset values keep the processor's own."""
    image_processor = getattr(processing_class, "image_processor", None)
    if image_processor is None or (min_pixels is None and max_pixels is None):
        return
    current_min, current_max = pixel_budget(processing_class)
    if current_min is None and current_max is None:
        raise ValueError(f"{type(image_processor).__name__} has no pixel budget (size.shortest_edge / longest_edge)")
    budget = {"shortest_edge": min_pixels or current_min, "longest_edge": max_pixels or current_max}
    if budget["shortest_edge"] > budget["longest_edge"]:
        raise ValueError(f"min_pixels {budget['shortest_edge']} is larger than max_pixels {budget['longest_edge']}")
    size = image_processor.size
    fields = {k: v for k, v in (size.items() if isinstance(size, dict) else vars(size).items()) if v is not None}
    image_processor.size = type(size)(**{**fields, **budget})


class ConversationRenderer:
    """Turns (images, prompt, response) items into one right-padded batch for the reward model.

    The pixel budget is the processor's own (saved with the checkpoint); `min_pixels` / `max_pixels` override it
    on a copy of the processor. Qwen processors get their images through qwen-vl-utils with that same budget, so
    an image is resized once (qwen-vl-utils' result is already what the processor would make of it).
    """

    def __init__(self, processing_class, min_pixels: int | None = None, max_pixels: int | None = None):
        has_images = getattr(processing_class, "image_processor", None) is not None
        if has_images and (min_pixels is not None or max_pixels is not None):
            processing_class = copy.copy(processing_class)  # the caller's processor keeps its budget
            processing_class.image_processor = copy.deepcopy(processing_class.image_processor)
            set_pixel_budget(processing_class, min_pixels, max_pixels)
        self.processing_class = processing_class
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.image_processor = getattr(processing_class, "image_processor", None)
        self.min_pixels, self.max_pixels = pixel_budget(processing_class)

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
