"""LoRA reward models through peft, as TRL does it (`--use_peft`, `--lora_r`, `--lora_alpha`, `--lora_dropout`,
`--lora_target_modules`): adapters on the language model, the value head and the projector trained in full.

A LoRA reward model is saved in the release layout with the adapters merged into the base weights (it loads with
the model card's snippet, and stage 2 starts from it like from any reward model), plus `adapter/`: peft's adapter
files (LoRA weights and the full projector) and the value head, for those who keep the base model and swap adapters.
"""

import copy
import logging
import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from trl import ModelConfig

from .arguments import RewardModelArguments
from .freezing import count_parameters, find_projectors, find_vision_tower

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
# peft names the adapter of a fresh get_peft_model "default".
ADAPTER_NAME = "default"


def check_model_config(model_config: ModelConfig) -> None:
    """Rejects ModelConfig options this recipe would otherwise parse and silently ignore."""
    defaults = ModelConfig()
    problems = []
    if model_config.load_in_4bit or model_config.load_in_8bit:
        problems.append("--load_in_4bit / --load_in_8bit (QLoRA) are not supported: the reward model is saved with "
                        "the adapters merged into full-precision base weights, which this recipe does not do from a "
                        "quantized base; train LoRA on the bf16 base instead (--use_peft true --dtype bfloat16)")
    else:
        for name in ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage"):
            if getattr(model_config, name) != getattr(defaults, name):
                problems.append(f"--{name} only applies to --load_in_4bit, which is not set")
    if model_config.use_peft:
        if model_config.use_dora:
            problems.append("--use_dora: DoRA's merge is not implemented; use plain LoRA (optionally --use_rslora)")
        if model_config.lora_target_parameters is not None:
            problems.append("--lora_target_parameters: adapters on raw parameters are not merged by this recipe; "
                            "use --lora_target_modules")
        if model_config.lora_task_type != defaults.lora_task_type:
            problems.append(f"--lora_task_type {model_config.lora_task_type}: the value head sits outside the peft "
                            f"model, which is always wrapped as {defaults.lora_task_type}")
    else:
        lora_flags = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
                      "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora")
        changed = [f"--{name}" for name in lora_flags if getattr(model_config, name) != getattr(defaults, name)]
        if changed:
            problems.append(f"{', '.join(changed)} only apply with --use_peft true, which is not set")
    if problems:
        raise ValueError("Unsupported model options:\n  - " + "\n  - ".join(problems))


def is_lora(model) -> bool:
    return isinstance(model, PeftModel)


def unwrap_lora(model):
    """The transformers model under a peft wrapper (the model itself otherwise); its LoRA layers stay injected."""
    return model.get_base_model() if is_lora(model) else model


def _module_name(model, module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def apply_lora(reward_model, peft_config: LoraConfig, args: RewardModelArguments) -> dict[str, int]:
    """Wraps `reward_model.pretrained_model` with LoRA adapters; call it after `apply_freezing`.

    Adapters go on the language model (peft's `target_modules`; "all-linear" when none are given), never on the
    projector, which trains in full (peft's modules_to_save, so the adapter files carry it) unless frozen, nor on a
    frozen vision tower. The value head always trains in full.
    """
    if args.freeze_language_model:
        raise ValueError("--freeze_language_model trains only the head and the projector, but --use_peft puts "
                         "adapters on the language model: choose one")
    base = reward_model.pretrained_model
    tower = find_vision_tower(base)
    projectors = [_module_name(base, module) for module in find_projectors(base)] if tower is not None else []
    excluded = projectors + ([_module_name(base, tower)] if tower is not None and args.freeze_vision_tower else [])
    config = copy.deepcopy(peft_config)  # the caller's stays as given
    config.target_modules = config.target_modules or "all-linear"
    if excluded:
        config.exclude_modules = "|".join(rf"{re.escape(name)}(\..*)?" for name in excluded)
    trained = [] if args.freeze_projector else projectors
    config.modules_to_save = sorted(set(config.modules_to_save or []) | set(trained)) or None
    reward_model.pretrained_model = get_peft_model(base, config)
    reward_model.v_head.requires_grad_(True)

    trainable, frozen = count_parameters(reward_model)
    adapters = sum(p.numel() for n, p in reward_model.named_parameters() if p.requires_grad and ".lora_" in n)
    logger.info("LoRA r=%d alpha=%s on %s: %s trainable (adapters %s, projector %s, value head %s), %s frozen",
                config.r, config.lora_alpha, config.target_modules, f"{trainable:,}", f"{adapters:,}",
                "trained" if trained else "frozen", "trained", f"{frozen:,}")
    return {"trainable": trainable, "frozen": frozen, "adapters": adapters}


def merged_base_state(peft_model: PeftModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The peft model's state dict (its own key names) -> the base model's state dict with every adapter merged in
    (W + scaling * B @ A) and every modules_to_save copy in place of the original: what `merge_and_unload` would
    give, computed from the tensors alone, so the training model is untouched and a gathered state dict (FSDP,
    ZeRO-3) works as well."""
    base = peft_model.get_base_model()
    prefix = "base_model.model."
    merged = {}
    for key, value in state.items():
        key = key.removeprefix(prefix)
        if ".lora_" in key or ".original_module." in key:
            continue
        if ".modules_to_save." in key:
            module_name, rest = key.split(".modules_to_save.", 1)
            merged[f"{module_name}.{rest.split('.', 1)[1]}"] = value
            continue
        if ".base_layer." in key:
            module_name, parameter = key.split(".base_layer.", 1)
            layer = base.get_submodule(module_name)
            if not isinstance(layer, LoraLinear):
                raise NotImplementedError(f"{module_name}: merging a {type(layer).__name__} adapter is not "
                                          "implemented; target Linear layers only")
            if parameter == "weight":
                a = state[f"{prefix}{module_name}.lora_A.{ADAPTER_NAME}.weight"].float()
                b = state[f"{prefix}{module_name}.lora_B.{ADAPTER_NAME}.weight"].float()
                delta = (b @ a) * layer.scaling[ADAPTER_NAME]
                value = (value.float() + (delta.T if layer.fan_in_fan_out else delta)).to(value.dtype)
            key = f"{module_name}.{parameter}"
        merged[key] = value
    return merged


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's part of the peft model's state dict: LoRA weights and modules_to_save copies."""
    return {key: value for key, value in state.items() if ".lora_" in key or ".modules_to_save." in key}
