"""Computed (not measured) memory per GPU of Qwen2.5-VL-7B reward training, per launcher config.

The parameter counts come from the real architecture built on the meta device (no weights, no download) with the
recipe's freezing (and LoRA for the LoRA row). Bytes follow the mixed-precision accounting of the ZeRO paper:
every parameter holds 2 bytes of bf16 weights; every trained parameter adds 2 bytes of bf16 gradient and 12 bytes
of fp32 optimizer state (master copy, Adam's two moments). ZeRO-2 shards gradients and optimizer state over the
GPUs, ZeRO-3 and FSDP2 shard the weights too.

The second table adds what decides whether a run fits, also computed: the activations of one packed pair at the 7B
recipe's max_length (a packed pair holds at most 2 x max_length tokens: prompt, chosen and rejected answer; the
two-row layout holds the same count), with and without gradient checkpointing; the packed attention mask; the FSDP2
root group, which stays unsharded from forward to the end of backward; a gathered decoder layer (and the one
prefetched beside it) under ZeRO-3 / FSDP2; the gathered token embeddings (their lookup gathers them whole for a
moment); and the lm_head that the reward never runs. Allocator overhead, communication buckets and the vision
tower's transient forward (frozen: it saves nothing for backward) come on top.

Activations per token and decoder layer, bf16, the tensors autograd saves for backward: each RMSNorm its fp32 input
and its normalised bf16 output (4h + 2h bytes); attention the q / k / v projections' input (h), the rotated q and k
and v that sdpa saves (h + 2 kv) and its output (h); the MLP its input (h), gate, SiLU(gate), up and their product
(4 x intermediate); 2 bytes per bf16 element: 20h + 4kv + 8 intermediate bytes. With gradient checkpointing (one
checkpoint per decoder layer, transformers' default) each layer keeps only its input (2h bytes per token) and one
layer's activations exist at a time, when backward recomputes it.

    python recipes/bench/memory.py
"""

import sys
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from trl import ModelConfig, get_peft_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from heads import RewardModelArguments, ValueHeadRewardModel, apply_freezing, apply_lora  # noqa: E402
from heads.freezing import count_parameters  # noqa: E402

# Qwen/Qwen2.5-VL-7B-Instruct's config.json (architecture fields only).
QWEN2_5_VL_7B = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
    tie_word_embeddings=False,
)
LORA_R, LORA_ALPHA = 32, 16  # recipes/stage1.py's LoRA example
MAX_LENGTH = 8192  # recipes/qwen2_5_vl_7b/stage1.yaml
PAIR_TOKENS = 2 * MAX_LENGTH  # a packed pair's upper bound: prompt + chosen + rejected, each row <= max_length
GB = 1e9
BF16 = 2


def reward_model(lora: bool) -> ValueHeadRewardModel:
    with torch.device("meta"):
        model = ValueHeadRewardModel(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN2_5_VL_7B)))
    apply_freezing(model, RewardModelArguments())
    if lora:
        apply_lora(model, get_peft_config(ModelConfig(use_peft=True, lora_r=LORA_R, lora_alpha=LORA_ALPHA)),
                   RewardModelArguments())
    return model


