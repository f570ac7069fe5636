"""An HTTP reward server for RL and data building: any reward model directory or hub id, images included.

    python recipes/serve/server.py --model_name_or_path outputs/demo/stage2 --port 8000
    curl -s localhost:8000/score -d '{"rows": [{"prompt": "What colour?", "response": "red", "images": ["data:image/png;base64,..."]}]}'

Endpoints (JSON in, JSON out; errors are 4xx `{"error": {"message", "row", "field"}}`):
  POST /get_reward  OpenRLHF's remote reward model: {"query": [str], "prompts": [str], "labels": [...]} ->
                    {"rewards": [...], "scores": [...], "extra_logs": {...}}. A query in ChatML (Qwen's chat template)
                    is read back into messages, its <|vision_start|>...<|vision_end|> spans as image placeholders; a
                    plain query is split by its prompt. Only the end tokens the chat template adds are cut from the
                    response, so a query gets the reward /score gives the same conversation. Images: an "images" list
                    per query, or, for OpenRLHF's own trainer (which never sends images), the server started with
                    --prompt_images FILE (OpenRLHF's prompt dataset) finds each query's images by its prompt's turns.
  POST /score       {"rows": [...]}: rows in the preference schema ({"images", "videos", "prompt", "response"}) or OpenAI
                    chat ({"messages": [..., {"role": "assistant", ...}]}) -> {"rewards": [...]}. Any turn, the
                    assistant's included, may hold `image_url` and `video_url` parts (or qwen-vl-utils' `image` /
                    `video` parts, a video as a file or a list of frames); bare placeholders take the row's `images` /
                    `videos` in order.
  GET  /health, GET /metrics (Prometheus, through prometheus_client).
Images and videos are data URLs (`data:image/png;base64,...`, `data:video/mp4;base64,...`); file paths only under
--allowed_image_root (none by default); remote URLs are never fetched. A video is sampled by the checkpoint's video
budget, and each sampled frame meets the limits of an image: its size (from the header, before decoding) and the
request's pixel budget; its tokens count toward the row's.

Concurrent requests are batched (up to --max_batch_rows rows / --max_batch_tokens tokens, waiting at most
--batch_wait_ms for more) and each batch goes to `RewardScorer.score` whole, which scores rows sharing a prompt and
images in one forward where the model supports it.

Every request is bounded before the expensive work (the README's server section lists each limit and its default):
the body by Content-Length, a read deadline and a count of its JSON values, then parsed in a worker thread; rows per
request, and rows queued (503 when full); each image by the pixel size its header declares, before it is decoded
(Pillow's decompression-bomb limit is set from --max_image_pixels, which also covers an image nested in a container
such as ICO), the request's images by a pixel budget, and each image resized to the model's pixel budget as soon as
it is decoded; each row by its tokens (text and images). Connections must send their headers in --header_timeout_s,
and uvicorn caps connections (--limit_concurrency). A request whose client hangs up leaves the queue.
"""

import asyncio
import base64
import binascii
import concurrent.futures
import copy
import functools
import hmac
import io
import json
import logging
import os
import queue
import re
import stat
import sys
import threading
import time
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import NamedTuple
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

import h11
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from uvicorn.protocols.http.h11_impl import H11Protocol

from collators import PixelBudgetArguments
from collators.conversation import count_image_parts, place_media, read_video, to_messages
from heads import RewardScorer
from recipes.serve.rl_rewards import marked_content

logger = logging.getLogger("reward_server")



@dataclass
class ServerArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "Reward model directory or hub id."})
    host: str = field(default="127.0.0.1", metadata={"help": "Interface to bind; 0.0.0.0 exposes the server."})
    port: int = field(default=8000)
    api_key: str | None = field(default=None, metadata={"help": "If set, requests need `Authorization: Bearer KEY`."})
    allowed_image_root: str | None = field(default=None, metadata={
        "help": "Directory whose files requests may name as images or videos; paths are refused without it."})
    max_body_bytes: int = field(default=64 * 2**20, metadata={"help": "Largest request body (413 beyond)."})
    max_body_values: int = field(default=2**20, metadata={
        "help": "`,` and `:` bytes in a body, a bound on its JSON values (413 beyond): parsing holds Python's GIL, so "
                "this bounds how long a body can stall the server."})
    max_rows_per_request: int = field(default=1024)
    max_images_per_row: int = field(default=8)
    max_videos_per_row: int = field(default=2)
    max_image_pixels: int = field(
        default=4096 * 4096, metadata={"help": "Largest image (width x height), checked before it is decoded (422)."})
    max_request_pixels: int = field(
        default=128 * 2**20, metadata={"help": "Pixels of all the images of one request, before resizing (413)."})
    max_row_tokens: int | None = field(default=None, metadata={
        "help": "Tokens of one row, images included (413). Default: the checkpoint tokenizer's model_max_length (the "
                "stage scripts save the training max_length there), else the model's max_position_embeddings."})
    max_queued_rows: int = field(
        default=4096, metadata={"help": "Rows accepted and not yet answered, across requests (503 beyond)."})
    request_timeout_s: float = field(default=120.0, metadata={"help": "A request still waiting after this gets 504."})
    header_timeout_s: float = field(
        default=10.0, metadata={"help": "A connection that has not sent a request's headers after this is closed."})
    body_timeout_s: float = field(default=60.0, metadata={"help": "A body not received after this gets 408."})
    limit_concurrency: int = field(
        default=256, metadata={"help": "uvicorn's limit: connections (or requests) beyond it are answered 503."})
    timeout_keep_alive: int = field(default=5, metadata={"help": "uvicorn's: an idle kept-alive connection is closed."})
    timeout_graceful_shutdown: int = field(
        default=3, metadata={"help": "uvicorn's: on SIGTERM, requests in flight get this long, then the server exits."})
    max_batch_rows: int = field(default=64, metadata={"help": "Rows handed to the scorer at once."})
    max_batch_tokens: int = field(default=65536, metadata={"help": "Estimated tokens handed to the scorer at once."})
    batch_wait_ms: float = field(default=5.0, metadata={"help": "How long a batch waits for more requests."})
    batch_size: int = field(default=8, metadata={"help": "Rows per forward pass inside the scorer."})
    dtype: str | None = field(default=None, metadata={"help": "bfloat16 on GPU, float32 on CPU by default."})
    attn_implementation: str | None = field(default=None)
    prompt_images: str | None = field(default=None, metadata={
        "help": "The RL prompt dataset (.jsonl/.json/.parquet, OpenRLHF's --data.prompt_dataset): /get_reward queries "
                "that come without images get the images of the row with the same prompt turns."})
    prompt_input_key: str = field(default="input", metadata={"help": "Prompt column of --prompt_images (--data.input_key)."})
    prompt_image_key: str = field(default="images", metadata={"help": "Image column of --prompt_images (--data.image_key)."})


