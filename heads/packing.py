"""The packed forward: one sequence per prompt (prompt | branch 1 | ... | branch N), one reward per branch.
A preference pair is N = 2 (prompt | chosen | rejected).

Attention path: sdpa with a 4D boolean mask. The mask is [B, 1, L, L] booleans from three comparisons of
segment ids (L^2 bytes: 2 MB per pair at L = 1.5k, 16 MB at 4k, nothing next to the activations); transformers
hands a 4D mask to the kernel as is, and sdpa takes it on CPU and GPU (the memory-efficient kernel), under
gradient checkpointing, with no compilation and no extra package. The price: the kernel computes the masked
scores too (the upper triangle and the blocks between branches). Flex attention would skip those blocks but
needs torch.compile for every new shape; flash-attn varlen could too (prompt + chosen as one causal sequence,
the rejected queries against the gathered prompt + rejected keys with bottom-right causal), but needs flash-attn
and a custom attention function. At 1.5k tokens the full-square attention is ~5% of a 7B model's FLOPs, so the
simple mask is kept.
"""

import torch
from torch import nn

from collators.packed_pair_collator import PROMPT


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
    if attention != "sdpa":
        raise ValueError(f"packed sequences need attn_implementation='sdpa' (got {attention!r}); "
                         "load the model with sdpa or train with --pack_pairs false")
    outputs = backbone(input_ids=input_ids, attention_mask=shared_prompt_mask(segment_ids),
                       position_ids=position_ids, use_cache=use_cache, **vision_inputs)
    hidden = outputs.last_hidden_state
    last_hidden = hidden[branch_row.to(hidden.device), branch_index.to(hidden.device)]
    return v_head(last_hidden).unsqueeze(-1)
