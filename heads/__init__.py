from .arguments import RewardModelArguments
from .freezing import apply_freezing, find_vision_tower
from .lora import apply_lora, check_model_config
from .scoring import RewardScorer
from .trainer import VLRewardTrainer, resume_checkpoint
from .value_head import VALUE_HEAD_FILE, ValueHeadRewardModel

__all__ = [
    "VALUE_HEAD_FILE",
    "RewardModelArguments",
    "RewardScorer",
    "VLRewardTrainer",
    "ValueHeadRewardModel",
    "apply_freezing",
    "apply_lora",
    "check_model_config",
    "find_vision_tower",
    "resume_checkpoint",
]
