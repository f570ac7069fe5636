"""Render (images, videos, prompt, response) into model inputs: chat template, image and video loading, budgets.

The canonical message form, used everywhere after loading:
    [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "..."}]}, ...]
Strings and plain `{"role", "content": str}` messages are accepted and converted. Any turn (responses included) may
hold image and video parts; a part may carry its media inline, in qwen-vl-utils' form (`{"type": "image", "image":
path or bytes}`, `{"type": "video", "video": path or [frames]}`), or be a bare placeholder that takes the next of the
row's `images` / `videos` (see `place_media`).

A video is a video file (decoded with PyAV, sampled at the video budget's fps) or a list of frames (images, taken as
sampled at that fps), as in qwen-vl-utils. The video budget (fps, frames, pixels per frame) lives in the processor's
video processor, saved with the checkpoint as the pixel budget is.
"""

import copy
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

IMAGE_PART = {"type": "image", "text": None}
VIDEO_PART = {"type": "video", "text": None}
MEDIA_PARTS = {"image": IMAGE_PART, "video": VIDEO_PART}


@dataclass
class PixelBudgetArguments:
    """How large an image may be: every entry point that renders images takes these two flags."""

    min_pixels: int | None = field(default=None, metadata={"help": "Pixel budget per image (Qwen: qwen-vl-utils default)."})
    max_pixels: int | None = field(default=None, metadata={"help": "Pixel budget per image (Qwen: qwen-vl-utils default)."})


@dataclass
class VideoBudgetArguments:
    """How videos are sampled and sized: declared once for training, saved with the checkpoint."""

    video_fps: float | None = field(default=None, metadata={"help": "Frames per second sampled from a video file; a "
                                                            "frame list is taken as sampled at this rate (Qwen: 2)."})
    video_max_frames: int | None = field(default=None, metadata={"help": "Most frames per video (Qwen: 768)."})
    video_min_pixels: int | None = field(default=None, metadata={"help": "Pixel budget per video frame."})
    video_max_pixels: int | None = field(default=None, metadata={"help": "Pixel budget per video frame."})


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def part_kind(part: dict) -> str:
    """'image', 'video' or 'text'."""
    if part.get("type") in ("image", "image_url") or part.get("image") is not None:
        return "image"
    if part.get("type") == "video" or part.get("video") is not None:
        return "video"
    return "text"


def canonical_messages(value, role: str) -> tuple[list[dict], list[tuple[str, object]]]:
    """A prompt or response (string, or chat messages) as canonical messages, and (kind, inline media or None) for
    each of its image and video placeholders, in order."""
    if isinstance(value, str):
        return [{"role": role, "content": [text_part(value)]}], []
    messages, slots = [], []
    for message in value:
        content = message["content"]
        if isinstance(content, str):
            parts = [text_part(content)]
        else:
            parts = []
            for part in content:
                kind = part_kind(part)
                if kind == "text":
                    parts.append(text_part(part.get("text") or ""))
                else:
                    parts.append(MEDIA_PARTS[kind])
                    slots.append((kind, part.get(kind)))
        messages.append({"role": message["role"], "content": parts})
    return messages, slots


def to_messages(value, role: str) -> list[dict]:
    """A prompt or response (string, or a list of chat messages) as canonical messages."""
    return canonical_messages(value, role)[0]


def count_image_parts(messages: list[dict]) -> int:
    return sum(part["type"] == "image" for message in messages for part in message["content"])


class PlacedMedia(NamedTuple):
    """A conversation with bare placeholders, its images and videos in placeholder order, and how many of each sit
    in the prompt (the first ones)."""

    prompt: list[dict]
    response: list[dict]
    images: list
    videos: list
    prompt_images: int
    prompt_videos: int


def place_media(prompt, response, images=(), videos=()) -> PlacedMedia:
    """Pairs every placeholder with its media. Inline media stay where they are; bare placeholders take `images` /
    `videos` in order, and those left over get placeholders first in the first user turn (Qwen's order)."""
    prompt, prompt_slots = canonical_messages(prompt, "user")
    response, response_slots = canonical_messages(response, "assistant")
    given = {"image": list(images), "video": list(videos)}
    bare = Counter(kind for kind, media in prompt_slots + response_slots if media is None)
    missing = {kind: len(given[kind]) - bare[kind] for kind in given}
    for kind, n in missing.items():
        if n < 0:
            raise ValueError(f"{bare[kind]} {kind} placeholders without their own {kind} but {len(given[kind])} "
                             f"{kind}s given")
    if missing["image"] or missing["video"]:
        added = [IMAGE_PART] * missing["image"] + [VIDEO_PART] * missing["video"]
        user = next((i for i, m in enumerate(prompt) if m["role"] == "user"), None)
        if user is None:
            raise ValueError("the prompt has no user turn to place its images and videos in")
        prompt[user] = dict(prompt[user], content=added + prompt[user]["content"])
        # the prepended placeholders come first in the text, so they take the first of the given media
        before = sum(1 for m in prompt[:user] for part in m["content"] if part["type"] != "text")
        prompt_slots[before:before] = [("image", None)] * missing["image"] + [("video", None)] * missing["video"]
    placed, left = {"image": [], "video": []}, {kind: iter(media) for kind, media in given.items()}
    for kind, media in prompt_slots + response_slots:
        placed[kind].append(next(left[kind]) if media is None else media)
    counts = Counter(kind for kind, _ in prompt_slots)
    return PlacedMedia(prompt, response, placed["image"], placed["video"], counts["image"], counts["video"])


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


