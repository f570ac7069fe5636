"""Verbatim copy of Multimodal RewardBench 2's scoring functions, the test oracle for
recipes/eval/multimodal_rewardbench2.py (MMRB2 is no package: nothing pinned carries them).

Source: https://github.com/facebookresearch/MMRB2/blob/7ff0552cf298441af5ebbabea634b682ef04afee/evaluate/compute_scores/compute_accuracy.py
(`TaskResult`, `flip_judgement` and `compute_task_accuracy`, lines 26-115 there; only the imports below are ours).
Copyright (c) Meta Platforms, Inc. and affiliates. Licensed under CC BY-NC 4.0:
http://creativecommons.org/licenses/by-nc/4.0/
"""

from dataclasses import dataclass
from typing import Dict


@dataclass
class TaskResult:
    """Results for a single task evaluation."""

    task_name: str
    total_pairs: int
    evaluated_pairs: int
    missing_pairs: int
    total_correct: int
    total_evaluated: int
    accuracy: float


def flip_judgement(judgement: str) -> str:
    """Flip A to B and B to A."""
    if judgement == "A":
        return "B"
    elif judgement == "B":
        return "A"
    else:
        return judgement


def load_json(path: str) -> dict:
    """Load a JSON file."""
    with open(path, "r") as f:
        return json.load(f)


def compute_task_accuracy(
    predictions: Dict, benchmark_data: Dict, task_name: str = "unknown"
) -> TaskResult:
    """Compute accuracy for a single task.

    Args:
        predictions: Dict mapping pair_id to prediction results.
        benchmark_data: Benchmark data containing pairs with ground truth.
        task_name: Name of the task for reporting.

    Returns:
        TaskResult with accuracy metrics.
    """
    pairs = benchmark_data.get("pairs", [])

    total_pairs = len(pairs)
    evaluated_pairs = 0
    missing_pairs = 0

    total_correct = 0
    total_evaluated = 0

    for pair in pairs:
        pair_id = pair["id"]
        chosen = pair["chosen"]  # Ground truth: "A" or "B"

        if pair_id not in predictions:
            missing_pairs += 1
            continue

        evaluated_pairs += 1
        pred = predictions[pair_id]

        # Forward evaluation
        if "forward" in pred and len(pred["forward"]) > 0:
            forward_judgement = pred["forward"][0].get("judgement")
            if forward_judgement:
                total_evaluated += 1
                if forward_judgement == chosen:
                    total_correct += 1

        # Reverse evaluation
        if "reverse" in pred and len(pred["reverse"]) > 0:
            reverse_pred = pred["reverse"][0].get("judgement")
            if reverse_pred:
                total_evaluated += 1
                flipped_judgement = flip_judgement(reverse_pred)
                if flipped_judgement == chosen:
                    total_correct += 1

    accuracy = total_correct / total_evaluated if total_evaluated > 0 else 0.0

    return TaskResult(
        task_name=task_name,
        total_pairs=total_pairs,
        evaluated_pairs=evaluated_pairs,
        missing_pairs=missing_pairs,
        total_correct=total_correct,
        total_evaluated=total_evaluated,
        accuracy=accuracy,
    )