def per_gpu(total: int, trained: int, gpus: int, sharded: str) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) in GB on one GPU; `sharded`: none, grads+optimizer, or all."""
    weights, grads, optimizer = 2 * total, 2 * trained, 12 * trained
    if sharded in ("grads+optimizer", "all"):
        grads, optimizer = grads / gpus, optimizer / gpus
    if sharded == "all":
        weights = weights / gpus
    return weights / GB, grads / GB, optimizer / GB


def activation_bytes_per_token_and_layer(text_config) -> int:
    h, intermediate = text_config.hidden_size, text_config.intermediate_size
    kv = text_config.num_key_value_heads * (h // text_config.num_attention_heads)
    return 20 * h + 4 * kv + 8 * intermediate


def activations(text_config, tokens: int, checkpointing: bool) -> float:
    """GB of activations of one sequence of `tokens` tokens through the decoder layers."""
    layers, per_layer = text_config.num_hidden_layers, activation_bytes_per_token_and_layer(text_config)
    if checkpointing:
        return tokens * (layers * BF16 * text_config.hidden_size + per_layer) / GB
    return tokens * layers * per_layer / GB


def parameter_groups(model: ValueHeadRewardModel) -> dict[str, int]:
    """Parameters of the units accelerate's FSDP2 wraps (utils/fsdp_utils.py fsdp2_prepare_model): each block of
    the model's _no_split_modules (decoder layers, vision blocks), the token embeddings, the tail (final norm and
    lm_head), and the root: everything else (the vision patch embedding, the projector, the value head)."""
    base = model.pretrained_model
    blocks = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    decoder_layers = [m for m in blocks if m in set(base.model.language_model.layers)]
    embeddings, lm_head, final_norm = base.get_input_embeddings(), base.get_output_embeddings(), base.model.language_model.norm
    units = blocks + [embeddings, lm_head, final_norm]
    in_units = {id(p) for unit in units for p in unit.parameters()}
    size = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"root": sum(p.numel() for p in model.parameters() if id(p) not in in_units),
            "decoder_layer": max(size(m) for m in decoder_layers), "embeddings": size(embeddings),
            "lm_head": size(lm_head)}


def extras_table(model: ValueHeadRewardModel, gpus: int) -> list[tuple[str, str, float]]:
    text_config = model.config.get_text_config()
    groups = parameter_groups(model)
    return [
        (f"activations of one packed pair ({PAIR_TOKENS:,} tokens), no gradient checkpointing", "every config",
         activations(text_config, PAIR_TOKENS, checkpointing=False)),
        (f"activations of one packed pair ({PAIR_TOKENS:,} tokens), gradient checkpointing (the 7B recipes)",
         "every config", activations(text_config, PAIR_TOKENS, checkpointing=True)),
        ("the packed pair's attention mask (L x L booleans)", "every config", PAIR_TOKENS**2 / GB),
        ("FSDP2 root group, unsharded through forward and backward (patch embedding, projector, value head)",
         "fsdp2.yaml", BF16 * groups["root"] / GB),
        ("a gathered decoder layer and the prefetched next one", "zero3.yaml, fsdp2.yaml",
         2 * BF16 * groups["decoder_layer"] / GB),
        ("the token embeddings, gathered for their lookup (and their gradient in backward)", "zero3.yaml, fsdp2.yaml",
         BF16 * groups["embeddings"] / GB),
        ("the lm_head the reward never runs: whole on every GPU", "LoRA, ddp.yaml, zero2.yaml",
         BF16 * groups["lm_head"] / GB),
        (f"the lm_head: its 1/{gpus} shard, never gathered (the reward skips it)", "zero3.yaml, fsdp2.yaml",
         BF16 * groups["lm_head"] / gpus / GB),
    ]


def main():
    model = reward_model(lora=False)
    full_trained, full_frozen = count_parameters(model)
    lora_trained, _ = count_parameters(reward_model(lora=True))
    total = full_trained + full_frozen
    print(f"Qwen2.5-VL-7B reward model: {total:,} parameters; full fine-tuning trains {full_trained:,} "
          f"(vision tower frozen); LoRA r={LORA_R} trains {lora_trained:,} (adapters, projector, value head)\n")
    rows = [
        ("LoRA r=32, 1 GPU", "ddp.yaml or plain python", 1, total, lora_trained, "none"),
        ("full, 8 GPUs", "ddp.yaml", 8, total, full_trained, "none"),
        ("full, 8 GPUs", "zero2.yaml", 8, total, full_trained, "grads+optimizer"),
        ("full, 8 GPUs", "zero3.yaml / fsdp2.yaml", 8, total, full_trained, "all"),
        ("full, 2 nodes x 8 GPUs", "zero3.yaml / multinode_fsdp2.yaml", 16, total, full_trained, "all"),
    ]
    text_config, groups = model.config.get_text_config(), parameter_groups(model)
    print("| setup | config | weights | gradients | optimizer state | total per GPU (GB, computed) "
          f"| with one pair at max_length {MAX_LENGTH:,}, gradient checkpointing |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for setup, config, gpus, n, t, sharded in rows:
        weights, grads, optimizer = per_gpu(n, t, gpus, sharded)
        # activations and the packed mask everywhere; sharded weights add the gathered layers, embeddings and root
        on_top = activations(text_config, PAIR_TOKENS, checkpointing=True) + PAIR_TOKENS**2 / GB
        if sharded == "all":
            on_top += BF16 * (2 * groups["decoder_layer"] + groups["embeddings"] + groups["root"]) / GB
        total = weights + grads + optimizer
        print(f"| {setup} | {config} | {weights:.1f} | {grads:.1f} | {optimizer:.1f} | {total:.1f} | {total + on_top:.1f} |")

    print(f"\nOn top, per GPU, batch 1 pair at max_length {MAX_LENGTH:,} (GB, computed; 8 GPUs for the shards):\n")
    print("| term | configs | GB |")
    print("| --- | --- | --- |")
    for term, configs, gigabytes in extras_table(model, gpus=8):
        print(f"| {term} | {configs} | {gigabytes:.2f} |")


if __name__ == "__main__":
    main()
