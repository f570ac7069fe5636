"""The whole pipeline on a CPU, offline, in minutes: `make demo`.

1. builds a tiny random-init model of the Qwen2.5-VL architecture (tokenizer trained here),
2. writes synthetic preference pairs whose right answer can only be known from the image, plus text pairs,
3. runs recipes/stage1.py then recipes/stage2.py with recipes/demo/stage{1,2}.yaml (the same recipes and
   trainer as the GPU run, only a tiny preset),
4. scores held-out pairs: with their images, with the images blanked (a model that looks at the image
   falls to chance), and text-only pairs; video pairs (which way a shape moves) with their frames in order and
   shuffled, and pairs whose responses are images (which one draws the asked colour) with those images and blanked,
5. MPO (paper §6): the stage-2 reward model picks chosen and rejected among candidate answers, right or wrong
   about the image (recipes/mpo/build_mpo_data.py), and recipes/mpo/mpo.py trains a tiny policy (the same
   random-init tiny model) on those pairs with recipes/demo/mpo.yaml; the policy's preference for right answers on
   held-out pairs (log-probability margin accuracy) is measured before and after.

Writes outputs/demo/report.json, outputs/demo/summary.md, the final reward model in outputs/demo/stage2, the MPO
pairs in outputs/demo/mpo_data and the policy in outputs/demo/mpo.

    python recipes/demo/run.py [recipe flags for both stages, e.g. --pack_pairs false]
"""

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # heads/ and collators/

from PIL import Image  # noqa: E402
from synthetic_data import (  # noqa: E402
    FRAME_SIZE, blank_image, write_drawing_pairs, write_image_pairs, write_motion_pairs, write_mpo_prompts,
    write_text_pairs,
)
from tiny_model import save_tiny_model  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from heads import RewardScorer  # noqa: E402
from recipes.mpo.evaluate import preference_accuracy  # noqa: E402

OUT = ROOT / "outputs" / "demo"
DATA = OUT / "data"
SIZES = {"stage1": 2000, "stage2_text": 600, "heldout": 400, "text_heldout": 200, "mpo_prompts": 1000,
         "mpo_heldout": 400, "motion": 400, "motion_heldout": 200, "drawing": 400, "drawing_heldout": 200}


def run_stage(stage: str, overrides: list[str]) -> None:
    run_script(f"recipes/{stage}.py", ["--config", str(ROOT / "recipes" / "demo" / f"{stage}.yaml"), *overrides])


