"""Tiny checkpoints of every supported family, built once per test session on local disk, and a reward model in the
release layout on the tiny Qwen2.5-VL, built once per test module."""

import sys
from pathlib import Path

import pytest
from transformers import AutoProcessor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes" / "demo"))

from serving_helpers import write_reward_model  # noqa: E402
from tiny_model import save_tiny_model  # noqa: E402

from heads import RewardScorer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> directory of a saved tiny base model (no value head) with its processor."""
    cache = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = save_tiny_model(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


@pytest.fixture
def processor(tiny_checkpoints):
    """The tiny Qwen2.5-VL processor."""
    return AutoProcessor.from_pretrained(tiny_checkpoints("qwen2_5_vl"))


@pytest.fixture(scope="module")
def vl_model(tiny_checkpoints, tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL with a random value head, saved in the release layout."""
    return write_reward_model(tiny_checkpoints("qwen2_5_vl"), tmp_path_factory.mktemp("vl_rm"))


@pytest.fixture(scope="module")
def scorer(vl_model) -> RewardScorer:
    return RewardScorer.from_pretrained(str(vl_model), device="cpu")
