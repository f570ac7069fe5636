"""Every rank runs the vision tower at every step, so sharded training never hangs on a text-only batch.

Under FSDP and DeepSpeed ZeRO-3 each module's parameters are gathered by collectives that every rank must join.
A rank whose batch holds no image skips the vision tower while another rank runs it: the collectives no longer
match and training hangs (ms-swift #3213, #4918, LLaMA-Factory #5648, #7157). So a batch without images runs the
tower on a dummy image of one merged token, and the reward adds `0 * sum(outputs)`: the value and the gradients
of the loss are exactly those of the text-only batch (the dummy's gradients are zeros), and autograd runs the
same backward (and the same gradient reduce-scatters) on every rank. The dummy runs where real images run, after
the token embeddings and before the language model: ZeRO-3 gathers each module on its own, so the order matters.

It runs only when torch.distributed has more than one process, the only case in which ranks can disagree; a
single process (scoring, evaluation, one-GPU training) pays nothing.

`check_launch` stops a run whose launcher asked for something that accelerate did not set up (FSDP that became DDP,
several processes that each train alone): such a run would otherwise train in another way than asked, silently.
"""

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn


def vision_tower_must_run(setting: bool | None) -> bool:
    """`setting` None: whenever torch.distributed runs more than one process."""
    if setting is not None:
        return setting
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def dummy_image_inputs(vision_config, device) -> dict[str, torch.Tensor]:
    """pixel_values and image_grid_thw of a black image of one merged token, in the Qwen-VL patch layout
    (flattened patches of in_channels x temporal_patch_size x patch_size^2 values, a (t, h, w) grid)."""
    required = ("patch_size", "temporal_patch_size", "in_channels", "spatial_merge_size")
    missing = [name for name in required if getattr(vision_config, name, None) is None]
    if missing:
        raise NotImplementedError(
            f"{type(vision_config).__name__} has no {missing}: a dummy image for text-only batches is built for "
            "Qwen-VL-style vision towers only (Qwen2-VL, Qwen2.5-VL, Qwen3-VL). Without it, a text-only batch under "
            "FSDP / ZeRO-3 hangs; train with image pairs only or on one process."
        )
    merge = vision_config.spatial_merge_size
    patch = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2
    return {
        "pixel_values": torch.zeros(merge * merge, patch, device=device),
        "image_grid_thw": torch.tensor([[1, merge, merge]], device=device),
    }


def _tensor_sum(output) -> torch.Tensor | float:
    """Sum of every floating tensor in a (nested) model output."""
    if isinstance(output, torch.Tensor):
        return output.float().sum() if output.is_floating_point() else 0.0
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, (list, tuple)):
        return sum(_tensor_sum(item) for item in output)
    return 0.0


def zero_vision_term(backbone: nn.Module, device) -> torch.Tensor:
    """0 * (the vision tower's outputs on a dummy image): a scalar that is exactly 0 but depends on every vision
    parameter, so the tower's forward and backward run on this rank too."""
    vision_config = getattr(backbone.config, "vision_config", None)
    inputs = dummy_image_inputs(vision_config, device)
    features = backbone.get_image_features(**inputs)
    return 0.0 * _tensor_sum(features)


@contextmanager
def vision_tower_before_language_model(backbone: nn.Module, device, enabled: bool):
    """While active (and `enabled`), a forward of `backbone` runs the vision tower on the dummy image right before
    its language model, where a batch with images runs the tower. Yields the list that receives the zero term."""
    zeros = []
    if not enabled:
        yield zeros
        return
    # prepend: before the language model's own pre-hooks, in which ZeRO-3 gathers and records the module order.
    handle = backbone.language_model.register_forward_pre_hook(
        lambda module, args: zeros.append(zero_vision_term(backbone, device)), prepend=True)
    try:
        yield zeros
    finally:
        handle.remove()


def check_launch(state) -> None:
    """Raises when the accelerate state (`AcceleratorState`) is not what `accelerate launch` asked for."""
    for engine, flag in (("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED"), ("FSDP", "ACCELERATE_USE_FSDP")):
        if os.environ.get(flag, "false").lower() == "true" and state.distributed_type.name != engine:
            raise RuntimeError(
                f"The accelerate config asks for {engine} (distributed_type: {engine}, so accelerate launch set "
                f"{flag}=true), but accelerate set up {state.distributed_type.name} with {state.num_processes} "
                f"process(es): the run would train without {engine}, every process holding the whole model. "
                + ("accelerate enables FSDP on GPUs only. " if engine == "FSDP" else "")
                + "Fix: launch on GPUs without --cpu / use_cpu: true in the accelerate config, or launch with "
                "recipes/accelerate_configs/ddp.yaml to train unsharded on purpose."
            )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and state.num_processes != world_size:
        raise RuntimeError(
            f"{world_size} processes were launched (WORLD_SIZE={world_size}), but accelerate set up "
            f"{state.distributed_type.name} with {state.num_processes} process(es): each process would train alone "
            "and all of them would write the same output_dir. This happens when the accelerate config is for GPUs "
            "(use_cpu: false) on a machine where torch sees none. Fix: on GPUs, check that torch sees them "
            "(CUDA_VISIBLE_DEVICES); on CPU, train with --use_cpu true (DDP over gloo) and recipes/accelerate_configs/ddp.yaml."
        )
