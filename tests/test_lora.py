"""LoRA reward models (--use_peft): what trains, the merged release checkpoint, the adapter, stage 2 from LoRA stage 1,
and ModelConfig options that would do nothing are refused."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import ModelConfig, get_peft_config

from heads import RewardModelArguments, RewardScorer, ValueHeadRewardModel, apply_freezing, apply_lora, check_model_config
from heads.lora import ADAPTER_DIR

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import stage1  # noqa: E402
import stage2  # noqa: E402
from test_training import parse, train_args, write_pairs  # noqa: E402

LORA = ("--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0")


def run_keeping_model(stage, args, monkeypatch) -> ValueHeadRewardModel:
    """Runs a stage recipe and returns its trained in-memory model."""
    trainers = []

    class Recording(stage.VLRewardTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            trainers.append(self)

    monkeypatch.setattr(stage, "VLRewardTrainer", Recording)
    stage.main(*parse(*args))
    return trainers[0].model


def scores(model, processor, items) -> torch.Tensor:
    return torch.tensor(RewardScorer(model, processor).score(items))


def test_lora_stages_train_adapters_head_projector_and_save_merged(tiny_checkpoints, tmp_path, monkeypatch):
    base = tiny_checkpoints("qwen2_5_vl")
    data = write_pairs(tmp_path / "data", text=True)
    model = run_keeping_model(stage1, train_args(base, data, tmp_path / "stage1", "--new_value_head", "true", *LORA),
                              monkeypatch)

    # In memory: only LoRA weights, the projector's trained copy and the value head changed.
    torch.manual_seed(0)
    initial = ValueHeadRewardModel.from_pretrained(base, new_value_head=True).state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".merger.modules_to_save." in n or n.startswith("v_head.") for n in trainable)
    assert any(".lora_" in n for n in trainable) and any(".merger." in n for n in trainable)
    assert not any(".visual.blocks." in n for n in trainable), "the frozen vision tower got adapters"
    for name, value in model.state_dict().items():
        plain = (name.replace("base_model.model.", "", 1).replace(".base_layer.", ".")
                 .replace(".original_module.", "."))
        if name not in trainable and plain in initial and not name.startswith("v_head."):
            assert torch.equal(value, initial[plain]), f"{name} is not trained but changed"
    assert any(not torch.equal(p, initial[n]) for n, p in model.named_parameters() if n.startswith("v_head."))

    # Saved: the release layout, loadable by the plain transformers class with no missing or unexpected weight.
    out = tmp_path / "stage1"
    assert set(load_file(out / "value_head.safetensors")) == {"v_head.summary.weight", "v_head.summary.bias"}
    plain_model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not any("lora" in key or "base_layer" in key for key in load_file(out / "model.safetensors"))
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"} <= {
        p.name for p in (out / ADAPTER_DIR).iterdir()}
    assert json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())["r"] == 4

    # The merged checkpoint scores as the in-memory model (adapters applied on the fly) did.
    processor = AutoProcessor.from_pretrained(out)
    items = [{"images": [str(tmp_path / "data" / "img" / "0.png")], "prompt": "What colour?", "response": "red"},
             {"images": [], "prompt": "Is 4 even?", "response": "Yes."}]
    in_memory = scores(model, processor, items)
    reloaded = torch.tensor(RewardScorer.from_pretrained(str(out), device="cpu").score(items))
    torch.testing.assert_close(reloaded, in_memory, rtol=0, atol=1e-5)
    assert not torch.allclose(in_memory, scores(ValueHeadRewardModel.from_pretrained(base, new_value_head=True),
                                                processor, items)), "stage 1 changed no score"

    # Stage 2 from the LoRA stage 1, with LoRA again: the same round trip.
    model2 = run_keeping_model(stage2, train_args(out, data, tmp_path / "stage2", *LORA), monkeypatch)
    in_memory2 = scores(model2, processor, items)
    reloaded2 = torch.tensor(RewardScorer.from_pretrained(str(tmp_path / "stage2"), device="cpu").score(items))
    torch.testing.assert_close(reloaded2, in_memory2, rtol=0, atol=1e-5)
    assert not torch.allclose(in_memory2, reloaded), "stage 2 changed no score"


def test_lora_checkpoint_restores_adapter_head_and_projector(tiny_checkpoints, tmp_path):
    """Resuming a LoRA run loads adapter/ into a fresh LoRA model: every tensor as it was saved."""
    def lora_model():
        torch.manual_seed(0)
        model = ValueHeadRewardModel.from_pretrained(tiny_checkpoints("qwen2_5_vl"), new_value_head=True)
        apply_freezing(model, RewardModelArguments())
        apply_lora(model, get_peft_config(ModelConfig(use_peft=True, lora_r=4, lora_alpha=8)), RewardModelArguments())
        return model

    trained = lora_model()
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    trained.save_pretrained(tmp_path / "checkpoint")
    restored = lora_model()
    assert not torch.equal(restored.v_head.summary.weight, trained.v_head.summary.weight)
    restored.load_checkpoint(tmp_path / "checkpoint")
    for (name, a), b in zip(trained.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("flags, message", [
    (dict(load_in_4bit=True), "load_in_4bit"),
    (dict(load_in_8bit=True, use_peft=True), "load_in_8bit"),
    (dict(bnb_4bit_quant_type="fp4"), "bnb_4bit_quant_type only applies"),
    (dict(lora_r=8), "--lora_r only apply with --use_peft"),
    (dict(use_peft=True, use_dora=True), "use_dora"),
    (dict(use_peft=True, lora_task_type="SEQ_CLS"), "lora_task_type"),
])
def test_model_options_that_would_do_nothing_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        check_model_config(ModelConfig(model_name_or_path="m", **flags))
    check_model_config(ModelConfig(model_name_or_path="m", use_peft=True, lora_r=8, use_rslora=True))


def test_lora_refuses_a_frozen_language_model(tiny_checkpoints):
    model = ValueHeadRewardModel.from_pretrained(tiny_checkpoints("qwen2_5_vl"), new_value_head=True)
    with pytest.raises(ValueError, match="choose one"):
        apply_lora(model, get_peft_config(ModelConfig(use_peft=True)), RewardModelArguments(freeze_language_model=True))
