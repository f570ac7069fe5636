"""One prompt, N responses -> one sequence: the shared prompt once, then every response as a branch.

    [ prompt (its image and video tokens included) | response 1 | response 2 | ... | response N | pad ]

Every branch's positions continue from the end of the prompt, so each branch has exactly the token ids and
positions of its own plain row; the mask built in heads/packing.py lets a branch see the prompt and itself only.
The prompt's images and videos are processed once, each response's own media sit in its branch, and each reward is
read at the last token of its branch. A preference
pair is the case N = 2 (branch 1 the chosen answer, branch 2 the rejected one); scoring best-of-N is the general case.
"""

import logging
from itertools import groupby, repeat

import torch

from .conversation import ConversationRenderer
from .pair_collator import PairCollator, side_item

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


def mrope_positions(ids: list[int], vision: dict, merge_size: int, start: int = 0) -> tuple[torch.Tensor, int]:
    """[3, len(ids)] (temporal, height, width) positions as Qwen's get_rope_index gives them from `start` on, and
    the next free position. `vision` maps each vision token id (image, video) to an iterator over its runs: one
    ((t, h, w) patch grid, temporal interval) per run of that token, in order. (heads/positions.py gives the models
    the same rule through token types: `ids` may be any keys.)"""
    parts, position = [], start
    for token, run in groupby(ids, key=lambda token: token if token in vision else None):
        n = len(list(run))
        if token is None:
            parts.append(torch.arange(n).expand(3, n) + position)
            position += n
            continue
        (t, h, w), interval = next(vision[token])
        t, h, w = int(t), int(h) // merge_size, int(w) // merge_size
        grid = torch.stack(torch.meshgrid((torch.arange(t) * interval).long(), torch.arange(h), torch.arange(w),
                                          indexing="ij"))
        parts.append(grid.reshape(3, -1) + position)
        # The text after an image or video starts at its largest position + 1 (not its token count): past its largest
        # side for an image, past its last temporal position too for a video (Qwen's code and vLLM; heads/positions.py).
        position = int(parts[-1].max()) + 1
    empty = torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(parts, dim=1) if parts else empty, position


def pack_branches(groups: list[tuple[list[int], list[list[int]]]], pad_token_id: int, mrope: bool,
                  image_grids=None, image_token_id: int | None = None, merge_size: int = 2,
                  video_grids=None, video_token_id: int | None = None, video_intervals=None) -> dict:
    """(prompt, [branch 1, ..., branch N]) token ids per group -> the packed tensors (right padded).

    `position_ids` is [3, B, L] with mRoPE (image and video tokens get 3D positions, in the order of `image_grids` /
    `video_grids` through the prompts and branches; `video_intervals` spaces each video's temporal patches), else
    [B, L]. `branch_row` and `branch_index` say where each branch's last token is, group by group and branch by branch.
    """
    vision = {image_token_id: zip(image_grids if image_grids is not None else [], repeat(1)),
              video_token_id: zip(video_grids if video_grids is not None else [],
                                  video_intervals if video_intervals is not None else [])}
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
        positions, start = mrope_positions(prompt, vision, merge_size)
        # Every branch continues from the end of the prompt, as it does in its own plain row.
        positions = [positions] + [mrope_positions(branch, vision, merge_size, start)[0] for branch in branches]
        position_ids[:, row, :end] = torch.cat(positions, dim=1)
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


def video_time_interval(config):
    """seconds per temporal patch -> temporal positions between a video's temporal patches, as the family's
    get_rope_index spaces them; None for families whose video positions are not computed here (Qwen3-VL writes
    timestamps into the text): their video rows are scored as plain rows."""
    if config.model_type == "qwen2_5_vl":
        return lambda seconds: config.vision_config.tokens_per_second * seconds
    if config.model_type == "qwen2_vl":
        return lambda seconds: 1
    return None


def _nth(row: list[int], token: int | None, n: int) -> int:
    """Index of the n-th (from 0) `token` in `row`, or len(row)."""
    seen = -1
    for index, value in enumerate(row):
        seen += value == token
        if seen == n:
            return index
    return len(row)


