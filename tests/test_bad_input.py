"""Every entry point with every bad input it can meet: a counted drop, or a clear error naming the file, the row and
what is wrong; never a crash mid-run, never a stale or wrong number. Also the runs that must repeat exactly.

Entry points: the training-data check (load_preference_mixture, used by the stage recipes), score.py, the
evaluators (recipes/eval/*), model loading (ValueHeadRewardModel / RewardScorer) and the stage recipes.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor
from trl import ModelConfig, RewardConfig, TrlParser

from collators import PreferenceDataArguments, load_preference_mixture, to_messages
from collators.preference_data import BadRowError
from heads import RewardModelArguments, RewardScorer, ValueHeadRewardModel, resume_checkpoint
from heads.scoring import weights_fingerprint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipes import score as score_cli  # noqa: E402
from recipes import stage1  # noqa: E402
from recipes.eval import rewardbench as rb  # noqa: E402
from recipes.eval.benchmark import PREDICTIONS_FILE, read_predictions  # noqa: E402
from recipes.shared.resumable import StaleRecordsError  # noqa: E402


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def data_dir(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (56, 56), "red").save(tmp_path / "img" / "ok.png")
    Image.new("RGB", (4000, 10), "red").save(tmp_path / "img" / "sliver.png")  # aspect ratio 400: qwen-vl-utils refuses
    return tmp_path


def reward_model(base: Path, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    ValueHeadRewardModel.from_pretrained(base, new_value_head=True).save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tiny_checkpoints, tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny reward models in the release layout that differ only in their value heads."""
    base = tiny_checkpoints("qwen2_5_vl")
    return (reward_model(base, tmp_path_factory.mktemp("rm_a"), seed=1),
            reward_model(base, tmp_path_factory.mktemp("rm_b"), seed=2))


# --- the training-data check ---------------------------------------------------------------------------------------

