"""Reward functions that put the reward model in an RL loop, images and videos included.

TRL (`GRPOTrainer(reward_funcs=...)`; the dataset's `image` / `images` and `video` / `videos` columns reach the
function; a completion may hold image and video parts of its own), in-process or over HTTP to
recipes/serve/server.py, which keeps the reward model off the policy's GPUs:

    from recipes.serve.rl_rewards import RewardModelReward, RewardServerReward
    trainer = GRPOTrainer(model=policy, reward_funcs=RewardModelReward("outputs/demo/stage2"), train_dataset=dataset, ...)
    trainer = GRPOTrainer(model=policy, reward_funcs=RewardServerReward("http://127.0.0.1:8000"), train_dataset=dataset, ...)

verl, through HTTP to recipes/serve/server.py (or to vLLM serving the export of recipes/serve/export_vllm.py):

    python -m verl.trainer.main_ppo ... \
        custom_reward_function.path=recipes/serve/rl_rewards.py custom_reward_function.name=compute_score \
        +custom_reward_function.reward_kwargs.reward_url=http://127.0.0.1:8000

verl calls `compute_score(data_source, solution_str, ground_truth, extra_info)` per sample, or with
`reward_manager.name=batch` `compute_score(data_sources, solution_strs, ground_truths, extra_infos)`; the prompt is
read from `extra_info["question"]` (or `"prompt"`), the images from `extra_info["images"]` and the videos (files or
frame lists) from `extra_info["videos"]`, which the data preparation puts there. `<image>` / `<video>` in the prompt
mark each one's place, as in verl's datasets.
"""

import base64
import io
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

import httpx

from collators.conversation import IMAGE_PART, VIDEO_PART, open_image, part_kind, text_part

IMAGE_MARKER = "<image>"  # where an image goes in an RL dataset's prompt text (verl's and OpenRLHF's datasets)
VIDEO_MARKER = "<video>"
MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")


def marked_content(text: str) -> list[dict]:
    """Text with `<image>` / `<video>` markers -> content parts, each marker a placeholder in its place."""
    parts = []
    for piece in MARKERS.split(text):
        if piece in (IMAGE_MARKER, VIDEO_MARKER):
            parts.append(IMAGE_PART if piece == IMAGE_MARKER else VIDEO_PART)
        elif piece:
            parts.append(text_part(piece))
    return parts


def bare_media(value):
    """A prompt whose image and video parts are bare placeholders: TRL copies the dataset's images into the prompt's
    parts, and the same images reach the function as the `images` column, which fills the placeholders."""
    if isinstance(value, str):
        return value
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
             [{"type": part_kind(part)} if part_kind(part) != "text" else part for part in m["content"]]}
            for m in value]


class TRLRows:
    """The rows of one TRL reward call: TRL passes `prompts` and `completions` (strings or chat messages) and every
    other dataset column as a keyword, images as `images` (a list per example) or `image` (one per example), videos as
    `videos` / `video`. A VLM's prompts also hold those images inline in their image parts: the rows keep the parts as
    places and take the images from the column, once; a completion's own images and videos stay in its parts."""

    __name__ = "reward_model"  # TRL names the reward in its logs after the function

    @staticmethod
    def items(prompts, completions, images=None, image=None, videos=None, video=None) -> list[dict]:
        """One item per completion: the prompt's images and videos from the dataset's columns, a completion's own
        media inline in its parts."""
        def column(many, one, i) -> list:
            if many is not None:
                return list(many[i] or [])
            return [one[i]] if one is not None and one[i] is not None else []

        return [{"images": column(images, image, i), "videos": column(videos, video, i), "prompt": bare_media(prompt),
                 "response": completion} for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True))]


class RewardModelReward(TRLRows):
    """A TRL reward function: one reward per completion from the reward model, in-process, with the prompt's images."""

    def __init__(self, model_name_or_path: str | None = None, scorer=None, **scorer_kwargs):
        if scorer is None:
            from heads import RewardScorer

            scorer = RewardScorer.from_pretrained(model_name_or_path, **scorer_kwargs)
        self.scorer = scorer

    def __call__(self, prompts, completions, images=None, image=None, videos=None, video=None, **kwargs) -> list[float]:
        return self.scorer.score(self.items(prompts, completions, images, image, videos, video))