class RowError(Exception):
    """A request the server refuses: HTTP status, the row (index) and the field at fault."""

    def __init__(self, status: int, message: str, row: int | None = None, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.row, self.field = status, message, row, field

    def response(self) -> JSONResponse:
        # A body refused before it was read in full leaves the connection unusable: close it.
        unread = self.field == "body" and self.status in (408, 413)
        return JSONResponse({"error": {"message": self.message, "row": self.row, "field": self.field}}, self.status,
                            headers={"connection": "close"} if unread else None)


# ---------------------------------------------------------------- input validation


# Formats Pillow may open: the usual image files. Others (EPS runs Ghostscript, for one) are refused.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO")


class ImageDecoder:
    """Data URLs, and paths under an allowed root; every image checked against the pixel limits before it is
    decoded, and resized to the model's pixel budget (`resize`) as soon as it is."""

    def __init__(self, allowed_root: str | None, max_pixels: int, resize):
        self.allowed_root = Path(allowed_root).resolve() if allowed_root else None
        if self.allowed_root is not None and not Path("/proc/self/fd").is_dir():
            raise SystemExit("server: --allowed_image_root needs /proc/self/fd (Linux) to check the opened file")
        self.max_pixels, self.resize = max_pixels, resize

    def __call__(self, reference, row: int, field: str, pixels_left: int) -> tuple[Image.Image, int]:
        """(the image resized for the model, the pixels it had), or a RowError; at most `pixels_left` pixels."""
        if not isinstance(reference, str):
            raise RowError(422, f"an image must be a data URL or a path string, got {type(reference).__name__}", row, field)
        if reference.startswith(("http://", "https://")):
            raise RowError(422, "remote image URLs are not fetched; send the image as a data URL", row, field)
        source = self._data(reference, row, field) if reference.startswith("data:") else self._file(reference, row, field)
        over_budget = RowError(413, "the request's images exceed its budget of pixels (--max_request_pixels)", row, field)
        with source:
            try:
                # Pillow refuses an image past its limit (set from --max_image_pixels by the app) from the header,
                # before decoding it, and an image nested in a container (an ICO whose header lies) before decoding it.
                image = Image.open(source, formats=IMAGE_FORMATS)
                if image.width * image.height > pixels_left:
                    raise over_budget
                image.load()
            except RowError:
                raise
            except Image.DecompressionBombError:
                raise RowError(422, f"the image has more than {self.max_pixels} pixels (--max_image_pixels); it was "
                                    "refused before decoding", row, field) from None
            except Exception as error:  # PIL raises many types for corrupt data
                raise RowError(422, f"the image cannot be decoded ({type(error).__name__})", row, field) from None
        pixels = image.width * image.height
        if pixels > pixels_left:  # an ICO's frame may be larger than its header said
            raise over_budget
        try:
            return self.resize(image), pixels
        except ValueError as error:  # e.g. an aspect ratio the model's resizing refuses
            raise RowError(422, f"the image cannot be resized for the model ({error})", row, field) from None

    @staticmethod
    def _data(reference: str, row: int, field: str) -> io.BytesIO:
        header, _, payload = reference.partition(",")
        if not header.endswith(";base64"):
            raise RowError(422, "a data URL image must be base64 (data:image/png;base64,...)", row, field)
        try:
            return io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise RowError(422, "the data URL is not valid base64", row, field) from None

    def _file(self, reference: str, row: int, field: str):
        """The file opened once; what is checked is the opened file (its real path and type), so a link swapped in
        between a check and the open cannot make the server read outside the root."""
        if self.allowed_root is None:
            raise RowError(422, "image paths are refused (the server has no --allowed_image_root); send a data URL", row, field)
        if "\0" in reference:
            raise RowError(422, "an image path cannot contain a NUL byte", row, field)
        path = self.allowed_root / reference.removeprefix("file://")  # an absolute path stays as it is
        outside = RowError(422, "the image path is not a file under the allowed root", row, field)
        if not Path(os.path.realpath(path)).is_relative_to(self.allowed_root):
            raise outside  # refused before opening: opening some files (devices, FIFOs) has effects
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            raise RowError(422, f"no readable image file at {reference}", row, field) from None
        file = os.fdopen(fd, "rb")
        if not (stat.S_ISREG(os.fstat(fd).st_mode)
                and Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(self.allowed_root)):
            file.close()
            raise outside
        return file


class VideoDecoder:
    """Videos as data URLs, paths (under the allowed root) or lists of frames; every sampled frame meets the limits of an
    image before it is decoded, and the frames are sized by the model's video budget (`renderer`)."""

    def __init__(self, images: ImageDecoder, renderer):
        self.images, self.renderer = images, renderer
        # frames are sized once, by the video budget, as the scorer sizes a video's frames
        self.frames = ImageDecoder(images.allowed_root, images.max_pixels, lambda image: image)

    def __call__(self, reference, row: int, field: str, pixels_left: int) -> tuple[tuple, int]:
        """((frames sized for the model, fps), the pixels its sampled frames had), or a RowError."""
        budget = self.renderer.video_budget
        if isinstance(reference, list):
            if not reference:
                raise RowError(422, "a video's frame list is empty", row, field)
            if len(reference) > budget["max_frames"]:
                raise RowError(422, f"{len(reference)} frames exceed the model's video budget of {budget['max_frames']}",
                               row, field)
            frames, pixels = [], 0
            for number, frame in enumerate(reference):
                image, used = self.frames(frame, row, f"{field}[{number}]", pixels_left - pixels)
                frames.append(image)
                pixels += used
            return self._sized(frames, budget["fps"], row, field), pixels
        if not isinstance(reference, str):
            raise RowError(422, f"a video is a data URL, a path or a list of frames, got {type(reference).__name__}",
                           row, field)
        if reference.startswith(("http://", "https://")):
            raise RowError(422, "remote video URLs are not fetched; send the video as a data URL", row, field)
        source = (ImageDecoder._data(reference, row, field) if reference.startswith("data:")
                  else self.images._file(reference, row, field))
        pixels = 0

        def within_limits(width: int, height: int, count: int):
            nonlocal pixels
            if width * height > self.images.max_pixels:
                raise RowError(422, f"video frames of {width}x{height} pixels exceed the limit of "
                                    f"{self.images.max_pixels} (--max_image_pixels)", row, field)
            pixels = width * height * count
            if pixels > pixels_left:
                raise RowError(413, f"the video's {count} sampled frames exceed the request's budget of pixels "
                                    "(--max_request_pixels)", row, field)

        with source:
            try:
                frames, fps = read_video(source, budget["fps"], budget["min_frames"], budget["max_frames"], within_limits)
            except RowError:
                raise
            except Exception as error:  # PyAV and qwen-vl-utils raise many types for corrupt or unusable data
                raise RowError(422, f"the video cannot be decoded or sampled ({type(error).__name__})", row, field) from None
        return self._sized(frames, fps, row, field), pixels

    def _sized(self, frames: list, fps: float, row: int, field: str) -> tuple:
        try:
            return self.renderer.load_frames(frames, fps)
        except ValueError as error:  # e.g. an aspect ratio the model's resizing refuses
            raise RowError(422, f"the video cannot be resized for the model ({error})", row, field) from None


def chat_messages(messages, row: int, field: str) -> list[dict]:
    """OpenAI-style chat messages -> canonical messages whose image and video parts hold their references inline
    (`{"type": "image", "image": ref}`, `{"type": "video", "video": ref}`; bare when the part names none)."""
    if not isinstance(messages, list) or not messages:
        raise RowError(422, "expected a non-empty list of chat messages", row, field)
    converted = []
    for m, message in enumerate(messages):
        where = f"{field}[{m}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise RowError(422, "a message is an object with `role` and `content`", row, where)
        content = message["content"]
        if isinstance(content, str):
            converted.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise RowError(422, "`content` is a string or a list of parts", row, where + ".content")
        parts = []
        for p, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "video_url"):
                url = part.get(kind)
                parts.append({"type": kind.removesuffix("_url"), kind.removesuffix("_url"):
                              url.get("url") if isinstance(url, dict) else url})
            elif kind in ("image", "video"):
                parts.append({"type": kind, kind: part[kind]} if part.get(kind) is not None else {"type": kind})
            else:
                raise RowError(422, "a part is {type: text, text}, {type: image_url, image_url: {url}} or "
                                    "{type: video_url, video_url: {url}}", row, f"{where}.content[{p}]")
        converted.append({"role": message["role"], "content": parts})
    return converted