GOOD = {"images": ["img/ok.png"], "prompt": "Colour?", "chosen": "red", "rejected": "blue"}
BAD_ROWS = {  # reason -> a row with that problem; each crashed the check or training before
    "bad_prompt": dict(GOOD, prompt=None),
    "bad_response": dict(GOOD, chosen=7),
    "unusable_image": dict(GOOD, images=["img/sliver.png"]),
    "bad_margin": dict(GOOD, margin=None),
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_training_data_counts_each_bad_row(processor, data_dir, reason):
    rows = [dict(GOOD, margin=0.5), {"margin": 0.0, **BAD_ROWS[reason]}, dict(GOOD, margin=1.0)]
    path = write_jsonl(data_dir / "pairs.jsonl", rows)
    dataset, report = load_preference_mixture({str(path): 1.0}, processor, max_length=256)
    entry = report[str(path)]
    assert entry["dropped"] == {reason: 1} and entry["kept"] == 2 and len(dataset) == 2
    assert entry["examples"][reason].startswith(f"{path}: row 1: ")
    assert dataset["margin"] == [0.5, 1.0]


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_training_data_bad_row_is_an_error_on_request(processor, data_dir, reason):
    path = write_jsonl(data_dir / "pairs.jsonl", [dict(GOOD, margin=0.0), {"margin": 0.0, **BAD_ROWS[reason]}])
    with pytest.raises(BadRowError, match=r"pairs\.jsonl: row 1: "):
        load_preference_mixture({str(path): 1.0}, processor, max_length=256, bad_rows="error")


def test_non_numeric_margin_is_counted(processor, data_dir):
    path = write_jsonl(data_dir / "pairs.jsonl", [dict(GOOD, margin=0.5), dict(GOOD, margin="high")])
    dataset, report = load_preference_mixture({str(path): 1.0}, processor, max_length=256)
    assert report[str(path)]["dropped"] == {"bad_margin": 1} and dataset["margin"] == [0.5]


# (max_abs_margin, margin) -> kept; a margin of 1e30 made the step loss 1e29, 1e40 (inf in fp32) a loss logged as 0
MARGINS = [(100.0, 0.5, True), (100.0, -100.0, True), (100.0, 100.5, False), (100.0, -1e30, False),
           (100.0, 1e30, False), (100.0, 1e40, False), (100.0, float("nan"), False), (1e31, 1e30, True),
           (float("inf"), 1e308, True), (float("inf"), float("nan"), False)]


@pytest.mark.parametrize("bound, margin, kept", MARGINS)
def test_margins_must_be_finite_and_within_the_bound(processor, data_dir, bound, margin, kept):
    path = write_jsonl(data_dir / "pairs.jsonl", [dict(GOOD, margin=1.0), dict(GOOD, margin=margin)])
    dataset, report = load_preference_mixture({str(path): 1.0}, processor, max_length=256, max_abs_margin=bound)
    assert dataset["margin"] == ([1.0, margin] if kept else [1.0])
    assert report[str(path)]["dropped"] == ({} if kept else {"bad_margin": 1})
    if not kept:
        assert report[str(path)]["dropped_rows"] == [{"file": str(path), "row": 1, "reason": "bad_margin", "message":
                                                      f"{path}: row 1: margin {margin!r} is not finite or exceeds "
                                                      f"max_abs_margin {bound} in size"}]


def test_empty_file_is_named(processor, data_dir):
    path = data_dir / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the file is empty"):
        load_preference_mixture({str(path): 1.0}, processor)


def test_mixture_with_every_row_dropped_names_files_and_reasons(processor, data_dir):
    a = write_jsonl(data_dir / "a.jsonl", [BAD_ROWS["bad_prompt"]])
    b = write_jsonl(data_dir / "b.jsonl", [dict(GOOD, images=["img/nowhere.png"])])
    with pytest.raises(ValueError, match=r"no pair is left") as error:
        load_preference_mixture({str(a): 1.0, str(b): 1.0}, processor)
    assert str(a)[-40:] in str(error.value) and "bad_prompt: 1" in str(error.value) and "missing_image: 1" in str(error.value)


def test_training_data_check_sees_images_as_they_are_now(processor, data_dir):
    """datasets caches map results by the jsonl file; the images may change between two runs."""
    path = write_jsonl(data_dir / "pairs.jsonl", [GOOD, dict(GOOD, images=["img/later.png"])])
    _, report = load_preference_mixture({str(path): 1.0}, processor, max_length=256)
    assert report[str(path)]["dropped"] == {"missing_image": 1}
    Image.new("RGB", (56, 56), "blue").save(data_dir / "img" / "later.png")  # fixed
    dataset, report = load_preference_mixture({str(path): 1.0}, processor, max_length=256)
    assert report[str(path)]["dropped"] == {} and len(dataset) == 2
    (data_dir / "img" / "ok.png").write_bytes(b"broken since")  # broken after a clean run
    dataset, report = load_preference_mixture({str(path): 1.0}, processor, max_length=256)
    assert report[str(path)]["dropped"] == {"corrupt_image": 1} and len(dataset) == 1


# --- loading ---------------------------------------------------------------------------------------------------------

def test_missing_path_is_called_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such directory"):
        ValueHeadRewardModel.from_pretrained(str(tmp_path / "outputs" / "nowhere" / "stage2"))


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a model directory: it has no config\.json"):
        ValueHeadRewardModel.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("head, error", [
    ({"v_head.summary.weight": torch.zeros(1, 64), "v_head.summary.bias": torch.zeros(1),
      "v_head.extra": torch.zeros(1)}, r"expected exactly the keys .* found .*v_head\.extra"),
    ({"v_head.summary.weight": torch.zeros(1, 7), "v_head.summary.bias": torch.zeros(1)},
     r"v_head\.summary\.weight has shape \[1, 7\], expected \[1, \d+\]"),
])
def test_value_head_file_is_checked(models, tmp_path, head, error):
    directory = tmp_path / "rm"
    directory.mkdir()
    for file in models[0].iterdir():
        os.link(file, directory / file.name)
    (directory / "value_head.safetensors").unlink()
    if head["v_head.summary.weight"].shape[-1] == 64:
        hidden = load_file(models[0] / "value_head.safetensors")["v_head.summary.weight"].shape[-1]
        head["v_head.summary.weight"] = torch.zeros(1, hidden)
    save_file(head, str(directory / "value_head.safetensors"))
    with pytest.raises(ValueError, match=rf"value_head\.safetensors: {error}"):
        ValueHeadRewardModel.from_pretrained(str(directory))


# --- score.py ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image, error", [
    ("img/sliver.png", r"in\.jsonl line 2: image .*img/sliver\.png cannot be resized for the model"),
    ("img/text.png", r"in\.jsonl line 2: image .*img/text\.png cannot be decoded"),
])
def test_score_cli_names_the_line_of_an_image_the_model_cannot_use(models, data_dir, image, error):
    (data_dir / "img" / "text.png").write_text("not a png")
    requests = write_jsonl(data_dir / "in.jsonl", [{"image": "img/ok.png", "prompt": "Colour?", "response": "red"},
                                                   {"image": image, "prompt": "Colour?", "response": "red"}])
    with pytest.raises(ValueError, match=error):
        score_cli.main(score_cli.ScoreFileArguments(model_name_or_path=str(models[0]), input=str(requests),
                                                    output=str(data_dir / "out.jsonl")))


