"""Preference pairs -> one sequence per pair: the shared prompt once, then the chosen and the rejected answer.

    [ prompt (image tokens included) | chosen answer | rejected answer | pad ]

Both answers' positions continue from the end of the prompt, so each branch has exactly the token ids and
positions of its row in the plain two-row batch; the mask built in heads/packing.py keeps the rejected answer
from seeing the chosen one. Each image is processed once per pair, and each reward is read at the last token
of its branch.
"""

import logging
from itertools import groupby

import torch

from .pair_collator import PairCollator

logger = logging.getLogger(__name__)

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
# Families whose backbone takes explicit (m)RoPE position ids and a 4D mask, and whose positions pack_pairs computes.
PACKED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen2")


def shared_prefix_length(a: list[int], b: list[int]) -> int:
    """Tokens the two rows have in common at the start, leaving each branch at least its last token."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return min(n, len(a) - 1, len(b) - 1)


def mrope_positions(ids: list[int], image_grids, image_token_id: int | None,
                    merge_size: int) -> tuple[torch.Tensor, int]:
    """[3, len(ids)] (temporal, height, width) positions as Qwen-VL's get_rope_index gives for still images,
    and the next free position. `image_grids` yields one (t, h, w) patch grid per run of image tokens."""
    parts, position = [], 0
    for is_image, run in groupby(ids, key=lambda token: token == image_token_id):
        n = len(list(run))
        if not is_image:
            parts.append(torch.arange(n).expand(3, n) + position)
            position += n
            continue
        t, h, w = (int(size) for size in next(image_grids))
        h, w = h // merge_size, w // merge_size
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        parts.append(grid.reshape(3, -1) + position)
        position += max(h, w)  # the text after an image starts past its largest side, not past its token count
    return torch.cat(parts, dim=1), position


def pack_pairs(pairs: list[tuple[list[int], list[int], list[int]]], pad_token_id: int, mrope: bool,
               image_grids=None, image_token_id: int | None = None, merge_size: int = 2) -> dict:
    """(prompt, chosen, rejected) token ids per pair -> the packed tensors (right padded).

    `position_ids` is [3, B, L] with mRoPE (image tokens get 3D positions), else [B, L].
    """
    grids = iter(image_grids if image_grids is not None else [])
    length = max(len(p) + len(c) + len(r) for p, c, r in pairs)
    input_ids = torch.full((len(pairs), length), pad_token_id)
    segment_ids = torch.full((len(pairs), length), PAD)
    position_ids = torch.zeros((3, len(pairs), length), dtype=torch.long)
    chosen_index, rejected_index = [], []
    for row, (prompt, chosen, rejected) in enumerate(pairs):
        end = len(prompt) + len(chosen) + len(rejected)
        input_ids[row, :end] = torch.tensor(prompt + chosen + rejected)
        segment_ids[row, :end] = torch.tensor([PROMPT] * len(prompt) + [CHOSEN] * len(chosen)
                                              + [REJECTED] * len(rejected))
        prompt_positions, start = mrope_positions(prompt, grids, image_token_id, merge_size)
        # Both answers continue from the end of the prompt, as each does in its own plain row.
        answers = start + torch.cat([torch.arange(len(chosen)), torch.arange(len(rejected))])
        position_ids[:, row, :end] = torch.cat([prompt_positions, answers.expand(3, -1)], dim=1)
        chosen_index.append(len(prompt) + len(chosen) - 1)
        rejected_index.append(end - 1)
    return {
        "input_ids": input_ids,
        "attention_mask": (segment_ids != PAD).long(),  # real tokens: what TRL and the trainer count
        "segment_ids": segment_ids,
        "position_ids": position_ids if mrope else position_ids[0],  # text-only models take 1D positions
        "chosen_index": torch.tensor(chosen_index),
        "rejected_index": torch.tensor(rejected_index),
    }


class PackedPairCollator(PairCollator):
    """Collates rows of the preference schema into one packed sequence per pair (see `pack_pairs`).

    The rows are rendered and tokenized exactly as PairCollator does; the shared prompt is the tokens the chosen
    and the rejected row have in common. A batch in which an image sits inside an answer (so it is not shared)
    falls back to the plain two-row batch, which the model also accepts.
    """

    def __call__(self, examples: list[dict]) -> dict:
        texts = [self.render_text(e["prompt"], e[side], len(e["images"]))
                 for e in examples for side in ("chosen", "rejected")]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # one placeholder per image, not expanded
        image_token_id = getattr(self.processing_class, "image_token_id", None)
        splits = [shared_prefix_length(ids[2 * i], ids[2 * i + 1]) for i in range(len(examples))]
        if any(image_token_id in ids[2 * i + j][split:] for i, split in enumerate(splits) for j in (0, 1)):
            return super().__call__(examples)
        images = self.load_images(examples)

        vision = dict(self.image_processor(images=images, return_tensors="pt")) if images else {}
        # The processor's rule: an image becomes grid_t * grid_h * grid_w / merge_size**2 placeholder tokens.
        merge_size = getattr(self.image_processor, "merge_size", 1)
        counts = iter((vision["image_grid_thw"].prod(-1) // merge_size**2).tolist() if images else [])
        pairs = []
        for i, split in enumerate(splits):
            prompt = []
            for token in ids[2 * i][:split]:
                prompt += [token] * (next(counts) if token == image_token_id else 1)
            pairs.append((prompt, ids[2 * i][split:], ids[2 * i + 1][split:]))
        batch = pack_pairs(
            pairs, self.tokenizer.pad_token_id, mrope=self.image_processor is not None,
            image_grids=vision.get("image_grid_thw"), image_token_id=image_token_id, merge_size=merge_size,
        )
        batch.update(vision)
        if examples and examples[0].get("margin") is not None:
            batch["margin"] = torch.tensor([float(example["margin"]) for example in examples])
        return batch


def supports_packing(model) -> bool:
    config = model.config
    return config.model_type in PACKED_MODEL_TYPES and config.get_text_config()._attn_implementation == "sdpa"


def pair_collator_for(model, processing_class, pack_pairs: bool = True,
                      min_pixels: int | None = None, max_pixels: int | None = None) -> PairCollator:
    """The packed collator where the model supports it (and `pack_pairs`), else the plain two-row one."""
    if pack_pairs and supports_packing(model):
        logger.info("Pair layout: packed, one sequence per pair with a shared prompt")
        return PackedPairCollator(processing_class, min_pixels, max_pixels)
    if pack_pairs:
        logger.info("Pair layout: two rows per pair (packing needs one of %s with sdpa attention; got %s with %s)",
                    PACKED_MODEL_TYPES, model.config.model_type, model.config.get_text_config()._attn_implementation)
    return PairCollator(processing_class, min_pixels, max_pixels)