def score_row(row, index: int) -> tuple[dict, list, list]:
    """A /score row -> (item whose media parts hold references, the row's image references, its video references)."""
    if not isinstance(row, dict):
        raise RowError(422, "a row is an object", index, "rows")
    if "messages" in row:
        messages = chat_messages(row["messages"], index, "messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise RowError(422, "the last message is the assistant's response, after at least one prompt message", index, "messages")
        item = {"prompt": messages[:-1], "response": messages[-1:]}
    else:
        item = {}
        for key in ("prompt", "response"):
            if key not in row:
                raise RowError(422, f"missing `{key}` (or give `messages`)", index, key)
            value = row[key]
            if isinstance(value, list):
                value = chat_messages(value, index, key)
            elif not isinstance(value, str):
                raise RowError(422, f"`{key}` is a string or chat messages, got {type(value).__name__}", index, key)
            item[key] = value
    media = []
    for key in ("images", "videos"):
        value = row.get(key, [])
        if not isinstance(value, list):
            raise RowError(422, f"`{key}` is a list", index, key)
        media.append(value)
    return item, *media


CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>\s*|$)", re.DOTALL)
VISION_SPAN = re.compile(r"<\|vision_start\|>(?:<\|image_pad\|>)*<\|vision_end\|>")
# What the chat template (and the policy's stop token) put after a response: nothing else is cut, whitespace included.
END_TOKENS = re.compile(r"(?:(?:<\|im_end\|>|<\|endoftext\|>)\n?)+$")