def test_score_cli_keeps_what_it_scored_before_a_bad_image_and_resumes(models, data_dir, monkeypatch):
    lines = [{"image": "img/ok.png", "prompt": f"Colour {i}?", "response": "red"} for i in range(40)]
    (data_dir / "img" / "bad.png").write_bytes(b"not a png")
    lines[35]["image"] = "img/bad.png"
    requests = write_jsonl(data_dir / "in.jsonl", lines)
    output = data_dir / "out" / "scored.jsonl"
    args = score_cli.ScoreFileArguments(model_name_or_path=str(models[0]), input=str(requests), output=str(output))
    scored = []
    original = RewardScorer.score
    monkeypatch.setattr(RewardScorer, "score", lambda self, items, progress=False: scored.extend(items) or original(self, items))
    with pytest.raises(ValueError, match=r"in\.jsonl line 36: image .*img/bad\.png cannot be decoded"):
        score_cli.main(args)
    assert len(read_predictions(output.parent / "scored.progress.jsonl")) == score_cli.LINES_PER_WRITE
    assert not output.exists()

    Image.new("RGB", (56, 56), "red").save(data_dir / "img" / "bad.png")  # fixed; the rerun scores only the rest
    scored.clear()
    result = score_cli.main(args)
    assert len(scored) == 40 - score_cli.LINES_PER_WRITE
    assert [line["prompt"] for line in result] == [f"Colour {i}?" for i in range(40)]
    expected = original(RewardScorer.from_pretrained(str(models[0])), [
        {"images": [str(data_dir / line["image"])], "prompt": line["prompt"], "response": "red"} for line in lines])
    assert [line["score"] for line in result] == pytest.approx(expected, abs=1e-5)
    assert [json.loads(line) for line in output.read_text().splitlines()] == result
    assert not (output.parent / "scored.progress.jsonl").exists()


SCORE_LINES = [{"image": f"img/{colour}.png", "prompt": f"Colour {i}?", "responses": [colour, "green", f"{i}"]}
               for i, colour in enumerate(["red", "blue", "red", "blue", "red"])]
