"""One prompt, N responses -> one sequence: the shared prompt once, then every response as a branch.

    [ prompt (image tokens included) | response 1 | response 2 | ... | response N | pad ]

Every branch's positions continue from the end of the prompt, so each branch has exactly the token ids and
positions of its own plain row; the mask built in heads/packing.py lets a branch see the prompt and itself only.
Each image is processed once per prompt, and each reward is read at the last token of its branch. A preference
pair is the case N = 2 (branch 1 the chosen answer, branch 2 the rejected one); scoring best-of-N is the general case.
"""

import logging
from itertools import groupby

import torch

from .conversation import ConversationRenderer
from .pair_collator import PairCollator

logger = logging.getLogger(__name__)

# Segment ids: 0 the prompt, 1..N the branches (a pair: 1 chosen, 2 rejected), -1 padding.
PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1
# Families whose backbone takes explicit (m)RoPE position ids and a 4D mask, and whose positions pack_pairs computes.
PACKED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen2")
# The language model's attention implementations that run a packed sequence (heads/attention.py): sdpa with a dense
# mask, and the shared-prefix functions that --attn_implementation flex_attention / flash_attention_2 load.
SHARED_PREFIX_FLEX, SHARED_PREFIX_VARLEN = "shared_prefix_flex", "shared_prefix_varlen"
PACKED_ATTENTION = ("sdpa", SHARED_PREFIX_FLEX, SHARED_PREFIX_VARLEN)


def shared_prefix_length(*rows: list[int]) -> int:
    """Tokens all rows have in common at the start, leaving each branch at least its last token."""
    n = 0
    for tokens in zip(*rows):
        if any(token != tokens[0] for token in tokens):
            break
        n += 1
    return min(n, *(len(row) - 1 for row in rows))


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


def pack_branches(groups: list[tuple[list[int], list[list[int]]]], pad_token_id: int, mrope: bool,
                  image_grids=None, image_token_id: int | None = None, merge_size: int = 2) -> dict:
    """(prompt, [branch 1, ..., branch N]) token ids per group -> the packed tensors (right padded).

    `position_ids` is [3, B, L] with mRoPE (image tokens get 3D positions), else [B, L]. `branch_row` and
    `branch_index` say where each branch's last token is, group by group and branch by branch.
    """
    grids = iter(image_grids if image_grids is not None else [])
    length = max(len(prompt) + sum(map(len, branches)) for prompt, branches in groups)
    input_ids = torch.full((len(groups), length), pad_token_id)
    segment_ids = torch.full((len(groups), length), PAD)
    position_ids = torch.zeros((3, len(groups), length), dtype=torch.long)
    branch_row, branch_index = [], []
    for row, (prompt, branches) in enumerate(groups):
        end = len(prompt) + sum(map(len, branches))
        input_ids[row, :end] = torch.tensor(prompt + [token for branch in branches for token in branch])
        segment_ids[row, :end] = torch.tensor(
            [PROMPT] * len(prompt) + [k for k, branch in enumerate(branches, start=1) for _ in branch])
        prompt_positions, start = mrope_positions(prompt, grids, image_token_id, merge_size)
        # Every branch continues from the end of the prompt, as it does in its own plain row.
        answers = start + torch.cat([torch.arange(len(branch)) for branch in branches])
        position_ids[:, row, :end] = torch.cat([prompt_positions, answers.expand(3, -1)], dim=1)
        last = len(prompt) - 1
        for branch in branches:
            last += len(branch)
            branch_row.append(row)
            branch_index.append(last)
    return {
        "input_ids": input_ids,
        "attention_mask": (segment_ids != PAD).long(),  # real tokens: what TRL and the trainer count
        "segment_ids": segment_ids,
        "position_ids": position_ids if mrope else position_ids[0],  # text-only models take 1D positions
        "branch_row": torch.tensor(branch_row),
        "branch_index": torch.tensor(branch_index),
    }


def pack_pairs(pairs: list[tuple[list[int], list[int], list[int]]], pad_token_id: int, mrope: bool,
               image_grids=None, image_token_id: int | None = None, merge_size: int = 2) -> dict:
    """(prompt, chosen, rejected) token ids per pair -> `pack_branches` with N = 2, the rewards ordered as TRL's
    RewardTrainer wants them: every chosen one, then every rejected one."""
    batch = pack_branches([(prompt, [chosen, rejected]) for prompt, chosen, rejected in pairs], pad_token_id, mrope,
                          image_grids=image_grids, image_token_id=image_token_id, merge_size=merge_size)
    return chosen_then_rejected(batch)