VIDEO_BUDGET = {"fps": "video_fps", "max_frames": "video_max_frames",
                "shortest_edge": "video_min_pixels", "longest_edge": "video_max_pixels"}


def video_budget(processing_class) -> dict:
    """{fps, min_frames, max_frames, min_pixels, max_pixels} of the processor's video processor ({} without one);
    qwen-vl-utils' defaults where it sets none."""
    video_processor = getattr(processing_class, "video_processor", None)
    if video_processor is None:
        return {}
    size = getattr(video_processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    from qwen_vl_utils.vision_process import FPS, FPS_MAX_FRAMES, FPS_MIN_FRAMES

    return {"fps": getattr(video_processor, "fps", None) or FPS,
            "min_frames": getattr(video_processor, "min_frames", None) or FPS_MIN_FRAMES,
            "max_frames": getattr(video_processor, "max_frames", None) or FPS_MAX_FRAMES,
            "min_pixels": get("shortest_edge"), "max_pixels": get("longest_edge")}


def set_video_budget(processing_class, budget: VideoBudgetArguments) -> None:
    """Writes the video budget into the processor's video processor, so `save_pretrained` stores it with the
    checkpoint and every later load samples and sizes videos as training did. Unset values keep the processor's."""
    video_processor = getattr(processing_class, "video_processor", None)
    values = {key: getattr(budget, name) for key, name in VIDEO_BUDGET.items() if getattr(budget, name) is not None}
    if video_processor is None or not values:
        return
    for key in ("fps", "max_frames"):
        if key in values:
            setattr(video_processor, key, values.pop(key))
    if values:
        size = video_processor.size
        fields = {k: v for k, v in (size.items() if isinstance(size, dict) else vars(size).items()) if v is not None}
        merged = {**fields, **values}
        if merged.get("shortest_edge", 0) > merged.get("longest_edge", float("inf")):
            raise ValueError(f"video_min_pixels {merged['shortest_edge']} is larger than video_max_pixels "
                             f"{merged['longest_edge']}")
        video_processor.size = type(size)(**merged)


def video_source(video):
    """A video as given: a datasets row's {"path", "frames"} becomes its frames, or its path when it has none."""
    if isinstance(video, dict):
        return video.get("frames") or video.get("path")
    return video


def read_video(source, fps: float, min_frames: int, max_frames: int, before_decoding=None) -> tuple[list, float]:
    """Frames of a video file (a path or a file object) sampled as qwen-vl-utils samples them (evenly, `fps` per
    second, within the frame budget), and the rate they were sampled at. `before_decoding(width, height, frames)`, given,
    sees the header's frame size and the number of frames to be decoded first (and may refuse them). Decoding stops at
    the last frame needed."""
    import av
    from qwen_vl_utils.vision_process import smart_nframes

    name = source if isinstance(source, (str, Path)) else "the video"
    with av.open(source, "r") as container:
        if not container.streams.video:
            raise ValueError(f"{name}: no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or 0)
        total = stream.frames or int(float((stream.duration or 0) * stream.time_base) * rate)
        if total <= 0 or rate <= 0:
            raise ValueError(f"{name}: the video declares no frame count or frame rate")
        count = smart_nframes({"fps": fps, "min_frames": min_frames, "max_frames": max_frames}, total_frames=total,
                              video_fps=rate)
        if before_decoding is not None:
            before_decoding(stream.codec_context.width, stream.codec_context.height, count)
        wanted = Counter(torch.linspace(0, total - 1, count).round().long().tolist())  # frame -> times taken
        last, frames = max(wanted), []
        for number, frame in enumerate(container.decode(stream)):
            if number in wanted:  # only the sampled frames become images
                frames += [frame.to_image()] * wanted[number]
            if number >= last:
                break
    if len(frames) < count:
        raise ValueError(f"{name}: the video has fewer frames than its header declares ({total})")
    return frames, count / total * rate


def frames_within_image_limit(width: int, height: int, count: int) -> None:
    """A video's frames are held to an image's decompression-bomb limit (PIL's `Image.MAX_IMAGE_PIXELS`), read from
    the video's header before any frame is decoded."""
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"video frames of {width}x{height} pixels exceed the image limit of {Image.MAX_IMAGE_PIXELS} "
                         "pixels (PIL.Image.MAX_IMAGE_PIXELS)")


class ConversationRenderer:
    """Turns (images, videos, prompt, response) items into one right-padded batch for the reward model.

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
        self.video_processor = getattr(processing_class, "video_processor", None)
        self.video_budget = video_budget(processing_class)

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

    def load_video(self, video) -> tuple[torch.Tensor, float]:
        """A video file, a list of frames or a datasets row's {"path", "frames"} -> ([T, C, H, W] frames sized by
        qwen-vl-utils within the video budget, the rate they were sampled at)."""
        if self.video_processor is None:
            raise ValueError(f"{type(self.processing_class).__name__} cannot process videos")
        budget = self.video_budget
        if isinstance(video, tuple) and isinstance(video[0], torch.Tensor):  # loaded already
            return video
        video = video_source(video)
        if isinstance(video, (str, Path)):
            return self.load_frames(*read_video(video, budget["fps"], budget["min_frames"], budget["max_frames"],
                                                frames_within_image_limit))
        if isinstance(video, (list, tuple)) and video:
            frames = list(video)
            if len(frames) > budget["max_frames"]:  # evenly, as a video file is sampled; before any frame is opened
                keep = torch.linspace(0, len(frames) - 1, budget["max_frames"] // 2 * 2).round().long().tolist()
                frames = [frames[i] for i in keep]
            return self.load_frames([open_image(frame) for frame in frames], budget["fps"])
        raise ValueError(f"a video is a file path or a non-empty list of frames, got {type(video).__name__}")

    def load_frames(self, frames: list[Image.Image], fps: float) -> tuple[torch.Tensor, float]:
        """Sampled frames -> ([T, C, H, W] sized by qwen-vl-utils within the video budget, fps)."""
        from qwen_vl_utils import fetch_video

        element = {"video": [frame.convert("RGB") for frame in frames], "sample_fps": fps}
        element.update({key: self.video_budget[key] for key in ("min_pixels", "max_pixels")
                        if self.video_budget[key] is not None})
        return fetch_video(element, image_patch_size=getattr(self.video_processor, "patch_size", 14)), fps

    def render_text(self, prompt, response, num_images: int) -> str:
        messages = conversation(to_messages(prompt, "user"), to_messages(response, "assistant"), num_images)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def render(self, item: dict) -> tuple[str, PlacedMedia]:
        """The chat-templated text of an item and its media in placeholder order (see `place_media`)."""
        placed = place_media(item["prompt"], item["response"], item.get("images", ()), item.get("videos", ()))
        text = self.tokenizer.apply_chat_template(placed.prompt + placed.response, tokenize=False,
                                                  add_generation_prompt=False)
        return text, placed

    def vision_inputs(self, images: list, videos: list) -> dict:
        """The processor's keyword arguments for these images and videos (loaded and sized here)."""
        kwargs = {}
        if images:
            kwargs["images"] = self.load_images([{"images": images}])
        if videos:
            loaded = [self.load_video(video) for video in videos]
            kwargs["videos"] = [frames for frames, _ in loaded]
            # frames already sampled: the rate says how far apart they are (Qwen2.5-VL's temporal positions)
            kwargs["video_metadata"] = [{"fps": fps, "total_num_frames": len(frames),
                                         "frames_indices": list(range(len(frames)))} for frames, fps in loaded]
            kwargs["do_sample_frames"] = False
            if hasattr(self.video_processor, "cap_pixels_per_frame"):
                # frames as load_video sized them: qwen-vl-utils already held the video to its total pixel budget
                # (transformers' own cap, which warns when not told)
                kwargs["cap_pixels_per_frame"] = False
        return kwargs

    def __call__(self, items: list[dict]) -> dict:
        """items: dicts with `images` and optionally `videos` (lists, may be empty), `prompt` and `response`."""
        rendered = [self.render(item) for item in items]
        kwargs = dict(text=[text for text, _ in rendered], padding=True, padding_side="right",
                      add_special_tokens=False, return_tensors="pt")
        kwargs.update(self.vision_inputs([image for _, placed in rendered for image in placed.images],
                                          [video for _, placed in rendered for video in placed.videos]))
        batch = dict(self.processing_class(**kwargs))
        batch.pop("token_type_ids", None)
        return batch
