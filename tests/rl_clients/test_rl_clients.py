"""The RL clients' own calling code against ours (`make test-rl-clients`): OpenRLHF's rollout step and verl's reward
managers run unmodified in their own venv (.venv-rl, tests/rl_clients/install_rl_clients.sh) against our reward
server on 127.0.0.1, and TRL's GRPOTrainer trains 2 steps with the HTTP reward function; every reward, text and
images, equals RewardScorer's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset
from PIL import Image
from transformers import AutoProcessor

ROOT = Path(__file__).resolve().parents[2]
RL_PYTHON = ROOT / os.environ.get("RL_VENV", ".venv-rl") / "bin" / "python"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from serving_helpers import ServerThread, noise, train_grpo, write_reward_model  # noqa: E402

from heads import RewardScorer  # noqa: E402
from recipes.serve.rl_rewards import RewardServerReward  # noqa: E402
from recipes.serve.server import ServerArguments, build_app  # noqa: E402

needs_rl_venv = pytest.mark.skipif(not RL_PYTHON.exists(), reason="no RL clients' venv: run `make test-rl-clients`")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    """A tiny Qwen2.5-VL reward model, its scorer, three noise images on disk, OpenRLHF's prompt dataset of them, and
    the reward server started with that dataset as --prompt_images."""
    root = tmp_path_factory.mktemp("rl_clients")
    model = write_reward_model(tiny_checkpoints("qwen2_5_vl"), root / "rm")
    paths = []
    for i, size in enumerate([(84, 56), (56, 84), (90, 70)]):
        paths.append(root / f"{i}.png")
        noise(*size, seed=i).save(paths[-1])
    rows = [{"input": "<image>What is in the picture?", "images": [str(paths[0])], "label": ""},
            {"input": "Compare <image> and <image>. Which is brighter?", "images": [str(paths[1]), str(paths[2])], "label": ""},
            {"input": "Is 4 even?", "images": None, "label": "yes"}]
    dataset = root / "prompts.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    scorer = RewardScorer.from_pretrained(str(model), device="cpu")
    with ServerThread(build_app(scorer, ServerArguments(model_name_or_path=str(model), prompt_images=str(dataset)))) as server:
        yield {"root": root, "model": model, "scorer": scorer, "images": [Image.open(p) for p in paths], "paths": paths,
               "dataset": dataset, "url": server.url}


def run_client(script: str, spec: dict, root: Path):
    (root / f"{script}.json").write_text(json.dumps(spec))
    out = root / f"{script}.rewards.json"
    result = subprocess.run([str(RL_PYTHON), str(ROOT / "tests/rl_clients" / f"{script}.py"), str(root / f"{script}.json"),
                             str(out)], env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def text(value: str) -> dict:
    return {"type": "text", "text": value}


IMAGE = {"type": "image"}


@needs_rl_venv
def test_openrlhf_trainer_gets_the_scorers_rewards_through_prompt_images(setup):
    """OpenRLHF never sends images: the server finds them in the prompt dataset the trainer reads."""
    responses = ["A red car.", "The left one.\n", "yes"]
    got = run_client("openrlhf_client", {"url": setup["url"] + "/get_reward", "processor": str(setup["model"]),
                                         "dataset": str(setup["dataset"]), "responses": responses}, setup["root"])
    first, second, third = setup["images"]
    # the conversations as OpenRLHF renders its rows (`<image>` split off, each text piece stripped)
    expected = setup["scorer"].score([
        {"images": [first], "prompt": [{"role": "user", "content": [IMAGE, text("What is in the picture?")]}], "response": responses[0]},
        {"images": [second, third], "prompt": [{"role": "user", "content": [
            text("Compare"), IMAGE, text("and"), IMAGE, text(". Which is brighter?")]}], "response": responses[1]},
        {"images": [], "prompt": "Is 4 even?", "response": responses[2]}])
    print("OpenRLHF max |reward - RewardScorer|:", max(abs(a - b) for a, b in zip(got, expected)) if None not in got else got)
    assert None not in got
    assert got == pytest.approx(expected, abs=TOLERANCE)


@needs_rl_venv
def test_verl_reward_managers_get_the_scorers_rewards_with_images(setup):
    processor = AutoProcessor.from_pretrained(setup["model"])
    questions = ["<image>What is in the picture?", "Compare <image> and <image>. Which is brighter?", "Is 4 even?"]
    images = [[setup["paths"][0]], [setup["paths"][1], setup["paths"][2]], []]
    responses = ["Noise.", "The first.\n", "yes"]
    rows = [{"prompt": processor.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
             "response": r, "extra_info": {"index": i, "question": q, "images": [str(p) for p in im]}}
            for i, (q, r, im) in enumerate(zip(questions, responses, images))]
    got = run_client("verl_client", {"url": setup["url"], "tokenizer": str(setup["model"]), "rows": rows,
                                     "reward_function": str(ROOT / "recipes/serve/rl_rewards.py")}, setup["root"])
    first, second, third = setup["images"]
    expected = setup["scorer"].score([  # `<image>` markers become image places; the text around them stays as it is
        {"images": [first], "prompt": [{"role": "user", "content": [IMAGE, text("What is in the picture?")]}], "response": responses[0]},
        {"images": [second, third], "prompt": [{"role": "user", "content": [
            text("Compare "), IMAGE, text(" and "), IMAGE, text(". Which is brighter?")]}], "response": responses[1]},
        {"images": [], "prompt": "Is 4 even?", "response": responses[2]}])
    for manager in ("naive", "batch", "reward_loop"):
        print(f"verl {manager} max |reward - RewardScorer|:", max(abs(a - b) for a, b in zip(got[manager], expected)))
        assert got[manager] == pytest.approx(expected, abs=TOLERANCE), manager


class RecordingServerReward(RewardServerReward):
    calls = []

    def __call__(self, prompts, completions, **kwargs):
        rewards = super().__call__(prompts, completions, **kwargs)
        self.calls.append((prompts, completions, kwargs["images"], rewards))
        return rewards


def test_trl_grpo_trains_with_rewards_from_the_server(setup, tiny_checkpoints, tmp_path):
    """The reward model behind HTTP, off the policy's devices; two prompts with their own images per reward call."""
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is in the picture?"}]] * 4,
                                 "images": [[noise(56 + 28 * (i % 2), 56, seed=10 + i)] for i in range(4)]})
    reward = RecordingServerReward(setup["url"], timeout=120)
    trainer = train_grpo(tiny_checkpoints("qwen2_5_vl"), reward, dataset, tmp_path / "grpo")

    assert len(reward.calls) == 2 and trainer.state.global_step == 2
    for prompts, completions, images, rewards in reward.calls:
        assert images[0][0].tobytes() != images[2][0].tobytes()
        assert any(part.get("image") is not None for part in prompts[0][0]["content"])  # TRL put the image inline too
        # one image per conversation: the column's, not the inline copy as well
        expected = setup["scorer"].score([{"images": im, "prompt": "What is in the picture?", "response": c}
                                          for im, c in zip(images, completions)])
        print("TRL max |reward - RewardScorer|:", max(abs(a - b) for a, b in zip(rewards, expected)))
        assert rewards == pytest.approx(expected, abs=TOLERANCE)
    assert "rewards/reward_model/mean" in trainer.state.log_history[0]