def pack_conversations(renderer: ConversationRenderer, groups: list[list[dict]], video_interval=None) -> dict | None:
    """Groups of items sharing a prompt and its media ({"images", "videos", "prompt", "response"} each, as the
    renderer takes them) -> one packed batch (`pack_branches`), the prompt's images and videos processed once and
    each response's own in its branch. The rows are rendered and tokenized as `renderer` renders them one by one;
    the shared prompt is the tokens all rows of a group have in common, up to the first medium of a response.
    `video_interval` is `video_time_interval(config)`; None when videos cannot be packed (the caller then uses plain
    rows, as this returns None)."""
    rendered = [[renderer.render(item) for item in group] for group in groups]
    if video_interval is None and any(placed.videos for group in rendered for _, placed in group):
        return None
    flat = renderer.tokenizer([text for group in rendered for text, _ in group], add_special_tokens=False)["input_ids"]
    rows, start = [], 0  # one placeholder per image or video, not expanded
    for group in rendered:
        rows.append(flat[start:start + len(group)])
        start += len(group)
    processor = renderer.processing_class
    image_token_id = getattr(processor, "image_token_id", None)
    video_token_id = getattr(processor, "video_token_id", None)
    splits, shared = [], []  # where each group's branches start; how many images and videos its prompt holds
    for group, token_rows in zip(rendered, rows):
        split = min(shared_prefix_length(*token_rows),
                    *(_nth(row, image_token_id, placed.prompt_images) for row, (_, placed) in zip(token_rows, group)),
                    *(_nth(row, video_token_id, placed.prompt_videos) for row, (_, placed) in zip(token_rows, group)))
        splits.append(split)
        shared.append((token_rows[0][:split].count(image_token_id), token_rows[0][:split].count(video_token_id)))
    # Media in the packed sequence's order: a group's prompt media once, then each branch's own.
    images, videos = [], []
    for group, (n_images, n_videos) in zip(rendered, shared):
        images += group[0][1].images[:n_images]
        videos += group[0][1].videos[:n_videos]
        for _, placed in group:
            images += placed.images[n_images:]
            videos += placed.videos[n_videos:]
    vision = {}
    if images:
        vision.update(renderer.image_processor(images=renderer.load_images([{"images": images}]), return_tensors="pt"))
    intervals = []
    if videos:
        inputs = renderer.vision_inputs([], videos)
        vision.update(renderer.video_processor(**inputs, return_tensors="pt"))
        patch = renderer.video_processor.temporal_patch_size
        intervals = [video_interval(patch / metadata["fps"]) for metadata in inputs["video_metadata"]]
    # The processor's rule: an image or a video becomes grid_t * grid_h * grid_w / merge_size**2 placeholder tokens.
    merge_size = getattr(renderer.image_processor or renderer.video_processor, "merge_size", 1)
    counts = {token: iter((vision[key].prod(-1) // merge_size**2).tolist() if key in vision else [])
              for token, key in ((image_token_id, "image_grid_thw"), (video_token_id, "video_grid_thw"))}

    def expand(tokens: list[int]) -> list[int]:
        expanded = []
        for token in tokens:
            expanded += [token] * (next(counts[token]) if token in counts else 1)
        return expanded

    packed = []
    for token_rows, split in zip(rows, splits):
        prompt = expand(token_rows[0][:split])
        packed.append((prompt, [expand(row[split:]) for row in token_rows]))
    batch = pack_branches(
        packed, renderer.tokenizer.pad_token_id, mrope=renderer.image_processor is not None,
        image_grids=vision.get("image_grid_thw"), image_token_id=image_token_id, merge_size=merge_size,
        video_grids=vision.get("video_grid_thw"), video_token_id=video_token_id, video_intervals=intervals,
    )
    batch.update(vision)
    return batch


class PackedPairCollator(PairCollator):
    """Collates rows of the preference schema into one packed sequence per pair (see `pack_conversations`).

    The rows are rendered and tokenized exactly as PairCollator does; the shared prompt is the tokens the chosen
    and the rejected row have in common, with the prompt's images and videos; each response's own media go in its
    branch. `video_interval` (`video_time_interval` of the model's config) places video frames; without it a batch
    with videos falls back to the plain two-row batch, which the model also accepts.
    """

    def __init__(self, processing_class, min_pixels: int | None = None, max_pixels: int | None = None,
                 video_interval=None):
        super().__init__(processing_class, min_pixels, max_pixels)
        self.video_interval = video_interval

    def __call__(self, examples: list[dict]) -> dict:
        groups = [[side_item(example, side) for side in ("chosen", "rejected")] for example in examples]
        batch = pack_conversations(self, groups, self.video_interval)
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
        return PackedPairCollator(processing_class, min_pixels, max_pixels, video_time_interval(model.config))
    if pack_pairs:
        logger.info("Pair layout: two rows per pair (packing needs one of %s with sdpa, flex_attention or "
                    "flash_attention_2; got %s with %s)",
                    PACKED_MODEL_TYPES, model.config.model_type, model.config.get_text_config()._attn_implementation)
    return PairCollator(processing_class, min_pixels, max_pixels)
