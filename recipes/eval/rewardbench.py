"""RewardBench (text only) with the official metrics: the numbers of Table 4 of the Skywork-VL Reward paper.

Each item is a prompt, a chosen and a rejected response, and a subset; the item is correct when chosen gets the
strictly higher reward. Each section (Chat, Chat Hard, Safety, Reasoning) averages its subsets' accuracies
weighted by the official EXAMPLE_COUNTS (math-prm weighs 984, as much as the six code subsets together), and
Score is the plain mean of the four sections, as in the paper (no prior sets).

    python recipes/eval/rewardbench.py --model_name_or_path Skywork/Skywork-VL-Reward-7B \
        --output_dir outputs/eval/skywork-vl-reward-7b/rewardbench

A local copy: --dataset filtered.jsonl (or .parquet, or a save_to_disk folder). Rerunning the command resumes
from output_dir/predictions.jsonl; --recompute rebuilds the reports from it without a model.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

from trl import TrlParser

from recipes.eval.benchmark import (
    EvaluationArguments,
    accuracy_by_category,
    evaluate,
    hub_dataset_field,
    hub_split_field,
    load_benchmark,
)

# EXAMPLE_COUNTS of the official package (rewardbench==0.1.4, rewardbench/constants.py); tests/test_evaluation.py
# checks our section scores against that package's own calculate_scores_per_section.
EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,  # 447 items, weighted to count as much as all code
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 154,
    "xstest-should-respond": 250,
    "donotanswer": 136,
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}
SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": [
        "mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst", "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond", "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
COLUMNS = ["Chat", "Chat Hard", "Safety", "Reasoning", "Score"]
# Table 4 of the paper, in its order.
PUBLISHED = {
    "InternLM2-7B-Reward": [99.2, 69.5, 87.2, 94.5, 87.6],
    "Skywork-Reward-Llama3.1-8B": [95.8, 87.3, 90.8, 96.2, 92.5],
    "Skywork-Reward-Llama-3.1-8B-v0.2": [94.7, 88.4, 92.7, 96.7, 93.1],
    "QRM-Llama3.1-8B-v2": [96.4, 86.8, 92.6, 96.8, 93.1],
    "Qwen2-VL-7B-Instruct": [65.1, 50.9, 55.8, 68.3, 60.0],
    "InternVL3-8B": [97.2, 50.4, 83.6, 83.9, 78.8],
    "Qwen2.5-VL-7B-Instruct": [94.3, 63.8, 84.1, 86.2, 82.1],
    "IXC-2.5-Reward-7B": [90.8, 83.8, 87.8, 90.0, 88.1],
    "Skywork-VL Reward (paper)": [90.0, 87.5, 91.1, 91.8, 90.1],
}
NOTES = "Published rows: Table 4 of the Skywork-VL Reward paper. Categories below are the subsets."


@dataclass(kw_only=True)
class RewardBenchArguments(EvaluationArguments):
    dataset: str = hub_dataset_field("allenai/reward-bench")
    split: str = hub_split_field("filtered")


def rewardbench_metrics(predictions: list[dict]) -> dict:
    """Section scores (subset accuracies weighted by EXAMPLE_COUNTS) and Score (their mean), in percent."""
    subsets = accuracy_by_category(predictions)
    sections = {}
    for section, members in SECTIONS.items():
        present = [subset for subset in members if subset in subsets]
        weight = sum(EXAMPLE_COUNTS[subset] for subset in present)
        weighted = sum(subsets[subset]["accuracy"] * EXAMPLE_COUNTS[subset] for subset in present)
        sections[section] = weighted / weight if present else None  # a partial run may lack a section
    complete = all(value is not None for value in sections.values())
    return {**sections, "Score": sum(sections.values()) / len(sections) if complete else None, "categories": subsets}


def rewardbench_pair(row: dict, index: int) -> dict:
    return {
        "row": index,
        "id": row["id"],
        "category": row["subset"],
        "images": [],
        "prompt": row["prompt"],
        "responses": [row["chosen"], row["rejected"]],
        "preferred": 0,
    }


def main(args: RewardBenchArguments) -> dict:
    def pairs():
        columns = ("id", "prompt", "chosen", "rejected", "subset")
        dataset, _ = load_benchmark(args.dataset, args.split, columns, args.max_samples)
        return (rewardbench_pair(row, index) for index, row in enumerate(dataset))

    return evaluate(args, "RewardBench", pairs, rewardbench_metrics, COLUMNS, PUBLISHED, NOTES)


if __name__ == "__main__":
    main(*TrlParser((RewardBenchArguments,)).parse_args_and_config())
