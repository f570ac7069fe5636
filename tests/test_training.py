"""The stage recipes end to end on tiny models: what trains, what is frozen, what carries over, configs."""

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, AutoTokenizer
from trl import ModelConfig, RewardConfig, TrlParser

from collators import PreferenceDataArguments
from heads import RewardModelArguments, RewardScorer, ValueHeadRewardModel, find_vision_tower

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import stage1  # noqa: E402
import stage2  # noqa: E402

def new_parser() -> TrlParser:
    # A parser per call: TrlParser keeps a --config file's values as its defaults, which would leak into later parses.
    return TrlParser((PreferenceDataArguments, RewardModelArguments, RewardConfig, ModelConfig))


def parse(*args):
    return new_parser().parse_args_and_config(list(args))


def write_pairs(directory: Path, images: bool = True, text: bool = False) -> Path:
    (directory / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (colour, other) in enumerate([("red", "blue"), ("green", "red"), ("blue", "green"), ("red", "green")] * images):
        Image.new("RGB", (56, 56), colour).save(directory / "img" / f"{i}.png")
        rows.append({"images": [f"img/{i}.png"], "prompt": "What colour?", "chosen": colour, "rejected": other})
    if text:
        rows += [{"images": [], "prompt": "Is 4 even?", "chosen": "Yes.", "rejected": "No."},
                 {"images": [], "prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}]
    path = directory / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_args(model, data, output_dir, *extra):
    return ["--model_name_or_path", str(model), "--dataset_mixture", str(data), "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "2", "--max_steps", "2", "--learning_rate", "1e-2", "--bf16", "false",
            "--gradient_checkpointing", "false", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true",
            "--max_length", "256", "--disable_tqdm", "true", *extra]


def parameters(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ValueHeadRewardModel.from_pretrained(directory, new_value_head=True).state_dict().items()}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen2"])
def test_stage1_trains_llm_and_head_keeps_vision_tower(family, tiny_checkpoints, tmp_path):
    base = tiny_checkpoints(family)
    text_only = family == "qwen2"
    data = write_pairs(tmp_path / "data", images=not text_only, text=text_only)
    stage1.main(*parse(*train_args(base, data, tmp_path / "stage1", "--new_value_head", "true")))

    before = parameters(base)
    trained = ValueHeadRewardModel.from_pretrained(tmp_path / "stage1")
    after = trained.state_dict()
    head = load_file(tmp_path / "stage1" / "value_head.safetensors")
    assert set(head) == {"v_head.summary.weight", "v_head.summary.bias"}

    tower = find_vision_tower(trained.pretrained_model)
    tower_ids = {id(p) for p in tower.parameters()} if tower is not None else set()
    tower_names = {n for n, p in trained.named_parameters() if id(p) in tower_ids}
    projector = {n for n in tower_names if ".merger." in n or "deepstack_merger_list" in n}
    llm = [n for n in after if "layers." in n and n not in tower_names]
    assert llm and any(not torch.equal(before[n], after[n]) for n in llm), "the language model did not train"
    for name in tower_names - projector:
        assert torch.equal(before[name], after[name]), f"frozen vision parameter {name} changed"
    if not text_only:
        assert any(not torch.equal(before[n], after[n]) for n in projector), "the projector did not train"
    # lm_head gets no gradient and stays as it was: the checkpoint is still a complete generation model.
    assert torch.equal(before["pretrained_model.lm_head.weight"], after["pretrained_model.lm_head.weight"])
    assert json.loads((tmp_path / "stage1" / "data_report.json").read_text())[str(data)]["dropped"] == {}
    # The training max_length travels with the checkpoint: the reward server's default per-row token limit.
    assert AutoTokenizer.from_pretrained(tmp_path / "stage1").model_max_length == 256


def test_stage2_starts_from_stage1_head_and_mixes_text(tiny_checkpoints, tmp_path):
    base = tiny_checkpoints("qwen2_5_vl")
    data = write_pairs(tmp_path / "data", text=True)
    stage1.main(*parse(*train_args(base, data, tmp_path / "stage1", "--new_value_head", "true")))

    items = [{"images": [str(tmp_path / "data" / "img" / "0.png")], "prompt": "What colour?", "response": "red"},
             {"images": [], "prompt": "Is 4 even?", "response": "Yes."}]
    stage1_scores = RewardScorer.from_pretrained(str(tmp_path / "stage1"), device="cpu").score(items)

    # Stage 2's model before any step: the same scores, so the head was carried over, not re-initialised.
    stage2_args = train_args(tmp_path / "stage1", data, tmp_path / "stage2", "--max_length", "300")
    data_args, model_args, training_args, model_config = parse(*stage2_args)
    reloaded = ValueHeadRewardModel.from_pretrained(model_config.model_name_or_path)
    processor = AutoProcessor.from_pretrained(model_config.model_name_or_path)
    assert RewardScorer(reloaded, processor).score(items) == stage1_scores

    stage2.main(data_args, model_args, training_args, model_config)
    stage2_scores = RewardScorer.from_pretrained(str(tmp_path / "stage2"), device="cpu").score(items)
    assert stage2_scores != stage1_scores
    assert AutoTokenizer.from_pretrained(tmp_path / "stage2").model_max_length == 300  # stage 2's, not stage 1's 256


def test_gradient_checkpointing_and_accumulation_train(tiny_checkpoints, tmp_path):
    data = write_pairs(tmp_path / "data", text=True)
    args = train_args(tiny_checkpoints("qwen2_5_vl"), data, tmp_path / "gc", "--new_value_head", "true")
    args[args.index("--gradient_checkpointing") + 1] = "true"
    stage1.main(*parse(*args, "--gradient_accumulation_steps", "2", "--logging_steps", "1"))
    assert (tmp_path / "gc" / "value_head.safetensors").exists()


def test_stage2_refuses_a_fresh_head(tiny_checkpoints, tmp_path):
    data = write_pairs(tmp_path / "data", text=True)
    with pytest.raises(ValueError, match="stage 2 continues stage 1"):
        stage2.main(*parse(*train_args(tiny_checkpoints("qwen2_5_vl"), data, tmp_path / "s2", "--new_value_head", "true")))


def test_checkpoints_use_release_layout_and_resume(tiny_checkpoints, tmp_path):
    base = tiny_checkpoints("qwen2_5_vl")
    data = write_pairs(tmp_path / "data")
    args = train_args(base, data, tmp_path / "run", "--new_value_head", "true", "--save_strategy", "steps", "--save_steps", "1")
    stage1.main(*parse(*args))
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert (checkpoint / "value_head.safetensors").exists() and (checkpoint / "config.json").exists()
    assert (checkpoint / "preprocessor_config.json").exists() or (checkpoint / "processor_config.json").exists()

    # Resuming from step 1 ends where the uninterrupted run ended.
    stage1.main(*parse(*args, "--resume_from_checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "resumed")))
    uninterrupted = load_file(tmp_path / "run" / "checkpoint-2" / "value_head.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoint-2" / "value_head.safetensors")
    first = load_file(checkpoint / "value_head.safetensors")
    assert not torch.equal(first["v_head.summary.weight"], uninterrupted["v_head.summary.weight"])
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key])


@pytest.mark.parametrize("config", sorted((ROOT / "recipes").glob("*/stage*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_yaml_parses(config):
    data_args, model_args, training_args, model_config = new_parser().parse_args_and_config(["--config", str(config), "--use_cpu", "true"])
    assert model_config.model_name_or_path and data_args.dataset_mixture
    assert isinstance(data_args.dataset_mixture, dict)
    header = config.read_text().splitlines()[:3]
    assert header[0].startswith("#") and any("recipes/stage" in line or "make" in line for line in header)
