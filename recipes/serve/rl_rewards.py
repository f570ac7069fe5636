"""Reward functions that put the reward model in an RL loop, images included.

TRL, in-process (`GRPOTrainer(reward_funcs=...)`; the dataset's `image` / `images` column reaches the function):

    from recipes.serve.rl_rewards import RewardModelReward
    trainer = GRPOTrainer(model=policy, reward_funcs=RewardModelReward("outputs/demo/stage2"), train_dataset=dataset, ...)

verl, through HTTP to recipes/serve/server.py (or to vLLM serving the export of recipes/serve/export_vllm.py):

    python -m verl.trainer.main_ppo ... \
        custom_reward_function.path=recipes/serve/rl_rewards.py custom_reward_function.name=compute_score \
        +custom_reward_function.reward_kwargs.reward_url=http://127.0.0.1:8000

verl calls `compute_score(data_source, solution_str, ground_truth, extra_info)`; the prompt is read from
`extra_info["question"]` (or `"prompt"`) and the images from `extra_info["images"]`, which the data preparation
puts there.
"""

import base64
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

import httpx

from collators.conversation import IMAGE_PART, open_image, text_part

IMAGE_MARKER = "<image>"  # where an image goes in an RL dataset's prompt text (verl's and OpenRLHF's datasets)


def marked_content(text: str) -> list[dict]:
    """Text with `<image>` markers -> content parts, each marker an image placeholder in its place."""
    parts = []
    for i, piece in enumerate(text.split(IMAGE_MARKER)):
        if i:
            parts.append(IMAGE_PART)
        if piece:
            parts.append(text_part(piece))
    return parts


class RewardModelReward:
    """A TRL reward function: one reward per completion from the reward model, in-process, with the prompt's images.

    TRL passes `prompts` and `completions` (strings or chat messages) and every other dataset column as a keyword:
    `images` (a list per example) or `image` (one per example).
    """

    __name__ = "reward_model"  # TRL names the reward in its logs after the function

    def __init__(self, model_name_or_path: str | None = None, scorer=None, **scorer_kwargs):
        if scorer is None:
            from heads import RewardScorer

            scorer = RewardScorer.from_pretrained(model_name_or_path, **scorer_kwargs)
        self.scorer = scorer

    def items(self, prompts, completions, images=None, image=None) -> list[dict]:
        rows = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            if images is not None:
                row_images = list(images[i] or [])
            elif image is not None:
                row_images = [image[i]] if image[i] is not None else []
            else:
                row_images = []
            rows.append({"images": row_images, "prompt": prompt, "response": completion})
        return rows

    def __call__(self, prompts, completions, images=None, image=None, **kwargs) -> list[float]:
        return self.scorer.score(self.items(prompts, completions, images=images, image=image))


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


def chat(prompt: str, response: str, image_urls: list[str]) -> list[dict]:
    """OpenAI-style messages, images first in the user turn (Qwen's order, as the scorer renders them)."""
    content = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": response}]


_clients: dict[str, httpx.Client] = {}


def _client(url: str, api_key: str | None, timeout: float) -> httpx.Client:
    """One keep-alive connection pool per server, reused across calls of a worker."""
    if url not in _clients:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        _clients[url] = httpx.Client(base_url=url, headers=headers, timeout=timeout)
    return _clients[url]


def compute_score(data_source, solution_str: str, ground_truth=None, extra_info: dict | None = None, *,
                  reward_url: str = "http://127.0.0.1:8000", api: str = "server", model: str | None = None,
                  api_key: str | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                  image_patch_size: int = 14, timeout: float = 180.0, **kwargs) -> float:
    """verl's custom reward function: the reward of `solution_str` to the sample's prompt and images.

    api="server": POST {reward_url}/score (recipes/serve/server.py). api="vllm": POST {reward_url}/classify with
    `use_activation: false` (vLLM serving the export; `model` is its served name). Give the model's pixel budget
    (`min_pixels` / `max_pixels`) to resize images here exactly as the scorer does (see the README).
    """
    extra_info = extra_info or {}
    prompt = extra_info.get("question", extra_info.get("prompt"))
    if prompt is None:
        raise KeyError("compute_score needs the prompt in extra_info['question'] (or extra_info['prompt'])")
    images = extra_info.get("images") or []
    urls = [image_data_url(image, min_pixels, max_pixels, image_patch_size) for image in images]
    messages = chat(prompt, solution_str, urls)
    client = _client(reward_url, api_key, timeout)
    if api == "server":
        response = client.post("/score", json={"rows": [{"messages": messages}]})
        response.raise_for_status()
        return float(response.json()["rewards"][0])
    if api == "vllm":
        response = client.post("/classify", json={"model": model, "messages": messages, "use_activation": False})
        response.raise_for_status()
        return float(response.json()["data"][0]["probs"][0])
    raise ValueError(f"api is 'server' or 'vllm', got {api!r}")
