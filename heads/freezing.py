"""Which parts of the reward model train (paper §3.4: ViT frozen; projector, LLM and value head trained)."""

import logging

from torch import nn

from .arguments import RewardModelArguments

logger = logging.getLogger(__name__)

# Names under which vision-language models keep the vision-to-text projector: inside the vision tower
# (Qwen2-VL / Qwen2.5-VL `merger`, Qwen3-VL `merger` + `deepstack_merger_list`) or beside it (LLaVA-style).
PROJECTOR_NAMES = ("merger", "deepstack_merger_list", "multi_modal_projector", "mm_projector", "connector", "aligner")


def find_vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision encoder, found the way transformers does for every VLM family (None for a text-only LM)."""
    tower = model.get_encoder(modality="image")
    if tower is not model and tower is not model.base_model:
        return tower
    vision_config = getattr(model.config, "vision_config", None)
    if vision_config is None:
        return None
    # Fallback for families with another attribute name: the submodule built from the vision config.
    for module in model.modules():
        if module is not model and type(getattr(module, "config", None)) is type(vision_config):
            return module
    return None


def find_projectors(model: nn.Module) -> list[nn.Module]:
    return [module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTOR_NAMES]


def numel(parameter) -> int:
    """Elements of the whole parameter, also when ZeRO-3 left only this rank's partition (`ds_numel`)."""
    return getattr(parameter, "ds_numel", parameter.numel())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    frozen = sum(numel(p) for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def apply_freezing(reward_model: nn.Module, args: RewardModelArguments) -> dict[str, int]:
    """Sets requires_grad on `reward_model` (a ValueHeadRewardModel) and logs what trains.

    The lm_head gets no gradient in a reward forward, so it is frozen too (unless tied to the input
    embeddings): that keeps it out of the optimizer state and out of DDP's unused-parameter check.
    """
    base = reward_model.pretrained_model
    vision_tower = find_vision_tower(base)
    projectors = find_projectors(base)
    if args.freeze_language_model:
        base.requires_grad_(False)
    if vision_tower is not None:
        vision_tower.requires_grad_(not args.freeze_vision_tower)
        for projector in projectors:
            projector.requires_grad_(not args.freeze_projector)
    elif args.freeze_projector:
        logger.warning("freeze_projector is set, but %s has no vision tower", type(base).__name__)
    lm_head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    if lm_head is not None and lm_head.weight is not embeddings.weight:
        lm_head.requires_grad_(False)
    reward_model.v_head.requires_grad_(True)

    trainable, frozen = count_parameters(reward_model)
    counts = {
        "trainable": trainable,
        "frozen": frozen,
        "vision_tower": sum(numel(p) for p in vision_tower.parameters()) if vision_tower is not None else 0,
        "projector": sum(numel(p) for module in projectors for p in module.parameters()),
        "value_head": sum(numel(p) for p in reward_model.v_head.parameters()),
    }
    logger.info(
        "Parameters: %s trainable, %s frozen (vision tower %s%s, projector %s%s, value head %s)",
        f"{trainable:,}", f"{frozen:,}",
        f"{counts['vision_tower']:,}", " frozen" if args.freeze_vision_tower else " trained",
        f"{counts['projector']:,}", " frozen" if args.freeze_projector else " trained",
        f"{counts['value_head']:,}",
    )
    return counts