class RewardServerReward(TRLRows):
    """A TRL reward function that asks recipes/serve/server.py: the completions of one call go in requests of up to
    `rows_per_request` rows (the server batches them with other clients'), each image once as a PNG data URL.
    A request that fails in transit or gets 429/502/503/504 is tried again (`retries` times, waiting 1, 2, 4 ... s);
    another refusal stops training with the server's message, since sending it again would not change it."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 300.0,
                 retries: int = 4, rows_per_request: int = 256):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        self.retries, self.rows_per_request = retries, rows_per_request

    def __call__(self, prompts, completions, images=None, image=None, videos=None, video=None, **kwargs) -> list[float]:
        urls = {}  # id -> data URL: the generations of a prompt share its image and video objects, each encoded once

        def url(kind: str, medium):
            if id(medium) not in urls:
                urls[id(medium)] = image_data_url(medium) if kind == "image" else video_data_url(medium)
            return urls[id(medium)]

        rows = [{"prompt": plain_messages(item["prompt"], url), "response": plain_messages(item["response"], url),
                 "images": [url("image", image) for image in item["images"]],
                 "videos": [url("video", video) for video in item["videos"]]}
                for item in self.items(prompts, completions, images, image, videos, video)]
        rewards = []
        for start in range(0, len(rows), self.rows_per_request):
            answer = post_with_retries(self.client, "/score", {"rows": rows[start:start + self.rows_per_request]}, self.retries)
            rewards += answer["rewards"]
        return rewards


def plain_messages(value, url):
    """TRL's prompt or completion as JSON: chat messages keep their text; an image or video part that holds its
    medium (a completion's own) sends it as a data URL (`url(kind, medium)`) in its place, a bare one keeps its place."""
    if isinstance(value, str):
        return value

    def part_json(part: dict) -> dict:
        kind = part_kind(part)
        if kind == "text":
            return {"type": "text", "text": part.get("text") or ""}
        if part.get(kind) is None:
            return {"type": kind}
        return {"type": f"{kind}_url", f"{kind}_url": {"url": url(kind, part[kind])}}

    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
             [part_json(part) for part in m["content"]]} for m in value]


RETRY_STATUS = (429, 502, 503, 504)  # a busy or restarting server: the same request may pass later


def post_with_retries(client: httpx.Client, path: str, body: dict, retries: int) -> dict:
    """POST, trying again after a failure in transit or a busy server; any other error raised with its message."""
    for attempt in range(retries + 1):
        try:
            response = client.post(path, json=body)
        except httpx.TransportError as error:
            failure = f"{type(error).__name__}: {error}"
        else:
            if response.status_code == 200:
                return response.json()
            failure = f"HTTP {response.status_code}: {response.text[:1000]}"
            if response.status_code not in RETRY_STATUS:
                break
        if attempt < retries:
            time.sleep(2**attempt)
    raise RuntimeError(f"reward server {client.base_url}{path}: {failure}")


