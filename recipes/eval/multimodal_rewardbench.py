"""Multimodal RewardBench with a scalar reward model: per-category accuracy with the official splits.

Each item is an image, a prompt (Text) and two responses (Output1, Output2) with the better one named (Better);
the item is correct when it gets the strictly higher reward. Categories as the official scripts/2_get_accuracy.py:
safety splits into safety/bias (ID starts with "pairs") and safety/toxicity, reasoning into reasoning/math
(ID starts with "math") and reasoning/coding. Overall is the micro accuracy over all items.

The benchmark is not on the hub. Clone https://github.com/facebookresearch/multimodal_rewardbench and run
`python scripts/0_download_data.py` inside it: it downloads the images into data/images/ and writes
data/all_data.json (data/all_data_release.json with the prompts of the third-party sources filled in). Then:

    python recipes/eval/multimodal_rewardbench.py --model_name_or_path Skywork/Skywork-VL-Reward-7B \
        --dataset multimodal_rewardbench/data/all_data.json \
        --output_dir outputs/eval/skywork-vl-reward-7b/multimodal_rewardbench

Image paths are relative to the JSON file's folder. Rerunning the command resumes from
output_dir/predictions.jsonl; --recompute rebuilds the reports from it without a model.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

from trl import TrlParser

from recipes.eval.benchmark import (
    EvaluationArguments,
    accuracy,
    accuracy_by_category,
    evaluate,
)
from recipes.shared.images import resolve_image

FIELDS = ("ID", "Text", "Image", "Output1", "Output2", "Better", "Category")
# The leaderboard's columns and the categories each one pools.
LEADERBOARD_COLUMNS = {
    "General Correctness": ("open_generation/correctness_task",),
    "General Preference": ("open_generation/preference_task",),
    "Knowledge": ("knowledge",),
    "Reasoning": ("reasoning/math", "reasoning/coding"),
    "Safety": ("safety/bias", "safety/toxicity"),
    "VQA": ("vqa",),
}
COLUMNS = ["Overall", *LEADERBOARD_COLUMNS]
# The leaderboard in the benchmark's README (VLM judges), in percent; the Skywork-VL Reward paper has no row here.
PUBLISHED = {
    "Claude 3.5 Sonnet (Dec 2024)": [72.0, 62.6, 67.8, 73.9, 66.8, 68.7, 85.6],
    "Gemini 1.5 Pro (Dec 2024)": [72.0, 63.5, 67.7, 66.3, 61.8, 76.5, 87.2],
    "GPT-4o (Dec 2024)": [71.5, 62.6, 69.0, 72.0, 64.7, 66.9, 87.2],
    "Llama-3.2-90B-Vision-Instruct": [62.4, 60.0, 68.4, 61.2, 54.6, 51.9, 77.1],
    "Aria": [57.3, 59.5, 63.5, 55.5, 52.4, 50.2, 64.2],
    "Molmo-7B-D-0924": [54.3, 56.8, 59.4, 54.6, 52.1, 44.2, 60.3],
    "Llama-3.2-11B-Vision-Instruct": [52.4, 57.8, 65.8, 55.5, 51.2, 35.5, 55.8],
    "Llava-1.5-13B": [48.9, 53.3, 55.2, 50.5, 51.3, 34.9, 51.8],
}
NOTES = (
    "Published rows: the leaderboard of facebookresearch/multimodal_rewardbench. Our Reasoning and Safety pool "
    "their two splits (micro accuracy). The public release leaves out Hateful Memes (safety/toxicity), so our "
    "Safety and Overall count fewer items than the leaderboard's."
)


@dataclass(kw_only=True)
class MultimodalRewardBenchArguments(EvaluationArguments):
    dataset: str = field(
        default="multimodal_rewardbench/data/all_data.json",
        metadata={"help": "data/all_data.json of a prepared clone of facebookresearch/multimodal_rewardbench."},
    )


def multimodal_rewardbench_category(category: str, item_id: str) -> str:
    if category == "safety":
        return "safety/bias" if item_id.lower().startswith("pairs") else "safety/toxicity"
    if category == "reasoning":
        return "reasoning/math" if item_id.lower().startswith("math") else "reasoning/coding"
    return category


def multimodal_rewardbench_metrics(predictions: list[dict]) -> dict:
    """Overall micro accuracy, the leaderboard's columns and every split category, in percent."""
    columns = {
        name: accuracy([p for p in predictions if p["category"] in members]) for name, members in LEADERBOARD_COLUMNS.items()
    }
    return {"Overall": accuracy(predictions), **columns, "categories": accuracy_by_category(predictions)}


def load_multimodal_rewardbench(path: str, max_samples: int | None) -> list[dict]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} not found. Multimodal RewardBench is not on the hub: clone "
            "https://github.com/facebookresearch/multimodal_rewardbench, run `python scripts/0_download_data.py` in it, "
            "and pass --dataset <clone>/data/all_data.json"
        )
    rows = json.loads(file.read_text())  # one JSON list, read as the official scripts do
    return rows if max_samples is None else rows[:max_samples]


def multimodal_rewardbench_pair(row: dict, index: int, data_dir: str, source: str) -> dict:
    where = f"{source}: row {index} (ID {row.get('ID')})"
    missing = [name for name in FIELDS if name not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; expected {list(FIELDS)}")
    if not str(row["Text"] or "").strip():
        raise ValueError(
            f"{where}: empty Text. all_data_release.json lacks the prompts of third-party sources; "
            "scripts/0_download_data.py writes them into data/all_data.json: evaluate that file"
        )
    if row["Better"] not in ("Output1", "Output2"):
        raise ValueError(f"{where}: Better must be 'Output1' or 'Output2', got {row['Better']!r}")
    return {
        "row": index,
        "id": row["ID"],
        "category": multimodal_rewardbench_category(row["Category"], row["ID"]),
        "images": [resolve_image(row["Image"], data_dir, where)],
        "prompt": row["Text"],
        "responses": [row["Output1"], row["Output2"]],
        "preferred": 0 if row["Better"] == "Output1" else 1,
    }


def main(args: MultimodalRewardBenchArguments) -> dict:
    def pairs():
        rows = load_multimodal_rewardbench(args.dataset, args.max_samples)
        data_dir = str(Path(args.dataset).parent)
        return (multimodal_rewardbench_pair(row, index, data_dir, args.dataset) for index, row in enumerate(rows))

    return evaluate(args, "Multimodal RewardBench", pairs, multimodal_rewardbench_metrics, COLUMNS, PUBLISHED, NOTES)


if __name__ == "__main__":
    main(*TrlParser((MultimodalRewardBenchArguments,)).parse_args_and_config())
