"""Preference pairs -> one batch: the chosen rows first, then the rejected rows (TRL's RewardTrainer order)."""

import torch

from .conversation import ConversationRenderer


def side_item(example: dict, side: str) -> dict:
    """One side of a pair as the renderer takes it: the prompt's media, then the response's own (see
    collators/preference_data.py for the columns)."""
    return {"images": list(example.get("images") or []) + list(example.get(f"{side}_images") or []),
            "videos": list(example.get("videos") or []) + list(example.get(f"{side}_videos") or []),
            "prompt": example["prompt"], "response": example[side]}


class PairCollator(ConversationRenderer):
    """Collates rows of the preference schema (images, videos, prompt, chosen, rejected, each response's own images
    and videos, optional margin).

    Rows 0..B-1 of the batch are the chosen responses, rows B..2B-1 the rejected ones; each row carries the
    prompt's media and its response's own (the plain two-row layout of TRL and LLaMA-Factory). Image, video and
    text-only pairs mix freely.
    """

    def __call__(self, examples: list[dict]) -> dict:
        items = [side_item(example, side) for side in ("chosen", "rejected") for example in examples]
        batch = super().__call__(items)
        if examples and examples[0].get("margin") is not None:
            batch["margin"] = torch.tensor([float(example["margin"]) for example in examples])
        return batch