def image_data_url(image, min_pixels: int | None = None, max_pixels: int | None = None, image_patch_size: int = 14) -> str:
    """A PNG data URL of a path, bytes, PIL or datasets image. With a pixel budget, the image is first resized as
    qwen-vl-utils resizes it, so a server that resizes by other means (vLLM) sees exactly what our scorer sees."""
    image = open_image(image).convert("RGB")
    if min_pixels is not None or max_pixels is not None:
        from qwen_vl_utils import fetch_image

        budget = {key: value for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if value}
        image = fetch_image({"image": image, **budget}, image_patch_size=image_patch_size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


VIDEO_TYPES = {".mp4": "video/mp4", ".webm": "video/webm", ".mkv": "video/x-matroska", ".avi": "video/x-msvideo",
               ".mov": "video/quicktime"}


def video_data_url(video):
    """A video as the server takes it: a video file as a data URL of its bytes, a list of frames as a list of PNG
    data URLs."""
    if isinstance(video, (list, tuple)):
        return [image_data_url(frame) for frame in video]
    path = Path(video)
    if path.suffix.lower() not in VIDEO_TYPES:
        raise ValueError(f"{video}: a video file is one of {sorted(VIDEO_TYPES)}, or give a list of frames")
    return f"data:{VIDEO_TYPES[path.suffix.lower()]};base64," + base64.b64encode(path.read_bytes()).decode()


def chat(prompt: str, response: str, image_urls: list[str], video_urls: list = ()) -> list[dict]:
    """OpenAI-style messages. `<image>` / `<video>` markers in the prompt take the images / videos in order (their
    count must match); those of a kind without markers go first in the user turn (Qwen's order, as the scorer renders
    them), images before videos."""
    media = {"image": (IMAGE_MARKER, list(image_urls)), "video": (VIDEO_MARKER, list(video_urls))}
    front, marked = [], {}
    for kind, (marker, urls) in media.items():
        markers = prompt.count(marker)
        if markers and markers != len(urls):
            raise ValueError(f"the prompt has {markers} {marker} markers but {len(urls)} {kind}s: give one "
                             f"{kind} per marker in extra_info['{kind}s']")
        if markers:
            marked[kind] = iter(urls)
        else:
            front += [media_url_part(kind, url) for url in urls]
    content = front + [media_url_part(part["type"], next(marked[part["type"]])) if part["type"] != "text" else part
                       for part in marked_content(prompt)]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": response}]


def media_url_part(kind: str, url) -> dict:
    return {"type": f"{kind}_url", f"{kind}_url": {"url": url}}


_clients: dict[str, httpx.Client] = {}


def _client(url: str, api_key: str | None, timeout: float) -> httpx.Client:
    """One keep-alive connection pool per server, reused across calls of a worker."""
    if url not in _clients:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        _clients[url] = httpx.Client(base_url=url, headers=headers, timeout=timeout)
    return _clients[url]


def compute_score(data_source=None, solution_str: str | None = None, ground_truth=None, extra_info: dict | None = None, *,
                  data_sources=None, solution_strs=None, ground_truths=None, extra_infos=None,
                  reward_url: str = "http://127.0.0.1:8000", api: str = "server", model: str | None = None,
                  api_key: str | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                  image_patch_size: int = 14, timeout: float = 180.0, retries: int = 4, **kwargs) -> float | list[float]:
    """verl's custom reward function: the reward of `solution_str` to the sample's prompt and images, or with verl's
    batched call (`solution_strs`, `extra_infos`, ...) the list of rewards of the batch, in one request.

    api="server": POST {reward_url}/score (recipes/serve/server.py). api="vllm": POST {reward_url}/classify with
    `use_activation: false` (vLLM serving the export; `model` is its served name), one request per sample. Give the
    model's pixel budget (`min_pixels` / `max_pixels`) to resize images here exactly as the scorer does (see the
    README). Other keywords verl passes (`reward_router_address`, `reward_model_tokenizer`, ...) are not needed.
    """
    batched = solution_strs is not None
    if not batched:
        solution_strs, extra_infos = [solution_str], [extra_info]
    elif extra_infos is None:
        extra_infos = [None] * len(solution_strs)
    conversations = []
    for i, (response, info) in enumerate(zip(solution_strs, extra_infos, strict=True)):  # verl's lists are numpy arrays
        info = info or {}
        where = f"sample {i}" + (f" (extra_info index {info['index']})" if "index" in info else "")
        prompt = info.get("question", info.get("prompt"))
        if not isinstance(prompt, str):
            raise KeyError(f"compute_score, {where}: needs the prompt text in extra_info['question'] (or extra_info['prompt'])")
        urls = [image_data_url(image, min_pixels, max_pixels, image_patch_size) for image in info.get("images") or []]
        videos = [video_data_url(video) for video in info.get("videos") or []]
        try:
            conversations.append(chat(prompt, response, urls, videos))
        except ValueError as error:
            raise ValueError(f"compute_score, {where}: {error}") from None
    client = _client(reward_url, api_key, timeout)
    if api == "server":
        rewards = post_with_retries(client, "/score", {"rows": [{"messages": m} for m in conversations]}, retries)["rewards"]
    elif api == "vllm":
        rewards = [post_with_retries(client, "/classify", {"model": model, "messages": m, "use_activation": False},
                                     retries)["data"][0]["probs"][0] for m in conversations]
    else:
        raise ValueError(f"api is 'server' or 'vllm', got {api!r}")
    rewards = [float(reward) for reward in rewards]
    return rewards if batched else rewards[0]
