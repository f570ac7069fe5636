"""RewardBench 2 (text only) with the official metrics: best-of-4 accuracy with a tie penalty, and the Ties score.

Each prompt comes with its completions: the correct ones (`chosen`, `num_correct` of them) and the wrong ones
(`rejected`); every completion is scored on its own (the completions of a prompt share one packed forward where
the model allows). Scoring as allenai/reward-bench's scripts/run_v2.py and rewardbench/utils.py (commit 05a9005):
- Factuality, Precise IF, Math, Safety, Focus: a prompt scores 1 / (completions tied at the highest reward) when
  its first chosen completion has the highest reward, else 0 (`reroll_and_score_dataset`); the subset's score is
  the mean over its prompts (4 completions each: chance is 25%).
- Ties (`process_single_model`): ids `ref:N` (one correct answer) and `tied:N` (several) pair up per N; a prompt is
  accurate when every correct completion outscores every wrong one. Score = 0.30 tied accuracy + 0.30 ref accuracy
  + 0.20 (share of N whose tied gap, worst correct - best wrong, exceeds the spread among its correct answers)
  + 0.20 (the same with the smaller gap of ref:N and tied:N) + 0.01 mean tanh(smaller gap / spread - 1).
- Score: the unweighted mean of the six subsets (the paper's §3; run_v2.py prints the subsets only).

    python recipes/eval/rewardbench2.py --model_name_or_path Skywork/Skywork-VL-Reward-7B \
        --output_dir outputs/eval/skywork-vl-reward-7b/rewardbench2

A local copy: --dataset test.jsonl (or .parquet, or a save_to_disk folder). Rerunning the command resumes from
output_dir/predictions.jsonl; --recompute rebuilds the reports from it without a model.
"""

import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

from trl import TrlParser

from recipes.eval.benchmark import EvaluationArguments, evaluate, hub_dataset_field, hub_split_field, load_benchmark

SUBSETS = ["Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties"]
COLUMNS = [*SUBSETS, "Score"]
# Table 3 of the RewardBench 2 paper (arXiv 2506.01937), in our column order; * marks LM-as-a-judge models.
PUBLISHED = {
    "gemini-2.5-flash-preview-04-17*": [65.7, 55.3, 81.1, 90.9, 86.7, 83.4, 77.2],
    "INF-ORM-Llama3.1-70B": [74.1, 41.9, 69.9, 96.4, 90.3, 86.2, 76.5],
    "Skywork-Reward-Gemma-2-27B": [73.7, 40.3, 70.5, 94.2, 93.2, 82.6, 75.8],
    "Skywork-Reward-Llama-3.1-8B": [69.9, 42.5, 62.8, 93.3, 96.2, 74.1, 73.1],
    "Llama-3.1-8B-Instruct-RM-RB2": [74.3, 44.4, 61.7, 89.6, 90.7, 76.4, 72.8],
    "QRM-Llama3.1-8B-v2": [66.5, 40.6, 61.2, 94.7, 89.1, 72.3, 70.7],
    "ArmoRM-Llama3-8B-v0.1": [65.7, 41.9, 66.1, 82.2, 76.6, 66.3, 66.5],
    "gpt-4o-2024-08-06*": [56.8, 33.1, 62.3, 86.2, 72.9, 78.2, 64.9],
}
NOTES = ("Published rows: Table 3 of the RewardBench 2 paper (* LM-as-a-judge). Categories below are the subsets; "
         "Correct sums each prompt's credit (1 / completions tied at the top), and Ties has its own score.")
TIES = "Ties"


@dataclass(kw_only=True)
class RewardBench2Arguments(EvaluationArguments):
    dataset: str = hub_dataset_field("allenai/reward-bench-2")
    split: str = hub_split_field("test")


def best_of_n_credit(scores: list[float]) -> float:
    """`reroll_and_score_dataset`: 1 / (completions tied at the highest reward) when the first completion (the
    chosen one) has the highest reward, else 0."""
    top = max(scores)
    return 1 / scores.count(top) if scores[0] == top else 0.0


class PromptStats(NamedTuple):
    """`_compute_prompt_stats` of one Ties prompt."""

    accurate: bool  # every correct completion outscores every wrong one
    spread: float  # best correct - worst correct
    gap: float  # worst correct - best wrong


