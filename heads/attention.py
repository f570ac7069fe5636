"""Shared-prefix attention without an L x L mask: FlexAttention block masks and flash-attn varlen, registered with
transformers' AttentionInterface (the model code is not touched).

A packed sequence is `prompt | branch 1 | ... | branch N` (collators/packed_pair_collator.py); each branch sees the
prompt and itself, causally. Three implementations compute it, chosen by the model's `attn_implementation`:

    sdpa                   a dense [B, 1, L, L] boolean mask (heads/packing.py): the reference, O(L^2) memory
    shared_prefix_flex     a FlexAttention BlockMask built from the segment ids in O((L / 128)^2) 32-bit indices
                           (0.5 MB at 32k tokens, where the dense mask is 1 GB); on GPU torch's compiled flex kernel,
                           which skips the masked blocks. torch has no FlexAttention backward on CPU, so on CPU the
                           same BlockMask runs as a block-sparse loop of sdpa calls, one checkpointed query block at
                           a time (memory linear in L).
    shared_prefix_varlen   flash-attn's varlen kernel on the prefix-once / duplicated-KV layout of flash-preference:
                           queries are every real token once (prompt + branch 1 as one sequence, then each later
                           branch alone), keys and values repeat the prompt before each later branch, with separate
                           cu_seqlens_q / cu_seqlens_k and bottom-right causal alignment. Index tensors only: O(L).
                           On CPU the kernel is a torch reference with flash_attn_varlen_func's signature.

`--attn_implementation flex_attention` loads the language model with `shared_prefix_flex` and
`flash_attention_2` with `shared_prefix_varlen` (`load_attention`); the vision tower keeps its own kernel (sdpa, or
flash-attn when asked for). Plain rows (no packing) run through the same functions, as one segment per row.
"""

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from collators.packed_pair_collator import PAD, PROMPT, SHARED_PREFIX_FLEX, SHARED_PREFIX_VARLEN

BLOCK_SIZE = 128  # FlexAttention's default sparse block
# What --attn_implementation asks for -> what the language model runs.
LANGUAGE_MODEL_ATTENTION = {"flex_attention": SHARED_PREFIX_FLEX, "flash_attention_2": SHARED_PREFIX_VARLEN}
FLASH_ATTN_INSTALL = "pip install flash-attn==2.8.3.post2 --no-build-isolation"  # the version requirements.txt names


def segments_from_padding(attention_mask: torch.Tensor | None, batch_size: int, length: int, device) -> torch.Tensor:
    """Plain rows as segment ids: every real token in the prompt segment (so attention is plainly causal), padding
    apart, on either side."""
    if attention_mask is None:
        return torch.full((batch_size, length), PROMPT, device=device)
    return torch.where(attention_mask[:, -length:].bool(), PROMPT, PAD).to(device)


def shared_prefix_mask_mod(segment_ids: torch.Tensor):
    """FlexAttention's mask_mod of the dense mask in heads/packing.py: causal, and the key is in the prompt or in the
    query's own segment. `segment_ids` is padded with PAD to whole blocks, so every index the kernel asks is in range."""

    def mask_mod(batch, head, query, key):
        key_segment = segment_ids[batch, key]
        return (query >= key) & ((key_segment == PROMPT) | (key_segment == segment_ids[batch, query]))

    return mask_mod


def _block_table(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Q, K] booleans -> BlockMask's (num_blocks [B, 1, Q], indices [B, 1, Q, K]): the True blocks first."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None], indices[:, None]


def shared_prefix_block_mask(segment_ids: torch.Tensor) -> BlockMask:
    """A BlockMask for `segment_ids` [B, L], classified block by block from each block's lowest and highest segment
    id (never an L x L tensor). A block is full when every pair in it may attend (causal, and the keys all prompt or
    all the queries' one segment); partial blocks are masked inside by the mask_mod, so over-counting them costs
    time, never correctness."""
    batch, length = segment_ids.shape
    blocks = math.ceil(length / BLOCK_SIZE)
    padded = F.pad(segment_ids, (0, blocks * BLOCK_SIZE - length), value=PAD)
    per_block = padded.view(batch, blocks, BLOCK_SIZE)
    low, high = per_block.min(-1).values, per_block.max(-1).values
    q_low, q_high = low[:, :, None], high[:, :, None]
    k_low, k_high = low[:, None, :], high[:, None, :]
    index = torch.arange(blocks, device=segment_ids.device)
    causal_any = index[None, :, None] >= index[None, None, :]
    causal_full = index[None, :, None] > index[None, None, :]
    segment_any = ((k_low <= PROMPT) & (k_high >= PROMPT)) | (torch.maximum(k_low, q_low) <= torch.minimum(k_high, q_high))
    segment_full = (k_low == k_high) & ((k_low == PROMPT) | ((q_low == q_high) & (q_low == k_low)))
    full = causal_full & segment_full
    partial = causal_any & segment_any & ~full
    kv_num_blocks, kv_indices = _block_table(partial)
    full_kv_num_blocks, full_kv_indices = _block_table(full)
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                                    BLOCK_SIZE=BLOCK_SIZE, mask_mod=shared_prefix_mask_mod(padded),
                                    seq_lengths=(length, length))