# How the input changed between an interrupted run (lines 1-2 scored) and its rerun -> the prompts the rerun scores.
CHANGED_INPUTS = {
    "a line inserted at the top": (lambda lines: [dict(lines[0], prompt="New?")] + lines,
                                   ["New?", "Colour 2?", "Colour 3?", "Colour 4?"]),
    "reordered": (lambda lines: lines[::-1], ["Colour 4?", "Colour 3?", "Colour 2?"]),
    "a response edited": (lambda lines: [dict(lines[0], responses=["red", "blue", "0"]), *lines[1:]],
                          ["Colour 0?", "Colour 2?", "Colour 3?", "Colour 4?"]),
    "a field that is not scored edited": (lambda lines: [dict(lines[0], note="checked"), *lines[1:]],
                                          ["Colour 2?", "Colour 3?", "Colour 4?"]),
    "grown": (lambda lines: lines + [dict(lines[1], prompt="More?")], ["Colour 2?", "Colour 3?", "Colour 4?", "More?"]),
    "an image replaced under its name": (None, ["Colour 0?", "Colour 2?", "Colour 3?", "Colour 4?"]),
}


@pytest.mark.parametrize("change", sorted(CHANGED_INPUTS))
def test_score_cli_resume_gives_every_line_its_own_scores(models, data_dir, monkeypatch, change):
    """Interrupted after two lines, then rerun on a changed input: each line gets the scores of its own content."""
    for colour in ("red", "blue"):
        Image.new("RGB", (56, 56), colour).save(data_dir / "img" / f"{colour}.png")
    requests = write_jsonl(data_dir / "in.jsonl", SCORE_LINES)
    output = data_dir / "out" / "scored.jsonl"
    args = score_cli.ScoreFileArguments(model_name_or_path=str(models[0]), input=str(requests), output=str(output))
    monkeypatch.setattr(score_cli, "LINES_PER_WRITE", 2)
    original, scored = RewardScorer.score, []

    def interrupted_after_one_write(self, items, progress=False):
        if scored:
            raise KeyboardInterrupt
        scored.append(items)
        return original(self, items)

    monkeypatch.setattr(RewardScorer, "score", interrupted_after_one_write)
    with pytest.raises(KeyboardInterrupt):
        score_cli.main(args)
    edit, rescored = CHANGED_INPUTS[change]
    if edit is None:
        Image.new("RGB", (56, 56), "green").save(data_dir / "img" / "red.png")
        lines = SCORE_LINES
    else:
        lines = edit(SCORE_LINES)
    write_jsonl(requests, lines)
    monkeypatch.setattr(RewardScorer, "score", lambda self, items, progress=False: scored.extend(items)
                        or original(self, items))
    scored.clear()
    result = score_cli.main(args)
    # score.py hands the scorer canonical messages (placeholders with their media): the prompt's text names the line
    assert list(dict.fromkeys(to_messages(item["prompt"], "user")[-1]["content"][-1]["text"] for item in scored)) == rescored
    fresh = original(RewardScorer.from_pretrained(str(models[0])), [
        {"images": [str(data_dir / line["image"])], "prompt": line["prompt"], "response": response}
        for line in lines for response in line["responses"]])
    assert [score for line in result for score in line["scores"]] == pytest.approx(fresh, abs=1e-5)
    assert [line["prompt"] for line in result] == [line["prompt"] for line in lines]


def test_score_cli_refuses_progress_of_another_model(models, data_dir):
    requests = write_jsonl(data_dir / "in.jsonl", [{"prompt": "Hi", "response": "Hello"}] * 3)
    output = data_dir / "scored.jsonl"
    write_jsonl(data_dir / "scored.progress.jsonl", [{"line": 1, "scores": [0.0]}])  # an earlier version's progress
    args = score_cli.ScoreFileArguments(model_name_or_path=str(models[0]), input=str(requests), output=str(output))
    with pytest.raises(StaleRecordsError, match=r"keyed by line number .* --overwrite true"):
        score_cli.main(args)
    write_jsonl(data_dir / "scored.progress.jsonl", [{"key": "0" * 64, "scores": [0.0]}])  # left by an interrupted run
    with pytest.raises(StaleRecordsError, match=r"no record of what produced them.* --overwrite true"):
        score_cli.main(args)
    args.overwrite = True
    lines = score_cli.main(args)
    assert lines[0]["score"] == pytest.approx(RewardScorer.from_pretrained(str(models[0])).score(
        [{"images": [], "prompt": "Hi", "response": "Hello"}])[0], abs=1e-5)


