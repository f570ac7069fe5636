"""Score and rank responses with a trained reward model: the same render + forward as training.

Responses to one prompt (the same prompt and images: best-of-N, or a benchmark pair) are scored in one packed
sequence, prompt | response 1 | ... | response N, where each response sees the prompt and itself only: the image
and the prompt are encoded once instead of N times, and each reward equals the one of its plain row.
"""

import hashlib
import json

import torch
from tqdm.auto import tqdm
from transformers import AutoProcessor

from collators import ConversationRenderer
from collators.conversation import place_media, video_source
from collators.packed_pair_collator import pack_conversations, supports_packing, video_time_interval

from .value_head import ValueHeadRewardModel


class RewardScorer:
    """Batched scoring. Items are dicts with `images` (list, may be empty), optional `videos` (video files or frame
    lists), `prompt` and `response`; any turn may hold image and video parts (see collators/conversation.py).

    >>> scorer = RewardScorer.from_pretrained("Skywork/Skywork-VL-Reward-7B")
    >>> scorer.score([{"images": ["chart.png"], "prompt": "Is Purple the highest value?", "response": "B"}])
    """

    def __init__(self, model: ValueHeadRewardModel, processing_class, batch_size: int = 8,
                 min_pixels: int | None = None, max_pixels: int | None = None, shared_prompt: bool = True):
        self.model = model.eval()
        self.renderer = ConversationRenderer(processing_class, min_pixels=min_pixels, max_pixels=max_pixels)
        self.batch_size = batch_size  # responses per forward pass
        self.source = None  # where the model was loaded from, for provenance()
        # Packs the responses of one prompt into one sequence where the family supports it (see module docstring).
        self.shared_prompt = shared_prompt

    @classmethod
    def from_pretrained(cls, path: str, device: str | None = None, dtype: str | torch.dtype | None = None,
                        attn_implementation: str | None = None, batch_size: int = 8,
                        min_pixels: int | None = None, max_pixels: int | None = None) -> "RewardScorer":
        """bf16 on GPU and fp32 on CPU unless `dtype` says otherwise."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        kwargs = {"dtype": dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = ValueHeadRewardModel.from_pretrained(path, **kwargs).to(device)
        scorer = cls(model, AutoProcessor.from_pretrained(path), batch_size, min_pixels, max_pixels)
        scorer.source = str(path)
        return scorer

    def provenance(self) -> dict:
        """What produces these scores: the model (where it was loaded from, a fingerprint of its weights and value
        head) and every setting that changes a score. Saved beside predictions, so none is reused for another."""
        config = self.model.config.get_text_config()
        return {
            "model": self.source,
            "weights_fingerprint": weights_fingerprint(self.model),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "attn_implementation": config._attn_implementation,
            "min_pixels": self.renderer.min_pixels,
            "max_pixels": self.renderer.max_pixels,
        }

    @torch.no_grad()
    def score(self, items: list[dict], progress: bool = False) -> list[float]:
        """One reward per item, in input order. Items with the same prompt and images go into one packed sequence
        per prompt (up to `batch_size` responses each) where the model supports it; the others are batched as
        plain rows of similar length."""
        scores = [0.0] * len(items)
        groups, rows = self._shared_prompt_groups(items)
        with tqdm(total=len(items), desc="Scoring", disable=not progress) as bar:
            for batch_groups in self._batches(groups, items):
                batch = pack_conversations(self.renderer, [[items[i] for i in group] for group in batch_groups],
                                           video_time_interval(self.model.config))
                indices = [i for group in batch_groups for i in group]
                if batch is None:  # videos the family's packed positions do not cover: plain rows
                    rows += indices
                    continue
                self._forward(batch, indices, scores)
                bar.update(len(indices))
            rows.sort(key=lambda i: _approximate_length(items[i]))
            for start in range(0, len(rows), self.batch_size):
                indices = rows[start:start + self.batch_size]
                self._forward(self.renderer([items[i] for i in indices]), indices, scores)
                bar.update(len(indices))
        return scores

    def _forward(self, batch: dict, indices: list[int], scores: list[float]) -> None:
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        rewards = self.model(**batch).logits.squeeze(-1).float().cpu().tolist()
        for index, reward in zip(indices, rewards):
            scores[index] = reward

    def _shared_prompt_groups(self, items: list[dict]) -> tuple[list[list[int]], list[int]]:
        """Indices of items sharing a prompt and images, in groups of 2 to `batch_size`; and the rest, as rows."""
        if not self.shared_prompt or not supports_packing(self.model):
            return [], list(range(len(items)))
        by_prompt = {}
        for index, item in enumerate(items):
            by_prompt.setdefault(_prompt_key(item), []).append(index)
        groups, rows = [], []
        for indices in by_prompt.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                if len(chunk) > 1:
                    groups.append(chunk)
                else:
                    rows += chunk
        return groups, rows

    def _batches(self, groups: list[list[int]], items: list[dict]):
        """Groups of similar length, at most `batch_size` responses per batch."""
        groups = sorted(groups, key=lambda group: max(_approximate_length(items[i]) for i in group))
        batch, size = [], 0
        for group in groups:
            if batch and size + len(group) > self.batch_size:
                yield batch
                batch, size = [], 0
            batch.append(group)
            size += len(group)
        if batch:
            yield batch

    def rank(self, prompt, responses: list, images: list = ()) -> list[tuple[object, float]]:
        """(response, reward) pairs, best first."""
        scores = self.score([{"images": list(images), "prompt": prompt, "response": r} for r in responses])
        return sorted(zip(responses, scores), key=lambda pair: pair[1], reverse=True)


def _approximate_length(item: dict) -> int:
    return (len(str(item["prompt"])) + len(str(item["response"])) + 1000 * len(item.get("images") or [])
            + 4000 * len(item.get("videos") or []))


def _prompt_key(item: dict) -> str:
    """Items with equal keys share the prompt and its images and videos (compared by content, whatever their form);
    a response's own media are not part of it."""
    placed = place_media(item["prompt"], item["response"], item.get("images") or [], item.get("videos") or [])
    return json.dumps([placed.prompt, [_image_key(image) for image in placed.images[:placed.prompt_images]],
                       [_video_key(video) for video in placed.videos[:placed.prompt_videos]]], sort_keys=True, default=str)


def _video_key(video):
    video = video_source(video)
    if isinstance(video, tuple) and isinstance(video[0], torch.Tensor):  # loaded already: (frames, fps)
        return f"loaded:{video[1]}:{tuple(video[0].shape)}:" + hashlib.sha1(video[0].numpy().tobytes()).hexdigest()
    if isinstance(video, (list, tuple)):
        return [_image_key(frame) for frame in video]
    return _image_key(video)


def _image_key(image) -> str:
    if isinstance(image, dict):  # datasets.Image(decode=False)
        image = image["bytes"] if image.get("bytes") else image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return "bytes:" + hashlib.sha1(image).hexdigest()
    if hasattr(image, "tobytes"):  # a PIL image
        return f"pil:{image.mode}:{image.size}:" + hashlib.sha1(image.tobytes()).hexdigest()
    return f"path:{image}"


def weights_fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """sha256 of every tensor's name, shape, dtype and `samples` values strided across it (the value head whole):
    any two trained models differ in it, and it costs well under a second even for 7B weights on a GPU."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples)][:samples].float().cpu().numpy()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]
