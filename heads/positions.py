"""Qwen2-VL / Qwen2.5-VL mRoPE positions by Qwen's own rule, whatever the installed transformers does.

After an image or a video, the text starts at the largest position the medium took + 1: past its largest side for an
image, and for a video also past its last temporal position ((t - 1) * interval, where Qwen2.5-VL's interval is
tokens_per_second * seconds per temporal patch). That is the rule of Qwen's original code, of transformers before
5.3 and of vLLM. transformers 5.3 and later (5.23 included) start the text after a video at its start + max(h, w)
only (`current_pos += max(grid_thw[1], grid_thw[2]) // spatial_merge_size` in `get_rope_index`): wherever a video
reaches further in time than in space, the text after it sits elsewhere than Qwen's code puts it, and a vLLM export
would serve other rewards than ours. Images are placed the same by both rules.

`use_qwen_vision_positions(model)` gives a loaded model's backbone a `get_rope_index` built on the packed collator's
`mrope_positions`: plain rows, packed rows, scoring and generation all place media by one rule.
"""

import types
from itertools import repeat

import torch
from torch import nn

from collators.packed_pair_collator import mrope_positions, video_time_interval

# The families whose get_rope_index this replaces; Qwen3-VL splits a video into one-frame runs with timestamps in
# the text, so its rule and Qwen's agree already.
QWEN_ROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
TEXT, IMAGE, VIDEO = 0, 1, 2  # the processors' mm_token_type_ids


def qwen_rope_index(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, image_grid_thw=None,
                    video_grid_thw=None, second_per_grid_ts=None, attention_mask=None, **kwargs):
    """transformers' `get_rope_index` signature and outputs ([3, B, L] positions, [B, 1] deltas for generation),
    positions by Qwen's rule. Grids are taken in order across the batch, as transformers takes them."""
    interval = video_time_interval(self.config)
    seconds = second_per_grid_ts if second_per_grid_ts is not None else repeat(1.0)
    vision = {IMAGE: zip(image_grid_thw if image_grid_thw is not None else [], repeat(1)),
              VIDEO: zip(video_grid_thw if video_grid_thw is not None else [], map(interval, seconds))}
    merge_size = self.config.vision_config.spatial_merge_size
    position_ids = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
    deltas = []
    for row, types_of_row in enumerate(mm_token_type_ids):
        real = (attention_mask[row].bool() if attention_mask is not None
                else torch.ones_like(types_of_row, dtype=torch.bool))
        positions, _ = mrope_positions(types_of_row[real].tolist(), vision, merge_size)
        position_ids[:, row, real] = positions.to(position_ids)
        deltas.append(int(positions.max()) + 1 - positions.shape[1])
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def use_qwen_vision_positions(model: nn.Module) -> None:
    """Gives the Qwen2-VL / Qwen2.5-VL model inside `model` (a *ForConditionalGeneration or its inner model) Qwen's
    get_rope_index; other families are left as they are."""
    inner = getattr(model, "model", model)
    if getattr(inner.config, "model_type", None) in QWEN_ROPE_MODEL_TYPES and hasattr(inner, "get_rope_index"):
        inner.get_rope_index = types.MethodType(qwen_rope_index, inner)