def test_score_cli_warns_on_empty_input(data_dir, caplog):
    requests = data_dir / "in.jsonl"
    requests.write_text("\n")
    assert score_cli.main(score_cli.ScoreFileArguments(input=str(requests), output=str(data_dir / "o.jsonl"))) == []
    assert "holds no lines to score" in caplog.text and (data_dir / "o.jsonl").read_text() == ""


# --- evaluators ----------------------------------------------------------------------------------------------------------

REWARDBENCH = [{"id": i, "prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No.",
                "subset": "alpacaeval-easy"} for i in range(6)]


def rewardbench_args(model: Path, data: Path, out: Path, **extra) -> rb.RewardBenchArguments:
    return rb.RewardBenchArguments(model_name_or_path=str(model), dataset=str(data), output_dir=str(out), **extra)


def test_evaluator_never_reports_another_models_predictions(models, tmp_path):
    data = write_jsonl(tmp_path / "rb.jsonl", REWARDBENCH)
    out = tmp_path / "eval"
    rb.main(rewardbench_args(models[0], data, out))
    first = read_predictions(out / PREDICTIONS_FILE)
    with pytest.raises(StaleRecordsError, match=r"weights_fingerprint"):
        rb.main(rewardbench_args(models[1], data, out))
    rb.main(rewardbench_args(models[1], data, out, overwrite=True))
    second = read_predictions(out / PREDICTIONS_FILE)
    assert [p["scores"] for p in second] != [p["scores"] for p in first]
    assert json.loads((out / "metrics.json").read_text())["model"] == str(models[1])
    with pytest.raises(StaleRecordsError, match=r"max_pixels"):  # the same model with another pixel budget
        rb.main(rewardbench_args(models[1], data, out, max_pixels=28 * 28 * 4))


@pytest.mark.parametrize("part", ["v_head.summary.weight", "v_head.summary.bias",
                                  "pretrained_model.model.language_model.layers.0.mlp.up_proj.weight", None])
def test_weights_fingerprint_covers_the_value_head_and_the_backbone(models, part):
    model = ValueHeadRewardModel.from_pretrained(str(models[0]))
    before = weights_fingerprint(model)
    if part is not None:
        with torch.no_grad():
            model.get_parameter(part).add_(1e-3)
    assert (weights_fingerprint(model) != before) == (part is not None)


def test_evaluator_refuses_predictions_of_a_head_replaced_at_the_same_path(models, tmp_path):
    """A retrained value head written where the old one was: the path is the same, only the fingerprint differs."""
    model = tmp_path / "rm"
    shutil.copytree(models[0], model)
    data = write_jsonl(tmp_path / "rb.jsonl", REWARDBENCH)
    rb.main(rewardbench_args(model, data, tmp_path / "eval"))
    shutil.copy(models[1] / "value_head.safetensors", model / "value_head.safetensors")
    with pytest.raises(StaleRecordsError, match=r"\(weights_fingerprint: '\w+' then, '\w+' now\)"):
        rb.main(rewardbench_args(model, data, tmp_path / "eval"))


def test_recompute_counts_each_row_once(models, tmp_path):
    data = write_jsonl(tmp_path / "rb.jsonl", REWARDBENCH)
    out = tmp_path / "eval"
    metrics = rb.main(rewardbench_args(models[0], data, out))
    path = out / PREDICTIONS_FILE
    path.write_text(path.read_text() * 2)  # a file that holds every row twice
    recomputed = rb.main(rb.RewardBenchArguments(dataset="unused", output_dir=str(out), recompute=True))
    assert recomputed["categories"] == metrics["categories"]
    assert json.loads((out / "metrics.json").read_text())["items"] == len(REWARDBENCH)