def chatml_messages(text: str) -> list[dict]:
    """Qwen's ChatML text back into messages; vision spans become image placeholders."""
    messages = []
    for role, body in CHATML_TURN.findall(text):
        pieces = VISION_SPAN.split(body)
        parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
        for piece in pieces[1:]:
            parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": parts})
    return messages


def reward_query(query, prompt, index: int) -> dict:
    """An OpenRLHF query (prompt + response, as one string) -> an item without images."""
    if not isinstance(query, str):
        raise RowError(422, f"a query is a string, got {type(query).__name__}", index, "query")
    if prompt is not None and not isinstance(prompt, str):
        raise RowError(422, f"a prompt is a string, got {type(prompt).__name__}", index, "prompts")
    if "<|im_start|>" in query:
        messages = chatml_messages(query)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise RowError(422, "a ChatML query ends with an assistant turn after the prompt", index, "query")
        last = messages[-1]["content"]
        if last and last[-1]["type"] == "text":
            last[-1]["text"] = END_TOKENS.sub("", last[-1]["text"])
        return {"prompt": messages[:-1], "response": messages[-1:]}
    if prompt is None:
        raise RowError(422, "a plain-text query is split into prompt and response by its `prompts` entry", index, "prompts")
    if not query.startswith(prompt):
        raise RowError(422, "the query does not start with its prompt", index, "prompts")
    return {"prompt": prompt, "response": END_TOKENS.sub("", query[len(prompt):])}


def marked_messages(value) -> list[dict]:
    """An RL prompt, a string or chat messages with `<image>` marking each image's place in text, as canonical
    messages (OpenRLHF's and verl's datasets mark images so)."""
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
    return [{"role": m["role"], "content": marked_content(m["content"]) if isinstance(m["content"], str)
             else to_messages([m], m["role"])[0]["content"]} for m in messages]


def prompt_key(messages: list[dict]) -> str:
    """What identifies an RL prompt across chat templates: its turns' roles, texts and image places (system turns,
    which templates add by default, left out; whitespace around images ignored, as OpenRLHF strips it)."""
    turns = []
    for message in messages:
        if message["role"] != "system":
            pieces = "".join("\0" if part["type"] == "image" else part["text"] for part in message["content"]).split("\0")
            turns.append([message["role"], [piece.strip() for piece in pieces]])
    return json.dumps(turns, ensure_ascii=False)