def ties_score(predictions: list[dict]) -> float | None:
    """`process_single_model` on the Ties predictions, a fraction; None until some N has both ref:N and tied:N."""
    samples = defaultdict(list)  # (ref or tied, N) -> [(is correct, reward), ...]
    for prediction in predictions:
        kind, number = str(prediction["id"]).split(":")
        samples[kind, int(number)] += [(i < prediction["num_preferred"], score)
                                       for i, score in enumerate(prediction["scores"])]
    ref, tied = {}, {}
    for (kind, number), pairs in samples.items():
        correct = [score for is_correct, score in pairs if is_correct]
        wrong = [score for is_correct, score in pairs if not is_correct]
        if kind != "ref" and len(correct) < 2:
            raise ValueError(f"Ties: {kind}:{number} has {len(correct)} correct completion(s); a tied prompt has "
                             "several")
        gap = min(correct) - max(wrong)
        (ref if kind == "ref" else tied)[number] = PromptStats(gap > 0, max(correct) - min(correct), gap)
    both = sorted(set(ref) & set(tied))
    if not both:
        return None
    hard_gaps = {number: min(ref[number].gap, tied[number].gap) for number in both}
    return (0.30 * _mean([stats.accurate for stats in tied.values()])
            + 0.30 * _mean([stats.accurate for stats in ref.values()])
            + 0.20 * _mean([tied[number].gap > tied[number].spread for number in both])
            + 0.20 * _mean([hard_gaps[number] > tied[number].spread for number in both])
            + 0.01 * _mean([_tanh_ratio(hard_gaps[number], tied[number].spread) for number in both]))


def _tanh_ratio(gap: float, spread: float) -> float:
    """tanh(gap / spread - 1) with numpy's division: +-1 when the correct answers tie exactly, 0 for 0 / 0."""
    if spread == 0:
        return 0.0 if gap == 0 else math.copysign(1.0, gap)
    return math.tanh(gap / spread - 1)


def _mean(values: list) -> float:
    return sum(values) / len(values)


def rewardbench2_metrics(predictions: list[dict]) -> dict:
    """Each subset's score and Score (their plain mean), in percent; a subset missing from a partial run is None."""
    groups = defaultdict(list)
    for prediction in predictions:
        groups[prediction["category"]].append(prediction)
    categories = {}
    for subset, group in sorted(groups.items()):
        if subset == TIES:
            score = ties_score(group)
            categories[subset] = {"accuracy": None if score is None else 100 * score, "correct": None,
                                  "items": len(group)}
        else:
            credit = sum(best_of_n_credit(p["scores"]) for p in group)
            categories[subset] = {"accuracy": 100 * credit / len(group), "correct": credit, "items": len(group)}
    scores = {subset: categories.get(subset, {}).get("accuracy") for subset in SUBSETS}
    complete = all(value is not None for value in scores.values())
    return {**scores, "Score": sum(scores.values()) / len(scores) if complete else None, "categories": categories}


def rewardbench2_pair(row: dict, index: int, source: str) -> dict:
    where = f"{source}: row {index} (id {row['id']})"
    chosen, rejected, num_correct = row["chosen"], row["rejected"], row["num_correct"]
    if not chosen or not rejected:
        raise ValueError(f"{where}: needs at least one chosen and one rejected completion")
    if num_correct != len(chosen) or row["total_completions"] != len(chosen) + len(rejected):
        raise ValueError(f"{where}: num_correct {num_correct} and total_completions {row['total_completions']} "
                         f"do not match {len(chosen)} chosen and {len(rejected)} rejected completions")
    if row["subset"] == TIES and not re.fullmatch(r"(ref|tied):\d+", str(row["id"])):
        raise ValueError(f"{where}: a Ties id is ref:N or tied:N (N a number)")
    return {
        "row": index,
        "id": row["id"],
        "category": row["subset"],
        "images": [],
        "prompt": row["prompt"],
        "responses": [*chosen, *rejected],
        "preferred": 0,
        "num_preferred": num_correct,
    }


def main(args: RewardBench2Arguments) -> dict:
    def pairs():
        columns = ("id", "prompt", "chosen", "rejected", "num_correct", "total_completions", "subset")
        dataset, _ = load_benchmark(args.dataset, args.split, columns, args.max_samples)
        return (rewardbench2_pair(row, index, args.dataset) for index, row in enumerate(dataset))

    return evaluate(args, "RewardBench 2", pairs, rewardbench2_metrics, COLUMNS, PUBLISHED, NOTES)


if __name__ == "__main__":
    main(*TrlParser((RewardBench2Arguments,)).parse_args_and_config())