def torchrun(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(ROOT / script), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH="")
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the workers too, not only the launcher
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_evaluator_and_score_cli_share_rows_across_two_processes(models, tmp_path):
    rows = [dict(row, id=i, prompt=f"Question {i} is longer {'x' * i}?") for i, row in enumerate(REWARDBENCH * 5)]
    data = write_jsonl(tmp_path / "rb.jsonl", rows)
    single = rb.main(rewardbench_args(models[0], data, tmp_path / "eval1"))
    first = {p["id"]: p for p in read_predictions(tmp_path / "eval1" / PREDICTIONS_FILE)}

    # Two processes resume what an interrupted two-process run left in its part files (the last line of one cut
    # short), on a benchmark reordered since.
    (tmp_path / "eval2").mkdir()
    shutil.copy(tmp_path / "eval1" / "predictions.provenance.json", tmp_path / "eval2")
    lines = (tmp_path / "eval1" / PREDICTIONS_FILE).read_text().splitlines(keepends=True)
    (tmp_path / "eval2" / "predictions.part-0.jsonl").write_text("".join(lines[0:20:2]))
    (tmp_path / "eval2" / "predictions.part-1.jsonl").write_text("".join(lines[1:19:2]) + lines[19][:30])
    reordered = write_jsonl(tmp_path / "rb_reordered.jsonl", rows[::-1])
    result = torchrun("recipes/eval/rewardbench.py", "--model_name_or_path", str(models[0]), "--dataset",
                      str(reordered), "--output_dir", str(tmp_path / "eval2"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert " 19/30 " in result.stderr  # the progress bar starts from the 19 rows already scored
    assert not list((tmp_path / "eval2").glob("predictions.part-*.jsonl"))
    resumed = read_predictions(tmp_path / "eval2" / PREDICTIONS_FILE)
    assert [p["id"] for p in resumed] == [row["id"] for row in rows[::-1]]  # each row once, in the benchmark's order
    for prediction in resumed:
        assert prediction["scores"] == pytest.approx(first[prediction["id"]]["scores"], abs=1e-5)
    two = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert two["categories"] == single["categories"]

    requests = write_jsonl(tmp_path / "in.jsonl", [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]]}
                                                   for r in rows])
    result = torchrun("recipes/score.py", "--model_name_or_path", str(models[0]), "--input", str(requests),
                      "--output", str(tmp_path / "scored.jsonl"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in scored] == [r["prompt"] for r in rows]
    for line, prediction in zip(scored, read_predictions(tmp_path / "eval1" / PREDICTIONS_FILE)):
        assert line["scores"] == pytest.approx(prediction["scores"], abs=1e-5)


# --- the pixel budget travels with the checkpoint ----------------------------------------------------------------------

STAGE_PARSER = TrlParser((PreferenceDataArguments, RewardModelArguments, RewardConfig, ModelConfig))


def train(base: Path, data: Path, out: Path, *extra: str) -> Path:
    argv = ["--model_name_or_path", str(base), "--dataset_mixture", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--max_steps", "2", "--learning_rate", "1e-2", "--bf16", "false",
            "--report_to", "none", "--use_cpu", "true", "--max_length", "512", "--disable_tqdm", "true",
            "--new_value_head", "true", *extra]
    stage1.main(*STAGE_PARSER.parse_args_and_config(argv))
    return out


def test_pixel_budget_of_training_is_the_default_of_every_later_load(tiny_checkpoints, data_dir):
    Image.new("RGB", (300, 200), "green").save(data_dir / "img" / "large.png")
    data = write_jsonl(data_dir / "pairs.jsonl", [dict(GOOD, images=["img/large.png"]), GOOD])
    budget = 112 * 112
    out = train(tiny_checkpoints("qwen2_5_vl"), data, data_dir / "run", "--max_pixels", str(budget),
                "--save_strategy", "no")
    scorer = RewardScorer.from_pretrained(str(out))
    assert scorer.renderer.max_pixels == budget
    item = {"images": [str(data_dir / "img" / "large.png")], "prompt": "Colour?", "response": "green"}
    explicit = RewardScorer.from_pretrained(str(out), max_pixels=budget)
    assert scorer.score([item]) == pytest.approx(explicit.score([item]), abs=1e-6)
    # Resized once: qwen-vl-utils already gives the size the processor keeps, so the processor's own resize is a no-op.
    image = scorer.renderer.load_image(item["images"][0])
    assert image.width * image.height <= budget
    grid = scorer.renderer.processing_class.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    patch = scorer.renderer.image_processor.patch_size
    assert (int(grid[1]) * patch, int(grid[2]) * patch) == (image.height, image.width)


# --- runs you can repeat and resume ------------------------------------------------------------------------------------

def test_same_arguments_and_seed_give_identical_weights(tiny_checkpoints, data_dir):
    data = write_jsonl(data_dir / "pairs.jsonl", [GOOD, dict(GOOD, chosen="blue", rejected="red"), GOOD])
    base = tiny_checkpoints("qwen2_5_vl")
    runs = [train(base, data, data_dir / f"run{i}", "--save_strategy", "no") for i in range(2)]
    first, second = (ValueHeadRewardModel.from_pretrained(str(run)).state_dict() for run in runs)
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_resume_true_skips_a_checkpoint_cut_short(tiny_checkpoints, data_dir):
    data = write_jsonl(data_dir / "pairs.jsonl", [GOOD, dict(GOOD, chosen="blue", rejected="red")])
    base = tiny_checkpoints("qwen2_5_vl")
    out = train(base, data, data_dir / "run", "--save_strategy", "steps", "--save_steps", "1")
    head = out / "checkpoint-2" / "value_head.safetensors"
    head.write_bytes(head.read_bytes()[:-100])  # cut short (a full disk): it was a raw SafetensorError naming no file
    resumed = train(base, data, out, "--save_strategy", "steps", "--save_steps", "1", "--resume_from_checkpoint", "true")
    state = json.loads((resumed / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and (resumed / "checkpoint-2" / "value_head.safetensors").is_file()
    with pytest.raises(ValueError, match=r"checkpoint-1 is incomplete or damaged \(no trainer_state\.json\)"):
        (out / "checkpoint-1" / "trainer_state.json").unlink()
        train(base, data, out, "--resume_from_checkpoint", str(out / "checkpoint-1"))


def checkpoint(directory: Path, state: str = "complete", sharded: bool = False) -> Path:
    """A checkpoint-N as the Trainer leaves it: weights, value head, trainer_state.json; or one part damaged."""
    directory.mkdir(parents=True)
    shards = {"model-00001-of-00002.safetensors": "a", "model-00002-of-00002.safetensors": "b"} if sharded else \
        {"model.safetensors": "a"}
    for name, key in shards.items():
        save_file({key: torch.ones(64)}, str(directory / name))
    if sharded:
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {v: k for k, v in shards.items()}}))
    save_file({"v_head.summary.weight": torch.ones(1, 8), "v_head.summary.bias": torch.ones(1)},
              str(directory / "value_head.safetensors"))
    (directory / "trainer_state.json").write_text("{}")
    if state == "no trainer_state.json":
        (directory / "trainer_state.json").unlink()
    elif state.startswith("cut "):
        path = directory / state.removeprefix("cut ")
        path.write_bytes(path.read_bytes()[:-10])
    elif state.startswith("dangling "):
        path = directory / state.removeprefix("dangling ")
        path.unlink()
        path.symlink_to(directory / "elsewhere.safetensors")
    elif state == "index names a missing tensor":
        index = directory / "model.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                    "c": "model-00001-of-00002.safetensors"}}))
    return directory


