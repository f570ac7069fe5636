"""How the reward model is built: where its value head comes from and which parts train."""

from dataclasses import dataclass, field


@dataclass
class RewardModelArguments:
    new_value_head: bool = field(
        default=False,
        metadata={"help": "Start from a base model with a fresh value head. Without it, the model must have "
                  "value_head.safetensors (a trained reward model), so a head is never silently random."},
    )
    freeze_vision_tower: bool = field(default=True, metadata={"help": "Freeze the vision encoder (ViT), as the paper."})
    freeze_projector: bool = field(default=False, metadata={"help": "Also freeze the vision-language projector."})
    freeze_language_model: bool = field(default=False, metadata={"help": "Also freeze the LLM (train head + projector)."})