def run_script(script: str, args: list[str]) -> None:
    command = [sys.executable, str(ROOT / script), *args]
    print(f"\n$ {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def pair_accuracy(scorer: RewardScorer, path: Path, blank: bool = False) -> tuple[float, dict[str, float]]:
    """Fraction of pairs with r(chosen) > r(rejected), overall and per task."""
    rows = [json.loads(line) for line in path.open()]
    items = []
    for row in rows:
        images = [blank_image() for _ in row["images"]] if blank else [str(path.parent / i) for i in row["images"]]
        items += [{"images": images, "prompt": row["prompt"], "response": row[side]} for side in ("chosen", "rejected")]
    scores = scorer.score(items, progress=True)
    correct = [scores[2 * i] > scores[2 * i + 1] for i in range(len(rows))]
    per_task = {}
    for row, ok in zip(rows, correct):
        per_task.setdefault(row["source"], []).append(ok)
    return sum(correct) / len(correct), {task: round(sum(v) / len(v), 4) for task, v in sorted(per_task.items())}


def media_pair_accuracy(scorer: RewardScorer, path: Path, control: str | None = None) -> float:
    """Fraction of video / image-in-response pairs with r(chosen) > r(rejected); control "shuffled" shuffles each
    video's frames, "blank" blanks the responses' images."""
    rows, rng = [json.loads(line) for line in path.open()], random.Random(0)

    def response(value):
        if isinstance(value, str):
            return value
        return [dict(m, content=[dict(part, image=blank_image(FRAME_SIZE)
                                      if control == "blank" else str(path.parent / part["image"]))
                                 if part["type"] == "image" else part for part in m["content"]]) for m in value]

    items = []
    for row in rows:
        videos = [[str(path.parent / frame) for frame in video] for video in row.get("videos", [])]
        if control == "shuffled":
            videos = [rng.sample(video, len(video)) for video in videos]
        items += [{"images": [], "videos": videos, "prompt": row["prompt"], "response": response(row[side])}
                  for side in ("chosen", "rejected")]
    scores = scorer.score(items, progress=True)
    return sum(scores[2 * i] > scores[2 * i + 1] for i in range(len(rows))) / len(rows)


def evaluate(checkpoint: Path) -> dict:
    scorer = RewardScorer.from_pretrained(str(checkpoint), batch_size=64)
    heldout, per_task = pair_accuracy(scorer, DATA / "heldout.jsonl")
    blind, _ = pair_accuracy(scorer, DATA / "heldout.jsonl", blank=True)
    text, _ = pair_accuracy(scorer, DATA / "text_heldout.jsonl")
    media = {"motion_accuracy": media_pair_accuracy(scorer, DATA / "motion_heldout.jsonl"),
             "motion_shuffled_accuracy": media_pair_accuracy(scorer, DATA / "motion_heldout.jsonl", "shuffled"),
             "drawing_accuracy": media_pair_accuracy(scorer, DATA / "drawing_heldout.jsonl"),
             "drawing_blind_accuracy": media_pair_accuracy(scorer, DATA / "drawing_heldout.jsonl", "blank")}
    return {"heldout_accuracy": round(heldout, 4), "blind_accuracy": round(blind, 4),
            "text_accuracy": round(text, 4), "heldout_accuracy_per_task": per_task,
            **{key: round(value, 4) for key, value in media.items()}}


def preference_pairs(path: Path) -> list[dict]:
    """Held-out image pairs in TRL's preference format, images decoded once for both measurements."""
    rows = [json.loads(line) for line in path.open()]
    return [{"images": [Image.open(path.parent / image).convert("RGB") for image in row["images"]],
             "prompt": [{"role": "user", "content": row["prompt"]}],
             "chosen": [{"role": "assistant", "content": row["chosen"]}],
             "rejected": [{"role": "assistant", "content": row["rejected"]}]} for row in rows]


def policy_preference(policy: Path, pairs: list[dict]) -> dict:
    """How often the policy gives the right answer a higher log-probability than the wrong one."""
    model = AutoModelForImageTextToText.from_pretrained(policy, dtype="float32")
    return preference_accuracy(model, AutoProcessor.from_pretrained(policy), pairs, batch_size=32)


def run_mpo() -> dict:
    """The reward model builds MPO pairs from candidate answers; MPO trains the tiny policy on them."""
    start = time.perf_counter()
    write_mpo_prompts(DATA / "mpo_prompts.jsonl", SIZES["mpo_prompts"], seed=5)
    write_image_pairs(DATA / "mpo_heldout.jsonl", SIZES["mpo_heldout"], seed=6)
    # No --require_correct: the reward model alone decides, and the ground truth only measures its pairs. Every run
    # trains a new reward model, so the scores an earlier run left are discarded (--overwrite), not refused.
    run_script("recipes/mpo/build_mpo_data.py", [
        "--input", str(DATA / "mpo_prompts.jsonl"), "--reward_model", str(OUT / "stage2"),
        "--output_dir", str(OUT / "mpo_data"), "--require_correct", "false", "--batch_size", "64",
        "--overwrite", "true"])
    data = json.loads((OUT / "mpo_data" / "report.json").read_text())
    heldout = preference_pairs(DATA / "mpo_heldout.jsonl")
    before = policy_preference(OUT / "tiny-qwen2_5_vl", heldout)
    run_script("recipes/mpo/mpo.py", ["--config", str(ROOT / "recipes" / "demo" / "mpo.yaml"),
                                      "--model_name_or_path", str(OUT / "tiny-qwen2_5_vl"),
                                      "--dataset", str(OUT / "mpo_data" / "pairs.parquet"), "--output_dir", str(OUT / "mpo")])
    after = policy_preference(OUT / "mpo", heldout)
    return {"prompts": data["prompts_in"], "pairs": data["pairs_out"], "drops": data["drops"],
            "pairs_agreeing_with_truth": data["pairs_agreeing_with_answer"],
            "reward_model_best_of_n_correct": data["best_of_n_correct"],
            "policy_right_answer_preferred_before": before["accuracy"],
            "policy_right_answer_preferred_after": after["accuracy"],
            "policy_mean_log_prob_margin_before": before["mean_margin"],
            "policy_mean_log_prob_margin_after": after["mean_margin"],
            "seconds": round(time.perf_counter() - start, 1)}


TINY_MODEL = {"family": "qwen2_5_vl", "hidden_size": 128, "num_layers": 4}


def settings(overrides: list[str]) -> dict:
    """What the numbers were measured with: the model, the flags, the packages and the machine."""
    import torch
    import transformers
    import trl

    return {"model": dict(TINY_MODEL, parameters=parameter_count(OUT / "tiny-qwen2_5_vl")),
            "configs": [f"recipes/demo/{stage}.yaml" for stage in ("stage1", "stage2", "mpo")],
            "commit": commit(),
            "flags": overrides, "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def commit() -> str | None:
    """The repository's commit, with "+changes" when files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def parameter_count(directory: Path) -> int:
    from safetensors import safe_open

    count = 0
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as weights:
            count += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return count


def main() -> None:
    start, load_before = time.perf_counter(), os.getloadavg()
    save_tiny_model(TINY_MODEL["family"], OUT / "tiny-qwen2_5_vl", hidden_size=TINY_MODEL["hidden_size"],
                    num_layers=TINY_MODEL["num_layers"])
    write_image_pairs(DATA / "stage1.jsonl", SIZES["stage1"], seed=1)
    write_text_pairs(DATA / "stage2_text.jsonl", SIZES["stage2_text"], seed=2)
    write_image_pairs(DATA / "heldout.jsonl", SIZES["heldout"], seed=3)
    write_text_pairs(DATA / "text_heldout.jsonl", SIZES["text_heldout"], seed=4)
    write_motion_pairs(DATA / "motion.jsonl", SIZES["motion"], seed=7)
    write_motion_pairs(DATA / "motion_heldout.jsonl", SIZES["motion_heldout"], seed=8)
    write_drawing_pairs(DATA / "drawing.jsonl", SIZES["drawing"], seed=9)
    write_drawing_pairs(DATA / "drawing_heldout.jsonl", SIZES["drawing_heldout"], seed=10)

    overrides = sys.argv[1:]  # recipe flags for both stages, e.g. --pack_pairs false
    run_stage("stage1", overrides)
    stage1 = evaluate(OUT / "stage1")
    run_stage("stage2", overrides)
    report = evaluate(OUT / "stage2")
    mpo = run_mpo()
    report.update(stage1=stage1, mpo=mpo, pairs=SIZES, seconds=round(time.perf_counter() - start, 1),
                  settings=settings(overrides),
                  # other jobs on the machine slow the run: its 1-minute load average at the start and at the end
                  load_average={"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)})
    (OUT / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    summary = "\n".join([
        "# Demo: tiny Qwen2.5-VL reward model, trained on CPU",
        "",
        "| held-out pairs | after stage 1 | after stage 2 |",
        "| --- | --- | --- |",
        f"| image pairs (accuracy) | {stage1['heldout_accuracy']:.3f} | {report['heldout_accuracy']:.3f} |",
        f"| same pairs, images blanked | {stage1['blind_accuracy']:.3f} | {report['blind_accuracy']:.3f} |",
        f"| text-only pairs | {stage1['text_accuracy']:.3f} | {report['text_accuracy']:.3f} |",
        f"| video pairs: which way the shape moves | {stage1['motion_accuracy']:.3f} | {report['motion_accuracy']:.3f} |",
        f"| same videos, frames shuffled | {stage1['motion_shuffled_accuracy']:.3f} | "
        f"{report['motion_shuffled_accuracy']:.3f} |",
        f"| image responses: which draws the asked colour | {stage1['drawing_accuracy']:.3f} | "
        f"{report['drawing_accuracy']:.3f} |",
        f"| same pairs, response images blanked | {stage1['drawing_blind_accuracy']:.3f} | "
        f"{report['drawing_blind_accuracy']:.3f} |",
        "",
        f"Per task after stage 2: {report['heldout_accuracy_per_task']}",
        "",
        f"MPO: the stage-2 reward model built {mpo['pairs']} pairs from {mpo['prompts']} prompts with candidate "
        f"answers; {mpo['pairs_agreeing_with_truth']:.3f} of them have a right chosen and a wrong rejected answer.",
        "",
        "| held-out image pairs | policy before MPO | after MPO |",
        "| --- | --- | --- |",
        f"| right answer more likely than wrong | {mpo['policy_right_answer_preferred_before']:.3f} | "
        f"{mpo['policy_right_answer_preferred_after']:.3f} |",
        f"| mean log-prob margin (right - wrong) | {mpo['policy_mean_log_prob_margin_before']:.3f} | "
        f"{mpo['policy_mean_log_prob_margin_after']:.3f} |",
        "",
        f"Wall time: {report['seconds']} s. Checkpoint: {OUT / 'stage2'} (base model + value_head.safetensors).",
    ])
    (OUT / "summary.md").write_text(summary + "\n")
    print("\n" + summary)


if __name__ == "__main__":
    main()