# checkpoints in output_dir {step: state} -> the one --resume_from_checkpoint true takes (None: none is usable)
RESUME_CASES = [
    ({1: "complete", 2: "complete", 3: "complete"}, 3),
    ({1: "complete", 2: "complete", 3: "no trainer_state.json"}, 2),
    ({1: "complete", 2: "complete", 3: "cut value_head.safetensors"}, 2),
    ({1: "complete", 2: "complete", 3: "cut model.safetensors"}, 2),
    ({1: "complete", 2: "complete", 3: "cut model-00002-of-00002.safetensors"}, 2),
    ({1: "complete", 2: "complete", 3: "dangling model-00001-of-00002.safetensors"}, 2),
    ({1: "complete", 2: "complete", 3: "index names a missing tensor"}, 2),
    ({1: "complete", 9: "complete", 10: "complete"}, 10),  # by step, not by name
    ({1: "cut value_head.safetensors"}, None),
]


@pytest.mark.parametrize("checkpoints, expected", RESUME_CASES)
def test_resume_true_takes_the_newest_usable_checkpoint(tmp_path, caplog, checkpoints, expected):
    for step, state in checkpoints.items():
        checkpoint(tmp_path / f"checkpoint-{step}", state, sharded="model-0" in state or "index" in state)
    args = SimpleNamespace(resume_from_checkpoint="true", output_dir=str(tmp_path))
    if expected is None:
        with pytest.raises(FileNotFoundError, match="no complete checkpoint-N"):
            resume_checkpoint(args)
    else:
        assert resume_checkpoint(args) == str(tmp_path / f"checkpoint-{expected}")
    damaged = [(step, state) for step, state in checkpoints.items() if state != "complete"]
    for step, state in damaged:  # the warning names the checkpoint and the file
        assert f"Skipping {tmp_path / f'checkpoint-{step}'}: incomplete or damaged" in caplog.text
        assert state.split(" ")[-1] in caplog.text or "tensor(s) its index names" in caplog.text
        args.resume_from_checkpoint = str(tmp_path / f"checkpoint-{step}")
        with pytest.raises(ValueError, match=rf"checkpoint-{step} is incomplete or damaged"):
            resume_checkpoint(args)


