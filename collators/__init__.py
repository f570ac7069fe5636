from .conversation import (
    ConversationRenderer,
    PixelBudgetArguments,
    open_image,
    pixel_budget,
    place_media,
    set_pixel_budget,
    set_video_budget,
    to_messages,
    video_budget,
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
    "place_media",
    "set_pixel_budget",
    "set_video_budget",
    "to_messages",
    "video_budget",
    "write_data_report",
]
