"""Tiny checkpoints of every supported family, built once per test session on local disk."""

import sys
from pathlib import Path

import pytest
from transformers import AutoProcessor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes" / "demo"))

from tiny_model import save_tiny_model  # noqa: E402


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
