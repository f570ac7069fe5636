"""MPO data from the reward model (recipes/mpo/build_mpo_data.py) and MPO training (recipes/mpo/mpo.py)."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heads import RewardScorer, ValueHeadRewardModel, find_vision_tower  # noqa: E402
from heads.freezing import find_projectors  # noqa: E402
from recipes.shared.resumable import StaleRecordsError  # noqa: E402
from recipes.mpo import build_mpo_data  # noqa: E402
from recipes.mpo.build_mpo_data import BuildMPODataArguments, build_pairs, choose_pair, is_correct  # noqa: E402
from recipes.mpo.evaluate import log_prob_margins, preference_accuracy  # noqa: E402
from recipes.mpo.mpo import MPOArguments, MPOConfig  # noqa: E402
from recipes.mpo.mpo import main as train_mpo  # noqa: E402


def test_pair_policy():
    responses, rewards = ["red", "blue", "green", "The answer is red."], [0.5, 2.0, -1.0, 1.0]
    assert choose_pair(responses, rewards, None, 0.0, True) == (1, 2)  # best vs worst
    correct = [is_correct(r, "red") for r in responses]
    assert correct == [True, False, False, True]
    assert choose_pair(responses, rewards, correct, 0.0, True) == (3, 2)  # best correct vs worst incorrect
    assert choose_pair(responses, rewards, correct, 0.0, False) == (1, 2)
    assert choose_pair(responses, rewards, correct, 2.5, True) == "margin_not_above_min_margin"
    assert choose_pair(["a", "a"], [1.0, 0.0], None, 0.0, True) == "fewer_than_two_distinct_responses"
    assert choose_pair(["blue", "green"], [1.0, 0.0], [False, False], 0.0, True) == "no_correct_response"
    assert choose_pair(["red", "Red."], [1.0, 0.0], [True, True], 0.0, True) == "no_incorrect_response"
    assert is_correct("It is not blue. The answer is: \\boxed{Red}", "red")
    assert not is_correct("The answer is reddish.", "red") and not is_correct("red, no, the answer is blue", "red")


# rewards of ["red", "blue", "green"] for a prompt whose answer is red -> the report's best_of_n_correct
BEST_OF_N = [([[2.0, 1.0, 0.0]], 1.0), ([[0.0, 1.0, 2.0]], 0.0), ([[0.5, 2.0, -1.0]], 0.0), ([[1.0, -3.0, 0.5]], 1.0),
             ([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [3.0, 0.0, 1.0], [1.0, 0.0, 2.0]], 0.5)]


@pytest.mark.parametrize("rewards, expected", BEST_OF_N)
def test_best_of_n_correct_is_the_reward_models_own_pick(rewards, expected):
    rows = [{"row": i, "key": f"k{i}", "id": str(i), "images": [], "prompt": "Colour?", "answer": "red",
             "responses": ["red", "blue", "green"]} for i in range(len(rewards))]
    scored = {row["key"]: {"responses": row["responses"], "rewards": r} for row, r in zip(rows, rewards)}
    args = BuildMPODataArguments(input="prompts.jsonl", reward_model="rm", require_correct=False)
    _, report = build_pairs(args, rows, scored)
    assert report["best_of_n_correct"] == expected


def test_policy_preference_measures_right_minus_wrong(tiny_checkpoints):
    """With the final norm zeroed the policy gives every token probability 1/V: a completion of n tokens has
    log-probability -n log V, so the shorter answer is the more likely one, by exactly (n_long - n_short) log V."""
    path = tiny_checkpoints("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    model.model.language_model.norm.weight.data.zero_()
    processor = AutoProcessor.from_pretrained(path)
    image = Image.new("RGB", (56, 56), (220, 30, 30))

    def pair(chosen: str, rejected: str) -> dict:
        return {"images": [image], "prompt": [{"role": "user", "content": "What colour is the shape?"}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}

    pairs = [pair("Red.", "It is red, or maybe blue, or green, or black."), pair("It is a blue square, I think.", "Red.")]
    completion = DataCollatorForVisionPreference(processor)([dict(p) for p in pairs])["completion_mask"][:, 1:].sum(-1)
    chosen_tokens, rejected_tokens = completion.chunk(2)
    expected = ((rejected_tokens - chosen_tokens) * math.log(model.lm_head.out_features)).tolist()
    assert expected[0] > 0 > expected[1]
    assert log_prob_margins(model, processor, pairs) == pytest.approx(expected, rel=1e-5)
    result = preference_accuracy(model, processor, pairs)
    assert result["accuracy"] == 0.5 and result["mean_margin"] == pytest.approx(sum(expected) / 2, abs=1e-4)


@pytest.fixture(scope="module")
def reward_model(tiny_checkpoints, tmp_path_factory):
    """A tiny reward model with a random (but saved) value head."""
    path = tmp_path_factory.mktemp("rm")
    base = tiny_checkpoints("qwen2_5_vl")
    torch.manual_seed(0)
    model = ValueHeadRewardModel.from_pretrained(base, new_value_head=True, dtype=torch.float32)
    torch.nn.init.normal_(model.v_head.summary.weight, std=1.0)
    model.save_pretrained(path)
    AutoProcessor.from_pretrained(base).save_pretrained(path)
    return path


def write_prompts(folder: Path) -> Path:
    colours = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 50)}
    rows = []
    for i, (name, rgb) in enumerate(colours.items()):
        Image.new("RGB", (56 + 28 * i, 56), rgb).save(folder / f"{i}.png")
        rows.append({"id": f"c{i}", "images": [f"{i}.png"], "prompt": "What colour is the shape?", "answer": name,
                     "responses": [f"The shape is {c}." for c in colours]})
    rows.append({"id": "same", "images": ["0.png"], "prompt": "Say red.", "responses": ["red", "red"]})
    rows.append({"id": "none-right", "image": "1.png", "prompt": "Colour?", "answer": "purple",
                 "responses": ["red", "blue"]})
    rows.append({"id": "text", "images": [], "prompt": "Is 7 odd?", "responses": ["Yes, 7 is odd.", "No.", "Even."]})
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "prompts.jsonl"


def test_build_mpo_data_end_to_end_and_resume(reward_model, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path)
    args = BuildMPODataArguments(input=str(prompts), reward_model=str(reward_model), output_dir=str(tmp_path / "out"))
    report = build_mpo_data.main(args)
    assert report["prompts_in"] == 6 and report["responses_scored"] == 3 * 3 + 2 + 2 + 3
    assert report["drops"]["fewer_than_two_distinct_responses"] == 1
    assert report["drops"]["no_correct_response"] == 1
    assert report["pairs_out"] + sum(report["drops"].values()) == 6
    assert report["pairs_agreeing_with_answer"] == 1.0  # --require_correct: chosen right, rejected wrong
    assert (tmp_path / "out" / "margins.png").stat().st_size > 0

    pairs = load_dataset("parquet", data_files=str(tmp_path / "out" / "pairs.parquet"), split="train")
    assert {"images", "prompt", "chosen", "rejected"} <= set(pairs.column_names)
    # One row per response: the packed N-way scores of build_mpo_data must match it.
    scorer = RewardScorer(ValueHeadRewardModel.from_pretrained(reward_model, dtype=torch.float32),
                          AutoProcessor.from_pretrained(reward_model), shared_prompt=False)
    rows = {json.loads(line)["id"]: json.loads(line) for line in prompts.read_text().splitlines()}
    for pair in pairs:
        row = rows[pair["id"]]
        images = [str(tmp_path / p) for p in row.get("images", [row.get("image")] if row.get("image") else [])]
        assert len(pair["images"]) == len(images)
        chosen, rejected = pair["chosen"][0]["content"][0]["text"], pair["rejected"][0]["content"][0]["text"]
        expected = scorer.score([{"images": images, "prompt": row["prompt"], "response": r} for r in (chosen, rejected)])
        torch.testing.assert_close(torch.tensor([pair["chosen_reward"], pair["rejected_reward"]],
                                                dtype=torch.float32), torch.tensor(expected), atol=1e-4, rtol=0)
        assert pair["chosen_reward"] > pair["rejected_reward"]
        if "answer" in row:
            assert row["answer"] in chosen and row["answer"] not in rejected

    # Resume: scored.jsonl cut mid-line by an interrupted run; only the lost prompts are scored again.
    part = tmp_path / "out" / "scored.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:4]) + lines[4][:10])
    scored = []
    original = RewardScorer.score
    monkeypatch.setattr(RewardScorer, "score", lambda self, items, progress=False: scored.append(len(items))
                        or original(self, items, progress))
    again = build_mpo_data.main(args)
    assert scored == [2 + 3]  # rows 4 and 5: the cut line and the one after it
    assert again["pairs_out"] == report["pairs_out"] and again["drops"] == report["drops"]
    assert len(part.read_text().splitlines()) == 6


def test_build_mpo_data_generates_with_a_policy(reward_model, tiny_checkpoints, tmp_path):
    Image.new("RGB", (56, 56), (220, 30, 30)).save(tmp_path / "0.png")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"images": ["0.png"], "prompt": "What colour?"}) + "\n")
    args = BuildMPODataArguments(input=str(tmp_path / "prompts.jsonl"), reward_model=str(reward_model),
                                 policy_model_name_or_path=str(tiny_checkpoints("qwen2_5_vl")), num_responses=3,
                                 max_new_tokens=6, output_dir=str(tmp_path / "out"))
    report = build_mpo_data.main(args)
    record = json.loads((tmp_path / "out" / "scored.jsonl").read_text())
    assert json.loads((tmp_path / "out" / "scored.provenance.json").read_text())["num_responses"] == 3
    assert len(record["responses"]) == 3 and len(record["rewards"]) == 3
    assert report["responses_scored"] == 3


def test_build_mpo_data_refuses_scores_of_another_reward_model(reward_model, tiny_checkpoints, tmp_path,
                                                                 monkeypatch):
    prompts = write_prompts(tmp_path)
    args = BuildMPODataArguments(input=str(prompts), reward_model=str(reward_model), output_dir=str(tmp_path / "out"),
                                 max_samples=3)
    first = build_mpo_data.main(args)
    scored = tmp_path / "out" / "scored.jsonl"
    before = [json.loads(line)["rewards"] for line in scored.read_text().splitlines()]

    other = tmp_path / "other_rm"  # the same base, another value head
    torch.manual_seed(1)
    model = ValueHeadRewardModel.from_pretrained(tiny_checkpoints("qwen2_5_vl"), new_value_head=True,
                                                 dtype=torch.float32)
    torch.nn.init.normal_(model.v_head.summary.weight, std=1.0)
    model.save_pretrained(other)
    AutoProcessor.from_pretrained(reward_model).save_pretrained(other)
    rerun = BuildMPODataArguments(input=str(prompts), reward_model=str(other), output_dir=str(tmp_path / "out"),
                                  max_samples=3)
    with pytest.raises(StaleRecordsError, match="weights_fingerprint"):
        build_mpo_data.main(rerun)
    assert [json.loads(line)["rewards"] for line in scored.read_text().splitlines()] == before  # kept as they were

    calls = []
    original = RewardScorer.score
    monkeypatch.setattr(RewardScorer, "score", lambda self, items, progress=False: calls.append(len(items))
                        or original(self, items, progress))
    rerun.overwrite = True
    again = build_mpo_data.main(rerun)
    assert calls == [3 * 3] and again["prompts_in"] == first["prompts_in"] == 3  # every prompt scored afresh
    after = [json.loads(line)["rewards"] for line in scored.read_text().splitlines()]
    assert len(after) == 3 and after != before
    assert json.loads((tmp_path / "out" / "scored.provenance.json").read_text())["model"] == str(other)



def test_build_mpo_data_resume_takes_each_prompts_own_scores(reward_model, tmp_path, monkeypatch):
    """Rows without `id`, a run interrupted after two prompts, then a prompt inserted at the top: every pair keeps
    its own prompt's responses and rewards (by line number, most took another prompt's)."""
    prompts = write_prompts(tmp_path)
    rows = [{k: v for k, v in json.loads(line).items() if k != "id"} for line in prompts.read_text().splitlines()]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = BuildMPODataArguments(input=str(prompts), reward_model=str(reward_model), output_dir=str(tmp_path / "out"),
                                 prompts_per_write=2, require_correct=False)
    original, scored = RewardScorer.score, []

    def interrupted_after_one_write(self, items, progress=False):
        if scored:
            raise KeyboardInterrupt
        scored.append(items)
        return original(self, items, progress)

    monkeypatch.setattr(RewardScorer, "score", interrupted_after_one_write)
    with pytest.raises(KeyboardInterrupt):
        build_mpo_data.main(args)
    new = {"images": ["2.png"], "prompt": "Which colour is it?", "responses": ["green", "The shape is red."]}
    prompts.write_text("".join(json.dumps(row) + "\n" for row in [new, *rows]))
    scored.clear()
    monkeypatch.setattr(RewardScorer, "score", lambda self, items, progress=False: scored.extend(items)
                        or original(self, items, progress))
    build_mpo_data.main(args)
    # The new prompt and the four not reached, never the two scored before (now rows 1 and 2).
    assert list(dict.fromkeys(item["prompt"] for item in scored)) == [new["prompt"]] + [row["prompt"] for row in rows[2:]]
    assert len(scored) == 2 + 3 + 2 + 2 + 3
    fresh_dir = tmp_path / "fresh"
    build_mpo_data.main(BuildMPODataArguments(**{**vars(args), "output_dir": str(fresh_dir)}))
    resumed = load_dataset("parquet", data_files=str(tmp_path / "out" / "pairs.parquet"), split="train").to_list()
    fresh = load_dataset("parquet", data_files=str(fresh_dir / "pairs.parquet"), split="train").to_list()
    assert len(resumed) == len(fresh) == 6
    for a, b in zip(resumed, fresh):
        assert (a["prompt"], a["chosen"], a["rejected"]) == (b["prompt"], b["chosen"], b["rejected"])
        assert a["chosen_reward"] == pytest.approx(b["chosen_reward"], abs=1e-5)


def test_build_mpo_data_shares_prompts_across_two_processes(reward_model, tmp_path):
    prompts = write_prompts(tmp_path)
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(ROOT / "recipes" / "mpo" / "build_mpo_data.py"), "--input",
               str(prompts), "--reward_model", str(reward_model), "--output_dir", str(tmp_path / "out"),
               "--prompts_per_write", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH="")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the workers too, not only the launcher
        raise
    assert process.returncode == 0, stderr[-3000:]
    lines = (tmp_path / "out" / "scored.jsonl").read_text().splitlines()
    ids = [json.loads(line)["id"] for line in prompts.read_text().splitlines()]
    assert [json.loads(line)["id"] for line in lines] == ids  # each row once, in order
    assert not list((tmp_path / "out").glob("scored.part-*.jsonl"))
    assert json.loads((tmp_path / "out" / "report.json").read_text())["prompts_in"] == 6


def test_bad_input_names_the_line(tmp_path):
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "x", "images": ["missing.png"]}) + "\n")
    with pytest.raises(FileNotFoundError, match="line 1"):
        build_mpo_data.read_prompts(tmp_path / "prompts.jsonl")


def test_mpo_trains_the_language_model_not_the_vision_tower(reward_model, tiny_checkpoints, tmp_path):
    prompts = write_prompts(tmp_path)
    build_mpo_data.main(BuildMPODataArguments(input=str(prompts), reward_model=str(reward_model),
                                              output_dir=str(tmp_path / "data"), require_correct=False))
    policy_path = tiny_checkpoints("qwen2_5_vl")
    config = MPOConfig(output_dir=str(tmp_path / "mpo"), max_steps=3, per_device_train_batch_size=2,
                       learning_rate=1e-2, use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1)
    assert config.loss_type == ["sigmoid", "bco_pair", "sft"] and config.loss_weights == [0.8, 0.2, 1.0]
    trainer = train_mpo(MPOArguments(dataset=str(tmp_path / "data" / "pairs.parquet")), config,
                        ModelConfig(model_name_or_path=str(policy_path), dtype="float32"))
    model = trainer.model
    before = type(model).from_pretrained(policy_path, dtype=torch.float32).state_dict()
    projector = {id(p) for module in find_projectors(model) for p in module.parameters()}  # it trains, as in the RM
    tower = {name for name, p in model.named_parameters()
             if id(p) in {id(q) for q in find_vision_tower(model).parameters()} - projector}
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert tower and not changed & tower
    assert any("language_model" in name for name in changed)
    assert any(log.get("loss") is not None for log in trainer.state.log_history)