def _attend_block(query, key, value, key_index, query_index, mask_mod, batch, scale):
    allowed = mask_mod(batch, 0, query_index[:, None], key_index[None, :])
    return F.scaled_dot_product_attention(query, key[:, :, key_index], value[:, :, key_index], attn_mask=allowed,
                                          scale=scale, enable_gqa=True)


def block_sparse_attention(query, key, value, block_mask: BlockMask, scale: float | None = None) -> torch.Tensor:
    """What flex_attention computes, as sdpa over each query block's listed key blocks. Each block is checkpointed
    with only its indices saved, so memory stays linear in L under backward. [B, H, L, D] in and out."""
    batch, _, length, _ = query.shape
    size = block_mask.BLOCK_SIZE[1]
    output = []
    for b in range(batch):
        rows = []
        for q_block in range(math.ceil(length / size)):
            kv_blocks = [block_mask.kv_indices[b, 0, q_block, :block_mask.kv_num_blocks[b, 0, q_block]]]
            if block_mask.full_kv_num_blocks is not None:
                kv_blocks.append(block_mask.full_kv_indices[b, 0, q_block, :block_mask.full_kv_num_blocks[b, 0, q_block]])
            starts = torch.cat(kv_blocks).sort().values.long() * size
            key_index = (starts[:, None] + torch.arange(size, device=starts.device)).flatten()
            key_index = key_index[key_index < length]
            query_index = torch.arange(q_block * size, min((q_block + 1) * size, length), device=query.device)
            rows.append(checkpoint(_attend_block, query[b:b + 1, :, query_index], key[b:b + 1], value[b:b + 1],
                                   key_index, query_index, block_mask.mask_mod, b, scale, use_reentrant=False))
        output.append(torch.cat(rows, dim=2))
    return torch.cat(output)


def shared_prefix_flex_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """AttentionInterface function: transformers' flex attention (compiled torch kernel) on GPU, the block-sparse
    loop on CPU, where torch's FlexAttention has no backward."""
    if query.device.type == "cpu":
        return block_sparse_attention(query, key, value, attention_mask, scaling).transpose(1, 2), None
    return flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def flex_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, device="cpu", **kwargs):
    """AttentionMaskInterface function for plain rows: one segment per row (a reward model runs no KV cache)."""
    if q_offset or kv_offset or q_length != kv_length:
        raise ValueError(f"{SHARED_PREFIX_FLEX} runs whole sequences, not cached decoding")
    return shared_prefix_block_mask(segments_from_padding(attention_mask, batch_size, kv_length, device))


@dataclass
class VarlenLayout:
    """flash_attn_varlen_func's arguments for a batch [B, L]: `query_index` picks every real token once (flattened
    B x L), `key_index` the keys of each sequence (the prompt again before every branch after the first)."""

    query_index: torch.Tensor
    key_index: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def varlen_layout(segment_ids: torch.Tensor) -> VarlenLayout:
    """Row by row: prompt + branch 1 is one causal sequence (its queries and keys the same tokens); each later
    branch k is a sequence whose queries are its own tokens and whose keys are prompt + branch k, bottom-right
    aligned, so its first token sees the whole prompt and itself. Padding is left out."""
    segments = segment_ids.cpu()
    length = segments.shape[1]
    queries, keys = [], []
    for row, row_segments in enumerate(segments):
        positions = torch.arange(length) + row * length
        prompt = positions[row_segments == PROMPT]
        branches = [positions[row_segments == k] for k in row_segments.unique().tolist() if k not in (PROMPT, PAD)]
        first = torch.cat([prompt, *branches[:1]])
        if len(first):
            queries.append(first)
            keys.append(first)
        for branch in branches[1:]:
            queries.append(branch)
            keys.append(torch.cat([prompt, branch]))

    def cumulative(sequences):
        lengths = torch.tensor([len(sequence) for sequence in sequences], dtype=torch.int32)
        return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)).to(segment_ids.device)

    return VarlenLayout(torch.cat(queries).to(segment_ids.device), torch.cat(keys).to(segment_ids.device),
                        cumulative(queries), cumulative(keys), max(map(len, queries)), max(map(len, keys)))