class PromptImages:
    """The images of an RL prompt dataset, by prompt: OpenRLHF's trainer sends /get_reward the prompt and response
    but never their images, so the server reads them from the file the trainer reads its prompts from.

    A prompt is a string (`<image>` marks an image's place, as in OpenRLHF's datasets) or chat messages; images are
    a list (or one) of paths (relative to the working directory, as OpenRLHF opens them), data URLs or image bytes.
    """

    def __init__(self, path: str, input_key: str, image_key: str):
        import datasets

        formats = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
        suffix = Path(path).suffix
        if suffix not in formats:
            raise ValueError(f"--prompt_images {path}: expected a .jsonl, .json or .parquet file")
        dataset = datasets.load_dataset(formats[suffix], data_files=path, split="train")
        for key in (input_key, image_key):
            if key not in dataset.column_names:
                raise ValueError(f"--prompt_images {path}: no column `{key}` (columns: {dataset.column_names}); "
                                 "set --prompt_input_key / --prompt_image_key as OpenRLHF's --data.input_key / --data.image_key")
        feature = dataset.features[image_key]
        if isinstance(feature, datasets.Image):  # parquet images stay bytes: the server decodes them per request
            dataset = dataset.cast_column(image_key, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            dataset = dataset.cast_column(image_key, datasets.List(datasets.Image(decode=False)))
        self.path, self.by_prompt, rows_of = path, {}, {}
        for row, example in enumerate(dataset):
            where = f"--prompt_images {path}, row {row}"
            messages = marked_messages(example[input_key])
            images = example[image_key]
            images = [] if images is None else images if isinstance(images, list) else [images]
            images = [self._reference(image, where) for image in images if image is not None]
            placeholders = count_image_parts(messages)
            if placeholders != len(images):
                raise ValueError(f"{where}: {placeholders} image places (`<image>` or image parts) but {len(images)} images")
            key = prompt_key(messages)
            if key in self.by_prompt and self.by_prompt[key] != images:
                raise ValueError(f"{where}: the same prompt as row {rows_of[key]} with other images; /get_reward "
                                 "cannot tell the two apart: make each prompt's text unique (e.g. name the image)")
            self.by_prompt[key], rows_of[key] = images, row

    @staticmethod
    def _reference(image, where: str) -> str:
        """An image as the server's decoder takes it: a data URL, or an absolute path checked now."""
        if isinstance(image, dict):  # a datasets image: {"bytes", "path"}
            image = image.get("bytes") or image.get("path")
        if isinstance(image, (bytes, bytearray)):
            return "data:image/png;base64," + base64.b64encode(image).decode()
        if not isinstance(image, str):
            raise ValueError(f"{where}: an image is a path, a data URL or bytes, got {type(image).__name__}")
        if image.startswith(("http://", "https://")):
            raise ValueError(f"{where}: the server never fetches remote images ({image}); store the file locally")
        if image.startswith("data:"):
            return image
        path = Path(image.removeprefix("file://")).resolve()
        if not path.is_file():
            raise ValueError(f"{where}: no image file at {path}")
        return str(path)

    def images(self, prompt, index: int) -> list[str]:
        """The images of a query's prompt: none for a prompt without image places, else its row's (or a clear 422)."""
        if isinstance(prompt, str):
            return []
        placeholders = count_image_parts(prompt)
        if placeholders == 0:
            return []
        images = self.by_prompt.get(prompt_key(prompt))
        if images is None:
            raise RowError(422, f"the prompt has {placeholders} image placeholders, no images in the request and no row "
                                "with the same turns in the server's --prompt_images file", index, "query")
        return images


def texts_of(value) -> list[str]:
    """The strings of a prompt or response: a string, or the text of chat messages."""
    if isinstance(value, str):
        return [value]
    texts = []
    for message in value:
        content = message["content"]
        texts += [content] if isinstance(content, str) else [part["text"] for part in content if part["type"] == "text"]
    return texts


def vision_tokens(config, tokenizer) -> list[str]:
    """The model's tokens that mark images and videos (`<|image_pad|>`, `<|vision_start|>`, ...), as its config names
    them: typed in a text, they would pair an image with the wrong place or break the forward."""
    ids = {value for key, value in config.to_dict().items()
           if key.endswith(("_token_id", "_token_index")) and any(w in key for w in ("image", "video", "vision"))
           and isinstance(value, int)}
    return sorted(tokenizer.convert_ids_to_tokens(sorted(ids)))


def check_texts(item: dict, index: int, field: str | None, forbidden: list[str]) -> None:
    """Text the tokenizer can encode and that types none of the model's vision tokens."""
    for key in ("prompt", "response"):
        for text in texts_of(item[key]):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise RowError(422, f"`{key}` is not valid Unicode (an unpaired surrogate)", index, field or key) from None
            typed = [token for token in forbidden if token in text]
            if typed:
                raise RowError(422, f"`{key}` contains {typed[0]}, a special token of the model that marks images; "
                                    "give images as images, not as tokens in the text", index, field or key)


class ParsedRow(NamedTuple):
    """A request's row checked for shape, its images not decoded yet."""

    item: dict
    images: list  # references: data URLs or paths
    index: int
    text_field: str | None  # the field named when its text is refused (None: `prompt` or `response`)
    image_field: str = "images"
    decoder: "ImageDecoder | None" = None  # None: the request's own (paths only under --allowed_image_root)
    videos: list = []  # references: data URLs, paths or frame lists


# ---------------------------------------------------------------- batching and metrics


class DaemonWorker:
    """One daemon thread running jobs in order. A daemon, so that SIGTERM is not held up by a forward pass or a decode
    in progress (a ThreadPoolExecutor's threads are joined at exit); a job cancelled before it starts is skipped."""

    def __init__(self, name: str):
        self.jobs = queue.SimpleQueue()
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def _work(self):
        while (job := self.jobs.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as error:
                    future.set_exception(error)

    def run(self, fn, *args) -> asyncio.Future:
        future = concurrent.futures.Future()
        self.jobs.put((future, fn, args))
        return asyncio.wrap_future(future)

    def close(self):
        self.jobs.put(None)


@dataclass
class Pending:
    item: dict
    tokens: int
    row: int | None  # its index in its request, to name it if the model fails on it
    future: asyncio.Future


class DynamicBatcher:
    """Rows of concurrent requests join one batch (up to max_rows / max_tokens, waiting at most `wait_s` for more);
    the batch goes whole to `score_fn` in the scorer's thread, one batch at a time. Rows whose request is gone (timed
    out, or its client hung up) are skipped."""

    def __init__(self, score_fn, max_rows: int, max_tokens: int, wait_s: float, metrics: "Metrics"):
        self.score_fn, self.max_rows, self.max_tokens, self.wait_s = score_fn, max_rows, max_tokens, wait_s
        self.metrics = metrics
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.worker = DaemonWorker("scorer")
        self.carry: Pending | None = None

    def submit(self, item: dict, tokens: int, row: int | None = None) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(Pending(item, tokens, row, future))
        return future

    async def _next(self, timeout: float | None) -> Pending | None:
        if self.carry is not None:
            pending, self.carry = self.carry, None
            return pending
        if timeout is None:
            return await self.queue.get()
        try:
            return await asyncio.wait_for(self.queue.get(), max(timeout, 0))
        except asyncio.TimeoutError:
            return None

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            if first.future.done():
                continue
            batch, tokens = [first], first.tokens
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_rows:
                pending = self._take_now() or await self._next(deadline - loop.time())
                if pending is None:
                    break
                if pending.future.done():
                    continue
                if tokens + pending.tokens > self.max_tokens:
                    self.carry = pending
                    break
                batch.append(pending)
                tokens += pending.tokens
            await self._score(batch)

    def _take_now(self) -> Pending | None:
        if self.carry is None and not self.queue.empty():
            return self.queue.get_nowait()
        return None

    async def _score(self, batch: list[Pending]):
        batch = [pending for pending in batch if not pending.future.done()]
        if not batch:
            return
        try:
            rewards = await self.worker.run(self.score_fn, [pending.item for pending in batch])
        except Exception as error:
            if len(batch) > 1:  # halves, so that only the failing row's request gets the error, in log2(rows) steps
                await self._score(batch[:len(batch) // 2])
                await self._score(batch[len(batch) // 2:])
                return
            logger.error("the model failed on a row", exc_info=error)
            if not batch[0].future.done():
                batch[0].future.set_exception(RowError(
                    500, f"the model failed on this row ({type(error).__name__}); the server's log has the details",
                    batch[0].row, "request"))
            return
        self.metrics.observe_batch(len(batch))
        for pending, reward in zip(batch, rewards):
            if not pending.future.done():
                pending.future.set_result(reward)


class Metrics:
    """Requests, rows, batch sizes and latency, through prometheus_client (a registry per app, so apps in one
    process keep their own counts)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("reward_server_requests", "Requests by endpoint and HTTP status.", ["endpoint", "status"],
                                registry=self.registry)
        self.rows = Counter("reward_server_rows", "Rows in parsed requests.", registry=self.registry)
        self.batch_rows = Histogram("reward_server_batch_rows", "Rows per batch handed to the scorer.",
                                    buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256], registry=self.registry)
        self.latency = Histogram("reward_server_request_seconds", "Time from request to response.", ["endpoint"],
                                 buckets=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
                                 registry=self.registry)
        self.queued_rows = 0  # accepted and not yet answered (the admission check reads it)
        Gauge("reward_server_queued_rows", "Rows accepted and not yet answered.",
              registry=self.registry).set_function(lambda: self.queued_rows)

    def observe_request(self, endpoint: str, status: int, seconds: float, rows: int = 0):
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.rows.inc(rows)
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def observe_batch(self, rows: int):
        self.batch_rows.observe(rows)

    def text(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------- the app


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol plus what uvicorn lacks, a deadline for a request's headers: a connection that has not
    sent them `header_timeout_s` after it opened (or after its previous response) is closed, so slow or idle clients
    cannot hold connections, and their file descriptors, for ever."""

    def __init__(self, *args, header_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self.header_deadline = header_timeout_s, None

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self):
        super().on_response_complete()
        self._arm_header_deadline()

    def connection_lost(self, exc):
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self):
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        self.header_deadline = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed)

    def _header_deadline_passed(self):
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # still no complete request line
            self.transport.close()


def uvicorn_config(app: FastAPI, args: ServerArguments):
    """uvicorn's own connection limits and timeouts, and the header deadline it lacks."""
    import uvicorn

    return uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                          http=functools.partial(HeaderDeadlineProtocol, header_timeout_s=args.header_timeout_s),
                          limit_concurrency=args.limit_concurrency, timeout_keep_alive=args.timeout_keep_alive,
                          timeout_graceful_shutdown=args.timeout_graceful_shutdown)


def row_token_limit(scorer: RewardScorer, args: ServerArguments) -> int:
    """--max_row_tokens, else the training max_length the stage scripts save as the tokenizer's model_max_length,
    else the model's max_position_embeddings."""
    if args.max_row_tokens:
        return args.max_row_tokens
    saved = scorer.renderer.tokenizer.model_max_length
    if saved and saved < 10**9:  # transformers' "unset" is 1e30
        return saved
    return scorer.model.config.get_text_config().max_position_embeddings


def build_app(scorer: RewardScorer, args: ServerArguments) -> FastAPI:
    """The ASGI app around a loaded scorer (tests and other programs embed it; `main` serves it with uvicorn)."""
    metrics = Metrics()
    renderer = scorer.renderer
    decode = ImageDecoder(args.allowed_image_root, args.max_image_pixels, renderer.load_image)
    prompt_images = PromptImages(args.prompt_images, args.prompt_input_key, args.prompt_image_key) if args.prompt_images else None
    # the operator's own file: its paths were checked at start and are not confined to --allowed_image_root
    decode_prompt_image = ImageDecoder("/", args.max_image_pixels, renderer.load_image)
    decode_video = VideoDecoder(decode, renderer)
    accepts_videos = renderer.video_processor is not None
    temporal_patch = getattr(renderer.video_processor, "temporal_patch_size", 2)
    # A fast tokenizer is not safe to share between threads: the scorer's thread has its own, validation this copy,
    # in one thread of its own.
    tokenizer = copy.deepcopy(renderer.tokenizer)
    validation = DaemonWorker("validation")
    accepts_images = renderer.image_processor is not None
    pixels_per_token = (getattr(renderer.image_processor, "patch_size", 14) * getattr(renderer.image_processor, "merge_size", 2)) ** 2
    max_tokens = row_token_limit(scorer, args)
    forbidden = vision_tokens(scorer.model.config, tokenizer)
    batcher = DynamicBatcher(scorer.score, args.max_batch_rows, args.max_batch_tokens, args.batch_wait_ms / 1000, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Pillow refuses an image of more than 2 x MAX_IMAGE_PIXELS before decoding it, one nested in a container (ICO)
        # included: half of --max_image_pixels puts that refusal at the limit. Process-wide, restored on shutdown.
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, args.max_image_pixels / 2
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.worker.close()
        validation.close()
        Image.MAX_IMAGE_PIXELS = previous

    app = FastAPI(title="reward server", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    def authorized(request: Request) -> bool:
        expected = f"Bearer {args.api_key}".encode()
        return not args.api_key or hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)

    def check_key(request: Request) -> None:
        if not authorized(request):
            raise RowError(401, "missing or wrong API key (Authorization: Bearer KEY)", field="authorization")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > args.max_body_bytes:
            raise RowError(413, f"body of {declared} bytes exceeds the limit of {args.max_body_bytes}", field="body")
        body = bytearray()
        try:
            async with asyncio.timeout(args.body_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > args.max_body_bytes:
                        raise RowError(413, f"body exceeds the limit of {args.max_body_bytes} bytes", field="body")
        except TimeoutError:
            raise RowError(408, f"the body did not arrive within {args.body_timeout_s} s", field="body") from None
        return bytes(body)

    def parse_body(body: bytes, parse) -> list[ParsedRow]:
        """JSON -> rows checked for shape (no image decoded yet), in the validation thread."""
        separators = body.count(b",") + body.count(b":")  # counted in C at memory speed; json.loads is far slower
        if separators > args.max_body_values:
            raise RowError(413, f"the body has {separators} `,` and `:`, past the limit of {args.max_body_values} "
                                "(--max_body_values): too many JSON values", field="body")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
            raise RowError(400, f"the body is not JSON ({type(error).__name__}: {str(error)[:200]})", field="body") from None
        if not isinstance(payload, dict):
            raise RowError(422, "the body is a JSON object", field="body")
        return parse(payload)

    def prepare_rows(rows: list[ParsedRow]) -> list[tuple[dict, int]]:
        """Every row's images decoded (within the request's pixel budget) and its tokens counted: all checks done
        before the rows join a batch."""
        pixels_left = args.max_request_pixels
        prepared = []
        for row in rows:
            item, tokens, pixels = prepare(row, pixels_left)
            pixels_left -= pixels
            prepared.append((item, tokens))
        return prepared

    def prepare(row: ParsedRow, pixels_left: int) -> tuple[dict, int, int]:
        item, index, text_field, image_field = row.item, row.index, row.text_field, row.image_field
        if not isinstance(row.images, list):
            raise RowError(422, "images are a list", index, image_field)
        try:  # every image and video in the order of its place (inline in a part, or the row's lists)
            placed = place_media(item["prompt"], item["response"], row.images, row.videos)
        except ValueError as error:
            hint = "" if row.images or prompt_images else " (OpenRLHF sends none: start the server with --prompt_images)"
            raise RowError(422, f"{error}{hint}", index, image_field) from None
        image_refs, video_refs = placed.images, placed.videos
        if image_refs and not accepts_images:
            raise RowError(422, "this reward model is text-only and cannot score images", index, image_field)
        if video_refs and not accepts_videos:
            raise RowError(422, "this reward model cannot score videos", index, "videos")
        if len(image_refs) > args.max_images_per_row:
            raise RowError(422, f"{len(image_refs)} images exceed the limit of {args.max_images_per_row} per row", index, image_field)
        if len(video_refs) > args.max_videos_per_row:
            raise RowError(422, f"{len(video_refs)} videos exceed the limit of {args.max_videos_per_row} per row", index, "videos")
        check_texts(item, index, text_field, forbidden)
        if len(image_refs) + len(video_refs) > len(row.images) + len(row.videos):  # media inline: placed, bare
            item = {"prompt": placed.prompt, "response": placed.response}
        try:
            text, _ = renderer.render(dict(item, images=image_refs, videos=video_refs))
        except Exception as error:
            raise RowError(422, f"the conversation cannot be rendered ({type(error).__name__})", index, text_field or "prompt") from None
        too_long = f"tokens, past the limit of {max_tokens} per row (--max_row_tokens)"
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokens > max_tokens:  # before any image is decoded
            raise RowError(413, f"the text alone has {tokens} {too_long}", index, text_field or "response")
        images, pixels = [], 0
        for i, reference in enumerate(image_refs):
            image, used = (row.decoder or decode)(reference, index, f"{image_field}[{i}]", pixels_left - pixels)
            images.append(image)
            pixels += used
            # The text holds one placeholder token per image, which the processor expands to the image's tokens.
            tokens += min(image.width * image.height, renderer.max_pixels or 16384 * pixels_per_token) // pixels_per_token - 1
        videos = []
        for i, reference in enumerate(video_refs):
            video, used = decode_video(reference, index, f"videos[{i}]", pixels_left - pixels)
            videos.append(video)
            pixels += used
            frames, _ = video  # [T, C, H, W], sized: a temporal patch of frames is one grid step
            tokens += -(-frames.shape[0] // temporal_patch) * frames.shape[2] * frames.shape[3] // pixels_per_token - 1
        if tokens > max_tokens:
            raise RowError(413, f"the row has {tokens} {too_long}", index, image_field)
        return dict(item, images=images, videos=videos), tokens, pixels

    async def validate_and_score(body: bytes, parse) -> tuple[int, list[float]]:
        rows = await validation.run(parse_body, body, parse)  # off the event loop: a big body blocks no one
        if metrics.queued_rows + len(rows) > args.max_queued_rows:
            raise RowError(503, f"the server's queue is full ({args.max_queued_rows} rows); retry later", field="request")
        metrics.queued_rows += len(rows)
        try:
            async with asyncio.timeout(args.request_timeout_s):
                prepared = await validation.run(prepare_rows, rows)
                futures = [batcher.submit(item, tokens, index) for index, (item, tokens) in enumerate(prepared)]
                return len(rows), list(await asyncio.gather(*futures))
        except TimeoutError:
            raise RowError(504, f"not scored within {args.request_timeout_s} s", field="request") from None
        finally:
            metrics.queued_rows -= len(rows)

    async def client_gone(request: Request) -> None:
        """Returns when the client hangs up (its body is read: uvicorn's next message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def handle(request: Request, endpoint: str, parse) -> JSONResponse:
        start = time.perf_counter()
        rows, answer, gone = 0, None, None
        try:
            check_key(request)
            body = await read_body(request)
            answer = asyncio.ensure_future(validate_and_score(body, parse))
            gone = asyncio.ensure_future(client_gone(request))
            await asyncio.wait([answer, gone], return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():  # nobody is waiting for it: its rows leave the queue
                raise RowError(499, "the client closed the connection", field="request")
            rows, rewards = answer.result()
            response = JSONResponse(shape(endpoint, rewards))
        except RowError as error:
            response = error.response()
        except Exception:
            logger.exception("%s failed", endpoint)
            response = RowError(500, "the server failed on this request; its log has the details", field="request").response()
        finally:
            for task in (answer, gone):
                if task is not None:
                    task.cancel()
        metrics.observe_request(endpoint, response.status_code, time.perf_counter() - start, rows)
        if response.status_code >= 400:  # RL clients may only log it at INFO (OpenRLHF) or retry it away
            logger.warning("%s %d: %s", endpoint, response.status_code, response.body.decode()[:500])
        return response

    def shape(endpoint: str, rewards: list[float]) -> dict:
        if endpoint == "/get_reward":
            return {"rewards": rewards, "scores": rewards, "extra_logs": {"reward_model_score": rewards}}
        return {"rewards": rewards}

    def rows_of(payload: dict, key: str) -> list:
        if key not in payload:
            raise RowError(422, f"missing `{key}`", field=key)
        rows = payload[key]
        if not isinstance(rows, list) or not rows:
            raise RowError(422, f"`{key}` is a non-empty list", field=key)
        if len(rows) > args.max_rows_per_request:
            raise RowError(413, f"{len(rows)} rows exceed the limit of {args.max_rows_per_request}", field=key)
        return rows

    def parse_score(payload: dict) -> list[ParsedRow]:
        parsed = []
        for index, row in enumerate(rows_of(payload, "rows")):
            item, images, videos = score_row(row, index)
            parsed.append(ParsedRow(item, images, index, "messages" if "messages" in row else None, videos=videos))
        return parsed

    def parse_get_reward(payload: dict) -> list[ParsedRow]:
        queries = rows_of(payload, "query")
        columns = {}
        for key in ("prompts", "labels", "images"):
            value = payload.get(key)
            if value is not None and (not isinstance(value, list) or len(value) != len(queries)):
                raise RowError(422, f"`{key}` is a list as long as `query` ({len(queries)})", field=key)
            columns[key] = value or [None] * len(queries)
        parsed = []
        for index, (query, prompt, images) in enumerate(zip(queries, columns["prompts"], columns["images"])):
            item = reward_query(query, prompt, index)
            if images is None and prompt_images is not None:
                parsed.append(ParsedRow(item, prompt_images.images(item["prompt"], index), index, "query", "query",
                                        decode_prompt_image))
            else:
                parsed.append(ParsedRow(item, images or [], index, "query"))
        return parsed

    @app.post("/score")
    async def score(request: Request):
        return await handle(request, "/score", parse_score)

    @app.post("/get_reward")
    async def get_reward(request: Request):
        return await handle(request, "/get_reward", parse_get_reward)

    @app.get("/health")
    async def health(request: Request):
        if not authorized(request):  # liveness only: nothing about the model without the key
            return {"status": "ok"}
        return {"status": "ok", "model": args.model_name_or_path, "images": accepts_images}

    @app.get("/metrics")
    async def metrics_text(request: Request):
        try:
            check_key(request)
        except RowError as error:
            return error.response()
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


def main(argv=None):
    import uvicorn
    from trl import TrlParser

    args, budget = TrlParser((ServerArguments, PixelBudgetArguments)).parse_args_and_config(argv)
    if not args.model_name_or_path:
        sys.exit("server: --model_name_or_path is required")
    scorer = RewardScorer.from_pretrained(args.model_name_or_path, dtype=args.dtype, batch_size=args.batch_size,
                                          attn_implementation=args.attn_implementation,
                                          min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
    # Pillow warns from half the limit up (see build_app); what passes is within --max_image_pixels.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    uvicorn.Server(uvicorn_config(build_app(scorer, args), args)).run()


if __name__ == "__main__":
    main()
