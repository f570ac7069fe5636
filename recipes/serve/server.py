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
  POST /score       {"rows": [...]}: rows in the preference schema ({"images", "prompt", "response"}) or OpenAI chat
                    ({"messages": [..., {"role": "assistant", ...}]}, images as `image_url` parts) -> {"rewards": [...]}.
  GET  /health, GET /metrics (Prometheus, through prometheus_client).
Images are data URLs (`data:image/png;base64,...`); file paths only under --allowed_image_root (none by default);
remote URLs are never fetched.

Concurrent requests are batched (up to --max_batch_rows rows / --max_batch_tokens tokens, waiting at most
--batch_wait_ms for more) and each batch goes to `RewardScorer.score` whole, which scores rows sharing a prompt and
images in one forward where the model supports it.
"""

import asyncio
import base64
import binascii
import copy
import hmac
import io
import json
import logging
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from collators import PixelBudgetArguments
from collators.conversation import count_image_parts, to_messages
from heads import RewardScorer
from recipes.serve.rl_rewards import marked_content

logger = logging.getLogger("reward_server")


@dataclass
class ServerArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "Reward model directory or hub id."})
    host: str = field(default="127.0.0.1", metadata={"help": "Interface to bind; 0.0.0.0 exposes the server."})
    port: int = field(default=8000)
    api_key: str | None = field(default=None, metadata={"help": "If set, requests need `Authorization: Bearer KEY`."})
    allowed_image_root: str | None = field(
        default=None, metadata={"help": "Directory whose files requests may name as images; paths are refused without it."})
    max_body_bytes: int = field(default=64 * 2**20, metadata={"help": "Largest request body (413 beyond)."})
    max_rows_per_request: int = field(default=1024)
    max_images_per_row: int = field(default=8)
    max_image_pixels: int = field(default=4096 * 4096, metadata={"help": "Largest decoded image (width x height)."})
    request_timeout_s: float = field(default=120.0, metadata={"help": "A request still waiting after this gets 504."})
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
        return JSONResponse({"error": {"message": self.message, "row": self.row, "field": self.field}}, self.status)


# ---------------------------------------------------------------- input validation


class ImageDecoder:
    """Data URLs, and paths under an allowed root; every image checked against the pixel limit before decoding."""

    def __init__(self, allowed_root: str | None, max_pixels: int):
        self.allowed_root = Path(allowed_root).resolve() if allowed_root else None
        self.max_pixels = max_pixels

    def __call__(self, reference, row: int, field: str) -> Image.Image:
        if not isinstance(reference, str):
            raise RowError(422, f"an image must be a data URL or a path string, got {type(reference).__name__}", row, field)
        if reference.startswith(("http://", "https://")):
            raise RowError(422, "remote image URLs are not fetched; send the image as a data URL", row, field)
        if reference.startswith("data:"):
            header, _, payload = reference.partition(",")
            if not header.endswith(";base64"):
                raise RowError(422, "a data URL image must be base64 (data:image/png;base64,...)", row, field)
            try:
                source = io.BytesIO(base64.b64decode(payload, validate=True))
            except (binascii.Error, ValueError):
                raise RowError(422, "the data URL is not valid base64", row, field) from None
        else:
            source = self._path(reference, row, field)
        try:
            image = Image.open(source)
            width, height = image.size  # read from the header: the limit holds before decoding
            if width * height > self.max_pixels:
                raise RowError(422, f"image of {width}x{height} pixels exceeds the limit of {self.max_pixels}", row, field)
            image.load()
            return image.convert("RGB")
        except RowError:
            raise
        except Exception as error:  # PIL raises many types for corrupt data
            raise RowError(422, f"the image cannot be decoded ({type(error).__name__})", row, field) from None

    def _path(self, reference: str, row: int, field: str) -> Path:
        if self.allowed_root is None:
            raise RowError(422, "image paths are refused (the server has no --allowed_image_root); send a data URL", row, field)
        path = Path(reference.removeprefix("file://"))
        path = (path if path.is_absolute() else self.allowed_root / path).resolve()
        if not path.is_relative_to(self.allowed_root):
            raise RowError(422, f"image path is outside the allowed root {self.allowed_root}", row, field)
        if not path.is_file():
            raise RowError(422, f"no image file at {reference}", row, field)
        return path


def chat_messages(messages, row: int, field: str) -> tuple[list[dict], list]:
    """OpenAI-style chat messages -> (canonical messages with image placeholders, image references in order)."""
    if not isinstance(messages, list) or not messages:
        raise RowError(422, "expected a non-empty list of chat messages", row, field)
    converted, images = [], []
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
            elif kind == "image_url":
                url = part.get("image_url")
                images.append(url.get("url") if isinstance(url, dict) else url)
                parts.append({"type": "image"})
            elif kind == "image":
                if part.get("image") is not None:
                    images.append(part["image"])
                parts.append({"type": "image"})
            else:
                raise RowError(422, "a part is {type: text, text} or {type: image_url, image_url: {url}}", row,
                               f"{where}.content[{p}]")
        converted.append({"role": message["role"], "content": parts})
    return converted, images


def score_row(row, index: int) -> tuple[dict, list]:
    """A /score row -> (item without images, image references)."""
    if not isinstance(row, dict):
        raise RowError(422, "a row is an object", index, "rows")
    if "messages" in row:
        messages, images = chat_messages(row["messages"], index, "messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise RowError(422, "the last message is the assistant's response, after at least one prompt message", index, "messages")
        return {"prompt": messages[:-1], "response": messages[-1:]}, images
    item = {}
    for key in ("prompt", "response"):
        if key not in row:
            raise RowError(422, f"missing `{key}` (or give `messages`)", index, key)
        value = row[key]
        if isinstance(value, list):
            value, extra = chat_messages(value, index, key)
            if extra:
                raise RowError(422, "images go in the row's `images` list", index, key)
        elif not isinstance(value, str):
            raise RowError(422, f"`{key}` is a string or chat messages, got {type(value).__name__}", index, key)
        item[key] = value
    images = row.get("images", [])
    if not isinstance(images, list):
        raise RowError(422, "`images` is a list", index, "images")
    return item, images


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
                                f"with the same turns in --prompt_images {self.path}", index, "query")
        return images


# ---------------------------------------------------------------- batching and metrics


@dataclass
class Pending:
    item: dict
    tokens: int
    future: asyncio.Future


class DynamicBatcher:
    """Rows of concurrent requests join one batch (up to max_rows / max_tokens, waiting at most `wait_s` for more);
    the batch goes whole to `score_fn` in a worker thread, one batch at a time."""

    def __init__(self, score_fn, max_rows: int, max_tokens: int, wait_s: float, metrics: "Metrics"):
        self.score_fn, self.max_rows, self.max_tokens, self.wait_s = score_fn, max_rows, max_tokens, wait_s
        self.metrics = metrics
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
        self.carry: Pending | None = None

    def submit(self, item: dict, tokens: int) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(Pending(item, tokens, future))
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
            if first.future.done():  # its request timed out or was cancelled
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
        try:
            rewards = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.score_fn, [pending.item for pending in batch])
        except Exception as error:
            if len(batch) > 1:  # row by row, so that only the request of the failing row gets the error
                for pending in batch:
                    await self._score([pending])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
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

    def observe_request(self, endpoint: str, status: int, seconds: float, rows: int = 0):
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.rows.inc(rows)
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def observe_batch(self, rows: int):
        self.batch_rows.observe(rows)

    def text(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------- the app


def build_app(scorer: RewardScorer, args: ServerArguments) -> FastAPI:
    """The ASGI app around a loaded scorer (tests and other programs embed it; `main` serves it with uvicorn)."""
    metrics = Metrics()
    decode = ImageDecoder(args.allowed_image_root, args.max_image_pixels)
    prompt_images = PromptImages(args.prompt_images, args.prompt_input_key, args.prompt_image_key) if args.prompt_images else None
    # the operator's own file: its paths were checked at start and are not confined to --allowed_image_root
    decode_prompt_image = ImageDecoder("/", args.max_image_pixels)
    # A fast tokenizer is not safe to share between threads: the scorer's thread has its own, validation this copy,
    # in one thread of its own.
    tokenizer = copy.deepcopy(scorer.renderer.tokenizer)
    prepare_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="validation")
    accepts_images = scorer.renderer.image_processor is not None
    image_processor = scorer.renderer.image_processor
    pixels_per_token = (getattr(image_processor, "patch_size", 14) * getattr(image_processor, "merge_size", 2)) ** 2
    batcher = DynamicBatcher(scorer.score, args.max_batch_rows, args.max_batch_tokens, args.batch_wait_ms / 1000, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="reward server", docs_url=None, redoc_url=None, lifespan=lifespan)

    def check_key(request: Request) -> None:
        expected = f"Bearer {args.api_key}".encode()
        if args.api_key and not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            raise RowError(401, "missing or wrong API key (Authorization: Bearer KEY)", field="authorization")

    async def read_json(request: Request):
        check_key(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > args.max_body_bytes:
            raise RowError(413, f"body of {declared} bytes exceeds the limit of {args.max_body_bytes}", field="body")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > args.max_body_bytes:
                raise RowError(413, f"body exceeds the limit of {args.max_body_bytes} bytes", field="body")
        try:
            payload = json.loads(body)
        except ValueError as error:
            raise RowError(400, f"the body is not JSON ({error})", field="body") from None
        if not isinstance(payload, dict):
            raise RowError(422, "the body is a JSON object", field="body")
        return payload

    def prepare(item: dict, image_refs: list, index: int, field: str, decoder=decode) -> tuple[dict, int]:
        """Decodes the row's images and renders its text once: every check before the row joins a batch."""
        if not isinstance(image_refs, list):
            raise RowError(422, "images are a list", index, field)
        if image_refs and not accepts_images:
            raise RowError(422, "this reward model is text-only and cannot score images", index, field)
        if len(image_refs) > args.max_images_per_row:
            raise RowError(422, f"{len(image_refs)} images exceed the limit of {args.max_images_per_row} per row", index, field)
        images = [decoder(ref, index, f"{field}[{i}]") for i, ref in enumerate(image_refs)]
        try:
            text = scorer.renderer.render_text(item["prompt"], item["response"], len(images))
        except Exception as error:
            raise RowError(422, f"the conversation cannot be rendered ({error})", index, "prompt") from None
        placeholders = sum(count_image_parts(to_messages(item[key], "user")) for key in ("prompt", "response"))
        if placeholders > len(images):
            hint = "" if images or prompt_images else " (OpenRLHF sends none: start the server with --prompt_images)"
            raise RowError(422, f"{placeholders} image placeholders but {len(images)} images{hint}", index, field)
        # Qwen-VL: one token per (patch x merge)^2 pixels after the resize; a rough count is enough to bound a batch.
        budget = scorer.renderer.max_pixels or 16384 * pixels_per_token
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        tokens += sum(min(image.width * image.height, budget) // pixels_per_token for image in images)
        return dict(item, images=images), tokens

    async def score_items(rows: list[tuple[dict, int]]) -> list[float]:
        futures = [batcher.submit(item, tokens) for item, tokens in rows]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), args.request_timeout_s))
        except asyncio.TimeoutError:
            raise RowError(504, f"not scored within {args.request_timeout_s} s", field="request") from None

    async def handle(request: Request, endpoint: str, parse) -> JSONResponse:
        start = time.perf_counter()
        rows = 0
        try:
            payload = await read_json(request)
            prepared = await asyncio.get_running_loop().run_in_executor(prepare_executor, parse, payload)
            rows = len(prepared)
            rewards = await score_items(prepared)
            response = JSONResponse(shape(endpoint, rewards))
        except RowError as error:
            response = error.response()
        except Exception as error:  # a row the checks let through but the model could not score
            response = RowError(500, f"scoring failed ({type(error).__name__}: {error})", field="request").response()
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

    def parse_score(payload: dict) -> list[tuple[dict, int]]:
        prepared = []
        for index, row in enumerate(rows_of(payload, "rows")):
            item, refs = score_row(row, index)
            prepared.append(prepare(item, refs, index, "images"))
        return prepared

    def parse_get_reward(payload: dict) -> list[tuple[dict, int]]:
        queries = rows_of(payload, "query")
        columns = {}
        for key in ("prompts", "labels", "images"):
            value = payload.get(key)
            if value is not None and (not isinstance(value, list) or len(value) != len(queries)):
                raise RowError(422, f"`{key}` is a list as long as `query` ({len(queries)})", field=key)
            columns[key] = value or [None] * len(queries)
        prepared = []
        for index, (query, prompt, images) in enumerate(zip(queries, columns["prompts"], columns["images"])):
            item = reward_query(query, prompt, index)
            if images is None and prompt_images is not None:
                prepared.append(prepare(item, prompt_images.images(item["prompt"], index), index, "query",
                                        decode_prompt_image))
            else:
                prepared.append(prepare(item, images or [], index, "images"))
        return prepared

    @app.post("/score")
    async def score(request: Request):
        return await handle(request, "/score", parse_score)

    @app.post("/get_reward")
    async def get_reward(request: Request):
        return await handle(request, "/get_reward", parse_get_reward)

    @app.get("/health")
    async def health():
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
    uvicorn.run(build_app(scorer, args), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
