"""RL glue: a TRL GRPO run on CPU scores its completions with our reward model, images included; verl's custom reward
function reaches the reward server with the sample's images."""

import io
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from PIL import Image
from serving_helpers import ServerThread, write_reward_model
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
from trl import GRPOConfig, GRPOTrainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heads import RewardScorer  # noqa: E402
from recipes.serve.rl_rewards import RewardModelReward, compute_score  # noqa: E402
from recipes.serve.server import ServerArguments, build_app  # noqa: E402


@pytest.fixture(scope="module")
def vl_model(tiny_checkpoints, tmp_path_factory) -> Path:
    return write_reward_model(tiny_checkpoints("qwen2_5_vl"), tmp_path_factory.mktemp("vl_rm"))


@pytest.fixture(scope="module")
def scorer(vl_model) -> RewardScorer:
    return RewardScorer.from_pretrained(str(vl_model), device="cpu")


class RecordingReward(RewardModelReward):
    """Our reward function, keeping what TRL gave it and what it returned."""

    calls = []

    def __call__(self, prompts, completions, **kwargs):
        rewards = super().__call__(prompts, completions, **kwargs)
        self.calls.append((prompts, completions, kwargs, rewards))
        return rewards


def test_grpo_run_scores_completions_with_their_images(tiny_checkpoints, scorer, tmp_path):
    colours = ["red", "blue", "green", "yellow"]
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": "What colour is the shape?"}] for _ in colours],
        "image": [Image.new("RGB", (56, 56), c) for c in colours],
    })
    policy_dir = tiny_checkpoints("qwen2_5_vl")
    policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(policy_dir, dtype=torch.float32)
    reward = RecordingReward(scorer=scorer)
    config = GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=2, num_generations=2,
                        max_completion_length=6, max_steps=2, learning_rate=1e-5, use_cpu=True, bf16=False,
                        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=AutoProcessor.from_pretrained(policy_dir))
    trainer.train()

    assert len(reward.calls) == 2
    for prompts, completions, kwargs, rewards in reward.calls:
        images = kwargs["image"]
        assert len(images) == len(completions) == 2 and all(isinstance(im, Image.Image) for im in images)
        again = scorer.score([{"images": [im], "prompt": p, "response": c} for im, p, c in zip(images, prompts, completions)])
        assert rewards == pytest.approx(again, abs=1e-6)
        blank = scorer.score([{"images": [Image.new("RGB", (56, 56), "white")], "prompt": p, "response": c}
                              for p, c in zip(prompts, completions)])
        assert rewards != pytest.approx(blank, abs=1e-6)  # the image reached the reward model
    assert "rewards/reward_model/mean" in trainer.state.log_history[0]


def test_verl_compute_score_sends_the_images_to_the_server(vl_model, scorer):
    """Called as verl's reward manager calls a custom reward function, with the reward_kwargs of its config."""
    red = Image.new("RGB", (90, 70), "red")
    png = io.BytesIO()
    red.save(png, format="PNG")
    extra_info = {"split": "train", "index": 0, "question": "What colour is the shape?", "images": [{"bytes": png.getvalue()}]}
    with ServerThread(build_app(scorer, ServerArguments(model_name_or_path=str(vl_model)))) as server:
        got = [compute_score(data_source="colours", solution_str=answer, ground_truth="red", extra_info=extra_info,
                             reward_url=server.url) for answer in ("red", "blue")]
        resized = compute_score("colours", "red", "red", extra_info, reward_url=server.url,
                                min_pixels=56 * 56, max_pixels=224 * 224)
    expected = scorer.score([{"images": [red], "prompt": extra_info["question"], "response": a} for a in ("red", "blue")])
    assert got == pytest.approx(expected, abs=1e-5)
    assert resized == pytest.approx(expected[0], abs=1e-5)  # resizing first with the model's budget changes nothing
    with pytest.raises(KeyError, match="question"):
        compute_score("colours", "red", "red", {"images": []}, reward_url="http://127.0.0.1:9")
