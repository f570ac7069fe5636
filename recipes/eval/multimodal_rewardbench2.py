"""Multimodal RewardBench 2 with a scalar reward model: the four tasks, responses that hold images.

Each pair is a prompt (text and images, `prompt_content`) and two responses (`response_a`, `response_b`: lists of
text and image parts; a text-to-image response is an image) with the better one named (`chosen`: "A" or "B").
Every response is scored as the assistant turn after the prompt, its images in place. Scoring as
facebookresearch/MMRB2's evaluate/compute_scores/compute_accuracy.py (commit 7ff0552): a judge sees each pair
forward (A, B) and reverse (B, A), each verdict counts, a task's accuracy is its correct verdicts over all verdicts,
and Overall pools the four tasks (micro). A scalar reward model gives both responses the same rewards in either
order, so its reverse verdict always equals the forward one: each pair is scored once and counts twice, which
leaves every accuracy equal to the share of pairs whose chosen response gets the strictly higher reward (a tie
is wrong in both orders).

The benchmark is built locally. Clone https://github.com/facebookresearch/MMRB2 and run
`python build_from_hf.py --output-dir .` in its benchmark/ folder: it writes t2i.json, edit.json, interleaved.json,
reasoning.json and the images/ and input_images/ folders their paths start from. Then:

    python recipes/eval/multimodal_rewardbench2.py --model_name_or_path Skywork/Skywork-VL-Reward-7B \
        --dataset MMRB2/benchmark --output_dir outputs/eval/skywork-vl-reward-7b/multimodal_rewardbench2

Rerunning the command resumes from output_dir/predictions.jsonl; --recompute rebuilds the reports from it without
a model. The data is CC BY-NC 4.0 and meant for benchmarking only, not for training.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

from trl import TrlParser

from recipes.eval.benchmark import EvaluationArguments, accuracy, accuracy_by_category, evaluate
from recipes.shared.images import resolve_image

# The official task files (compute_accuracy.py's --task image / edit / interleaved / reasoning) and our columns.
TASKS = {"t2i": "Text-to-Image", "edit": "Image Editing", "interleaved": "Interleaved", "reasoning": "Reasoning"}
COLUMNS = [*TASKS.values(), "Overall"]
# The results table of the benchmark's README (multimodal LLM judges), in percent; its Avg. is our Overall.
PUBLISHED = {
    "Qwen2.5-VL-7B": [50.4, 57.1, 48.4, 47.5, 50.9],
    "Qwen2.5-VL-72B": [59.1, 64.6, 62.3, 50.0, 59.0],
    "Qwen3-VL-8B": [59.4, 61.7, 61.5, 54.6, 59.3],
    "Qwen3-VL-32B": [64.1, 67.3, 70.5, 56.6, 64.6],
    "GPT-4o": [60.3, 65.0, 61.5, 51.9, 59.7],
    "GPT-5": [70.5, 73.8, 74.4, 70.2, 72.2],
    "Gemini 2.5 Pro": [70.5, 71.3, 75.1, 66.6, 70.9],
    "Gemini 3 Pro": [74.4, 74.9, 76.4, 79.5, 76.3],
}
NOTES = ("Published rows: the results table of facebookresearch/MMRB2 (multimodal LLM judges, forward and reverse "
         "order). A scalar reward model judges both orders alike: each pair counts twice with one verdict.")
FIELDS = ("id", "prompt_content", "response_a", "response_b", "chosen")


@dataclass(kw_only=True)
class MultimodalRewardBench2Arguments(EvaluationArguments):
    dataset: str = field(
        default="MMRB2/benchmark",
        metadata={"help": "The folder build_from_hf.py wrote: t2i.json, edit.json, interleaved.json, reasoning.json, "
                  "images/, input_images/."},
    )
    tasks: list[str] = field(default_factory=lambda: list(TASKS), metadata={"help": "Tasks to evaluate."})

    def __post_init__(self):
        super().__post_init__()
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"--tasks: unknown {unknown}; the tasks are {list(TASKS)}")


def multimodal_rewardbench2_metrics(predictions: list[dict]) -> dict:
    """Each task's accuracy and Overall (micro over the tasks), in percent: compute_accuracy.py's numbers."""
    tasks = {name: accuracy([p for p in predictions if p["category"] == task]) for task, name in TASKS.items()}
    return {**tasks, "Overall": accuracy(predictions), "categories": accuracy_by_category(predictions)}


def load_task(directory: str, task: str) -> list[dict]:
    path = Path(directory) / f"{task}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found. Multimodal RewardBench 2 is built locally: clone "
            "https://github.com/facebookresearch/MMRB2, run `python build_from_hf.py --output-dir .` in its benchmark/ "
            "folder and pass --dataset <clone>/benchmark"
        )
    return json.loads(path.read_text())["pairs"]  # one JSON object, read as compute_accuracy.py does


def message(role: str, content: list, base_dir: str, where: str) -> tuple[dict, list]:
    """[["text", ...], ["image", path], ...] -> a chat message with image parts in place, and its images in order."""
    parts, images = [], []
    for kind, value in content:
        if kind == "text":
            parts.append({"type": "text", "text": value})
        elif kind == "image":
            parts.append({"type": "image"})
            images.append(resolve_image(value, base_dir, where))
        else:
            raise ValueError(f"{where}: a part is ['text', str] or ['image', path], got {kind!r}")
    if not parts:
        raise ValueError(f"{where}: empty content")
    return {"role": role, "content": parts}, images


def multimodal_rewardbench2_pair(row: dict, index: int, task: str, base_dir: str, source: str) -> dict:
    where = f"{source}: pair {index} (id {row.get('id')})"
    missing = [name for name in FIELDS if name not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; expected {list(FIELDS)}")
    if row["chosen"] not in ("A", "B"):
        raise ValueError(f"{where}: chosen must be 'A' or 'B', got {row['chosen']!r}")
    prompt, images = message("user", row["prompt_content"], base_dir, f"{where} prompt_content")
    responses, response_images = [], []
    for side in ("response_a", "response_b"):
        response, inside = message("assistant", row[side]["response_content"], base_dir, f"{where} {side}")
        responses.append([response])
        response_images.append(inside)
    return {
        "id": row["id"],
        "category": task,
        "images": images,
        "prompt": [prompt],
        "responses": responses,
        "response_images": response_images,
        "preferred": "AB".index(row["chosen"]),
    }


def main(args: MultimodalRewardBench2Arguments) -> dict:
    def pairs():
        rows = [(task, index, row) for task in args.tasks for index, row in enumerate(load_task(args.dataset, task))]
        rows = rows if args.max_samples is None else rows[:args.max_samples]
        return ({"row": row_index, **multimodal_rewardbench2_pair(row, index, task, args.dataset,
                                                                   str(Path(args.dataset) / f"{task}.json"))}
                for row_index, (task, index, row) in enumerate(rows))

    return evaluate(args, "Multimodal RewardBench 2", pairs, multimodal_rewardbench2_metrics, COLUMNS, PUBLISHED,
                    NOTES)


if __name__ == "__main__":
    main(*TrlParser((MultimodalRewardBench2Arguments,)).parse_args_and_config())
