"""The packed forward: one sequence per prompt (prompt | branch 1 | ... | branch N), one reward per branch.
A preference pair is N = 2 (prompt | chosen | rejected).

Each branch sees the prompt and itself. The model's attention implementation says how (heads/attention.py):
- sdpa, the reference: a [B, 1, L, L] boolean mask from three comparisons of segment ids (L^2 bytes: 2 MB per pair
  at 1.5k tokens, 0.27 GB at 16k), which transformers hands to the kernel as is. The kernel computes the masked
  scores too, and sdpa never picks its flash kernel for an arbitrary mask.
- shared_prefix_flex (--attn_implementation flex_attention): a FlexAttention BlockMask from the segment ids.
- shared_prefix_varlen (--attn_implementation flash_attention_2): flash-attn's varlen kernel with the prompt once
  in the queries and once per branch in the keys.
The (m)RoPE positions come from the collator (every branch continues from the prompt), never from a mask.
"""

import torch
from torch import nn

from collators.packed_pair_collator import PACKED_ATTENTION, PROMPT, SHARED_PREFIX_FLEX, SHARED_PREFIX_VARLEN

from .attention import shared_prefix_block_mask, varlen_layout


def shared_prompt_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L], True where query i may attend key j: causal, and the key is in the prompt or in the
    query's own branch. So each answer sees the prompt but no other answer; padding sees the
    prompt and other padding (no fully masked row, whose softmax would be NaN) and is never seen by real tokens."""
    length = segment_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    return (causal & ((key == PROMPT) | (key == query)))[:, None]


def shared_prompt_rewards(backbone: nn.Module, v_head: nn.Module, input_ids, segment_ids, position_ids,
                          branch_row, branch_index, use_cache=False, **vision_inputs) -> torch.Tensor:
    """Rewards [K, 1], one per branch in the order of `branch_row` / `branch_index` (for a pair batch: the chosen
    ones, then the rejected ones, TRL's RewardTrainer order)."""
    attention = backbone.config.get_text_config()._attn_implementation
    if attention not in PACKED_ATTENTION:
        raise ValueError(f"packed sequences need attn_implementation sdpa, flex_attention or flash_attention_2 "
                         f"(got {attention!r}); load the model with one of them or train with --pack_pairs false")
    if "sliding_attention" in getattr(backbone.config.get_text_config(), "layer_types", ()):
        raise ValueError("packed sequences do not support sliding-window attention layers; use --pack_pairs false")
    if attention == SHARED_PREFIX_FLEX:
        attention_inputs = {"attention_mask": shared_prefix_block_mask(segment_ids)}
    elif attention == SHARED_PREFIX_VARLEN:  # reaches every attention layer through the models' **kwargs
        attention_inputs = {"attention_mask": None, "shared_prefix_layout": varlen_layout(segment_ids)}
    else:
        attention_inputs = {"attention_mask": shared_prompt_mask(segment_ids)}
    outputs = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache, **attention_inputs,
                       **vision_inputs)
    hidden = outputs.last_hidden_state
    last_hidden = hidden[branch_row.to(hidden.device), branch_index.to(hidden.device)]
    return v_head(last_hidden).unsqueeze(-1)