def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, **unsupported):
    """flash_attn_varlen_func's signature and semantics in plain torch: q [total_q, H, D], k / v [total_k, H_kv, D]
    (H a multiple of H_kv), sequence i spanning cu_seqlens[i]:cu_seqlens[i + 1]; causal is aligned to the
    bottom-right corner when a sequence has more keys than queries. For CPU tests and CPU runs."""
    if unsupported:
        raise NotImplementedError(f"the reference varlen attention has no {sorted(unsupported)}")
    outputs = []
    for i in range(len(cu_seqlens_q) - 1):
        q_start, q_end, k_start, k_end = (int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(cu_seqlens_k[i]),
                                          int(cu_seqlens_k[i + 1]))
        mask = None
        if causal:
            mask = torch.ones(q_end - q_start, k_end - k_start, dtype=torch.bool, device=q.device)
            mask = mask.tril(diagonal=(k_end - k_start) - (q_end - q_start))
        out = F.scaled_dot_product_attention(
            q[q_start:q_end].transpose(0, 1), k[k_start:k_end].transpose(0, 1), v[k_start:k_end].transpose(0, 1),
            attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale, enable_gqa=True)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


def varlen_kernel(device: torch.device):
    """flash-attn's flash_attn_varlen_func on GPU; the torch reference on CPU. A GPU without flash-attn is an
    error, never a silent switch to the slow reference."""
    if device.type == "cpu":
        return varlen_attention_reference
    if importlib.util.find_spec("flash_attn") is None:
        raise ImportError(f"{SHARED_PREFIX_VARLEN} on {device.type} needs flash-attn: {FLASH_ATTN_INSTALL}")
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def shared_prefix_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                   shared_prefix_layout: VarlenLayout | None = None, **kwargs):
    """AttentionInterface function: gathers the varlen layout's queries and keys, runs the kernel, scatters the
    outputs back ([B, L, H, D]; padding rows zero). A packed batch brings its layout as `shared_prefix_layout`;
    plain rows get one from their padding mask (`varlen_mask`)."""
    layout = shared_prefix_layout if shared_prefix_layout is not None else attention_mask
    batch, heads, length, dim = query.shape

    def tokens(states):  # [B, H, L, D] -> [B x L, H, D]
        return states.transpose(1, 2).reshape(batch * length, states.shape[1], dim)

    q, k, v = tokens(query)[layout.query_index], tokens(key)[layout.key_index], tokens(value)[layout.key_index]
    out = varlen_kernel(query.device)(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_seqlen_q,
                                      layout.max_seqlen_k, dropout_p=dropout, softmax_scale=scaling, causal=True)
    full = out.new_zeros(batch * length, heads, dim).index_copy(0, layout.query_index, out)
    return full.view(batch, length, heads, dim), None


def varlen_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, device="cpu", **kwargs):
    """AttentionMaskInterface function for plain rows: each row's real tokens are one sequence."""
    if q_offset or kv_offset or q_length != kv_length:
        raise ValueError(f"{SHARED_PREFIX_VARLEN} runs whole sequences, not cached decoding")
    return varlen_layout(segments_from_padding(attention_mask, batch_size, kv_length, device))


AttentionInterface.register(SHARED_PREFIX_FLEX, shared_prefix_flex_attention)
AttentionMaskInterface.register(SHARED_PREFIX_FLEX, flex_mask)
AttentionInterface.register(SHARED_PREFIX_VARLEN, shared_prefix_varlen_attention)
AttentionMaskInterface.register(SHARED_PREFIX_VARLEN, varlen_mask)


def load_attention(requested: str | None, config) -> str | dict | None:
    """The `attn_implementation` to load for `--attn_implementation requested`: flex_attention and
    flash_attention_2 become the shared-prefix functions in the language model, while a vision tower keeps its own
    kernel (flash-attn for flash_attention_2, else sdpa). Anything else is loaded as asked."""
    language = LANGUAGE_MODEL_ATTENTION.get(requested, requested)
    if language not in (SHARED_PREFIX_FLEX, SHARED_PREFIX_VARLEN):
        return requested
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError(f"--attn_implementation flash_attention_2 needs flash-attn (GPU): {FLASH_ATTN_INSTALL}")
    if "text_config" not in config.sub_configs:
        return language
    vision = "flash_attention_2" if requested == "flash_attention_2" else "sdpa"
    return {"": language, "text_config": language, "vision_config": vision}
