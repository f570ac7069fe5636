"""VL-RewardBench with a scalar reward model: the numbers of Table 3 of the Skywork-VL Reward paper.

Each item is an image, a query and two responses with a human ranking (lower is better). The item is correct
when the preferred response gets the strictly higher reward. Categories follow the official scorer after its
May 2025 fix, from the id prefix (the text before the first "_" or "-"): RLAIF -> rlaif-v, RLHF -> rlhf-v,
mathverse / mmmu -> reasoning, wildvision -> wildvision-battle, hallucination -> povid, anything else ->
vlfeedback. General = vlfeedback + wildvision-battle, Hallucination = povid + rlhf-v + rlaif-v,
Reasoning = reasoning; Overall Accuracy = all correct / all, Macro Average = mean of the three.

    python recipes/eval/vl_rewardbench.py --model_name_or_path Skywork/Skywork-VL-Reward-7B \
        --output_dir outputs/eval/skywork-vl-reward-7b/vl_rewardbench

A local copy: --dataset test.parquet (or a .jsonl with image paths, or a save_to_disk folder). Rerunning the
command resumes from output_dir/predictions.jsonl; --recompute rebuilds the reports from it without a model.
"""

import re
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
    hub_split_field,
    load_benchmark,
)
from recipes.shared.images import resolve_image

CATEGORY_OF_PREFIX = {
    "RLAIF": "rlaif-v",
    "RLHF": "rlhf-v",
    "mathverse": "reasoning",
    "mmmu": "reasoning",
    "wildvision": "wildvision-battle",
    "hallucination": "povid",
}
GROUPS = {
    "General": ("vlfeedback", "wildvision-battle"),
    "Hallucination": ("povid", "rlhf-v", "rlaif-v"),
    "Reasoning": ("reasoning",),
}
COLUMNS = ["General", "Hallucination", "Reasoning", "Overall Accuracy", "Macro Average"]
# Table 3 of the paper, in its order.
PUBLISHED = {
    "Claude-3.5-Sonnet (2024-06-22)": [43.4, 55.0, 62.3, 55.3, 53.6],
    "Gemini-1.5-Flash (2024-09-24)": [47.8, 59.6, 58.4, 57.6, 55.3],
    "GPT-4o (2024-08-06)": [49.1, 67.6, 70.5, 65.8, 62.4],
    "Gemini-1.5-Pro (2024-09-24)": [50.8, 72.5, 64.2, 67.2, 62.5],
    "Gemini-2.0-flash-exp (2024-12)": [50.8, 72.6, 70.1, 68.8, 64.5],
    "Qwen2-VL-7B-Instruct": [31.6, 19.1, 51.1, 28.3, 33.9],
    "MAmmoTH-VL-8B": [36.0, 40.0, 52.0, 42.2, 42.7],
    "Qwen2.5-VL-7B-Instruct": [43.4, 42.0, 63.0, 48.0, 49.5],
    "InternVL3-8B": [60.6, 44.0, 62.3, 57.0, 55.6],
    "IXC-2.5-Reward-7B": [80.3, 65.3, 60.4, 66.3, 68.6],
    "Qwen2-VL-72B-Instruct": [38.1, 32.8, 58.0, 39.5, 43.0],
    "Molmo-72B-0924": [33.9, 42.3, 54.9, 44.1, 43.7],
    "QVQ-72B-Preview": [41.8, 46.2, 51.2, 46.4, 46.4],
    "Qwen2.5-VL-72B-Instruct": [47.8, 46.8, 63.5, 51.6, 52.7],
    "InternVL3-78B": [67.8, 52.5, 64.5, 63.3, 61.6],
    "Skywork-VL Reward (paper)": [66.0, 80.0, 61.0, 73.1, 69.0],
}
NOTES = "Published rows: Table 3 of the Skywork-VL Reward paper."


@dataclass(kw_only=True)
class VLRewardBenchArguments(EvaluationArguments):
    dataset: str = field(
        default="MMInstruction/VL-RewardBench",
        metadata={"help": "Hub id, or a local copy: .parquet / .jsonl file (image paths relative to it) or "
                  "save_to_disk folder."},
    )
    split: str = hub_split_field("test")


def vl_rewardbench_category(item_id: str) -> str:
    prefix = re.split(r"[_-]", item_id, maxsplit=1)[0]
    return CATEGORY_OF_PREFIX.get(prefix, "vlfeedback")


def vl_rewardbench_metrics(predictions: list[dict]) -> dict:
    """General / Hallucination / Reasoning accuracy, Overall Accuracy and Macro Average, in percent."""
    groups = {name: accuracy([p for p in predictions if p["category"] in members]) for name, members in GROUPS.items()}
    complete = all(value is not None for value in groups.values())  # a partial run may lack a group
    return {
        **groups,
        "Overall Accuracy": accuracy(predictions),
        "Macro Average": sum(groups.values()) / len(groups) if complete else None,
        "categories": accuracy_by_category(predictions),
    }


def vl_rewardbench_pair(row: dict, index: int, base_dir: str | None, source: str) -> dict:
    where = f"{source}: row {index} (id {row['id']})"
    ranking, responses = row["human_ranking"], row["response"]
    if len(responses) != 2 or len(ranking) != 2 or ranking[0] == ranking[1]:
        raise ValueError(f"{where}: expected 2 responses with distinct human_ranking, got {len(responses)} and {ranking}")
    return {
        "row": index,
        "id": row["id"],
        "category": vl_rewardbench_category(row["id"]),
        "images": [resolve_image(row["image"], base_dir, where)],
        "prompt": row["query"],
        "responses": responses,
        "preferred": ranking.index(min(ranking)),
    }


def main(args: VLRewardBenchArguments) -> dict:
    def pairs():
        columns = ("id", "query", "response", "image", "human_ranking")
        dataset, base_dir = load_benchmark(args.dataset, args.split, columns, args.max_samples)
        return (vl_rewardbench_pair(row, index, base_dir, args.dataset) for index, row in enumerate(dataset))

    return evaluate(args, "VL-RewardBench", pairs, vl_rewardbench_metrics, COLUMNS, PUBLISHED, NOTES)


if __name__ == "__main__":
    main(*TrlParser((VLRewardBenchArguments,)).parse_args_and_config())
