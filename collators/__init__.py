from .conversation import (
    ConversationRenderer,
    PixelBudgetArguments,
    open_image,
    pixel_budget,
    set_pixel_budget,
    to_messages,
)
from .packed_pair_collator import PackedPairCollator, pair_collator_for
from .pair_collator import PairCollator
from .preference_data import PreferenceDataArguments, load_preference_mixture, load_training_data, write_data_report

__all__ = [
    "ConversationRenderer",
    "PackedPairCollator",
    "PairCollator",
    "PixelBudgetArguments",
    "PreferenceDataArguments",
    "load_preference_mixture",
    "load_training_data",
    "open_image",
    "pair_collator_for",
    "pixel_budget",
    "set_pixel_budget",
    "to_messages",
    "write_data_report",
]