def test_every_dropped_row_is_listed_beside_the_data_report(tiny_checkpoints, data_dir):
    rows = [GOOD, dict(GOOD, margin=1e30), dict(GOOD, chosen=None), GOOD, dict(GOOD, margin=-1e30),
            dict(GOOD, images=["img/nowhere.png"])]
    data = write_jsonl(data_dir / "pairs.jsonl", [dict(row, margin=row.get("margin", 0.0)) for row in rows])
    out = train(tiny_checkpoints("qwen2_5_vl"), data, data_dir / "run", "--save_strategy", "no")
    dropped = [json.loads(line) for line in (out / "dropped_rows.jsonl").read_text().splitlines()]
    assert [(row["split"], row["file"], row["row"], row["reason"]) for row in dropped] == [
        ("train", str(data), 1, "bad_margin"), ("train", str(data), 2, "bad_response"),
        ("train", str(data), 4, "bad_margin"), ("train", str(data), 5, "missing_image")]
    report = json.loads((out / "data_report.json").read_text())[str(data)]
    assert report["dropped"] == {"bad_margin": 2, "bad_response": 1, "missing_image": 1} and report["kept"] == 2
    assert "dropped_rows" not in report


def test_a_non_finite_loss_stops_training(tiny_checkpoints, data_dir):
    data = write_jsonl(data_dir / "pairs.jsonl", [dict(GOOD, margin=1e40), dict(GOOD, margin=0.0)])  # inf in fp32
    with pytest.raises(FloatingPointError, match=r"The loss is \[inf\] at step 0: training stops"):
        train(tiny_checkpoints("qwen2_5_vl"), data, data_dir / "run", "--max_abs_margin", "inf",
              "--save_strategy", "no")


def test_make_stage1_without_gpus_says_so():
    result = subprocess.run(["make", "-s", "stage1", "NUM_GPUS=0"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "nvidia-smi lists none here" in result.stderr and "make demo" in result.stderr
