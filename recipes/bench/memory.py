"""Computed (not measured) memory per GPU of Qwen2.5-VL-7B reward training, per launcher config.

The parameter counts come from the real architecture built on the meta device (no weights, no download) with the
recipe's freezing (and LoRA for the LoRA row). Bytes follow the mixed-precision accounting of the ZeRO paper:
every parameter holds 2 bytes of bf16 weights; every trained parameter adds 2 bytes of bf16 gradient and 12 bytes
of fp32 optimizer state (master copy, Adam's two moments). ZeRO-2 shards gradients and optimizer state over the
GPUs, ZeRO-3 and FSDP2 shard the weights too. Activations, buffers and allocator overhead come on top.

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
GB = 1e9


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


def main():
    full_trained, full_frozen = count_parameters(reward_model(lora=False))
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
    print("| setup | config | weights | gradients | optimizer state | total per GPU (GB, computed) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for setup, config, gpus, n, t, sharded in rows:
        weights, grads, optimizer = per_gpu(n, t, gpus, sharded)
        print(f"| {setup} | {config} | {weights:.1f} | {grads:.1f} | {optimizer:.1f} | "
              f"{weights + grads + optimizer:.1f} |")


if __name__ == "__main__":
    main()