def chosen_then_rejected(batch: dict) -> dict:
    """Reorders the branches of a packed pair batch from (chosen, rejected) per pair to every chosen branch, then
    every rejected one: TRL's RewardTrainer order."""
    pairs = batch["input_ids"].shape[0]
    order = torch.cat([torch.arange(0, 2 * pairs, 2), torch.arange(1, 2 * pairs, 2)])
    batch["branch_row"], batch["branch_index"] = batch["branch_row"][order], batch["branch_index"][order]
    return batch


def pack_conversations(renderer: ConversationRenderer, groups: list[tuple[list, object, list]]) -> dict | None:
    """(images, prompt, [response 1, ..., response N]) per group -> one packed batch (`pack_branches`), each
    image processed once. The rows are rendered and tokenized as `renderer` renders them one by one; the shared
    prompt is the tokens all N rows have in common. None when an image sits inside a response (it is not shared):
    the caller then uses plain rows."""
    texts = [[renderer.render_text(prompt, response, len(images)) for response in responses]
             for images, prompt, responses in groups]
    flat = renderer.tokenizer([text for group in texts for text in group], add_special_tokens=False)["input_ids"]
    rows, start = [], 0  # one placeholder per image, not expanded
    for group in texts:
        rows.append(flat[start:start + len(group)])
        start += len(group)
    image_token_id = getattr(renderer.processing_class, "image_token_id", None)
    splits = [shared_prefix_length(*group) for group in rows]
    if any(image_token_id in row[split:] for group, split in zip(rows, splits) for row in group):
        return None
    images = renderer.load_images([{"images": images} for images, _, _ in groups])

    vision = dict(renderer.image_processor(images=images, return_tensors="pt")) if images else {}
    # The processor's rule: an image becomes grid_t * grid_h * grid_w / merge_size**2 placeholder tokens.
    merge_size = getattr(renderer.image_processor, "merge_size", 1)
    counts = iter((vision["image_grid_thw"].prod(-1) // merge_size**2).tolist() if images else [])
    packed = []
    for group, split in zip(rows, splits):
        prompt = []
        for token in group[0][:split]:
            prompt += [token] * (next(counts) if token == image_token_id else 1)
        packed.append((prompt, [row[split:] for row in group]))
    batch = pack_branches(
        packed, renderer.tokenizer.pad_token_id, mrope=renderer.image_processor is not None,
        image_grids=vision.get("image_grid_thw"), image_token_id=image_token_id, merge_size=merge_size,
    )
    batch.update(vision)
    return batch


class PackedPairCollator(PairCollator):
    """Collates rows of the preference schema into one packed sequence per pair (see `pack_conversations`).

    The rows are rendered and tokenized exactly as PairCollator does; the shared prompt is the tokens the chosen
    and the rejected row have in common. A batch in which an image sits inside an answer (so it is not shared)
    falls back to the plain two-row batch, which the model also accepts.
    """

    def __call__(self, examples: list[dict]) -> dict:
        batch = pack_conversations(self, [(e["images"], e["prompt"], [e["chosen"], e["rejected"]]) for e in examples])
        if batch is None:
            return super().__call__(examples)
        chosen_then_rejected(batch)
        if examples and examples[0].get("margin") is not None:
            batch["margin"] = torch.tensor([float(example["margin"]) for example in examples])
        return batch


def supports_packing(model) -> bool:
    config = model.config
    return config.model_type in PACKED_MODEL_TYPES and config.get_text_config()._attn_implementation in PACKED_ATTENTION


def pair_collator_for(model, processing_class, pack_pairs: bool = True,
                      min_pixels: int | None = None, max_pixels: int | None = None) -> PairCollator:
    """The packed collator where the model supports it (and `pack_pairs`), else the plain two-row one."""
    if pack_pairs and supports_packing(model):
        logger.info("Pair layout: packed, one sequence per pair with a shared prompt")
        return PackedPairCollator(processing_class, min_pixels, max_pixels)
    if pack_pairs:
        logger.info("Pair layout: two rows per pair (packing needs one of %s with sdpa, flex_attention or "
                    "flash_attention_2; got %s with %s)",
                    PACKED_MODEL_TYPES, model.config.model_type, model.config.get_text_config()._attn_implementation)
    return PairCollator(processing_class, min_pixels, max_pixels)
