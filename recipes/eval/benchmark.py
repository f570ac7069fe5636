"""Pairwise benchmark evaluation shared by recipes/eval/*.py: arguments, resumable scoring and the reports.

A benchmark item is a pair: a prompt (with its images) and two responses, one preferred by the annotators.
Both responses are scored by `RewardScorer` (the forward pass of training); the item is correct when
score(preferred) > score(other), strictly: a tie is wrong.

Files written to --output_dir (use one directory per model: a rerun resumes from the predictions there, and
refuses predictions that another model or other settings produced):
    predictions.jsonl   one line per item: row, id, category, scores (response 0, response 1), preferred, correct
    predictions.provenance.json   the model, a fingerprint of its weights, dtype, attention and pixel budget
    metrics.json        the benchmark's metrics, in percent
    results.md          our row beside the published rows, and the accuracy of each category
    margins.png         distribution of score(preferred) - score(other) per category
"""

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, Image
from matplotlib.figure import Figure

from collators import PixelBudgetArguments
from collators.preference_data import load_source
from heads import RewardScorer
from recipes.eval.resumable import (
    part_files,
    process_state,
    provenance_file,
    read_records,
    score_resumably,
    unique_records,
)

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.md"
MARGINS_PLOT = "margins.png"
PAIRS_PER_WRITE = 64  # an interrupted run loses at most this many scored pairs


@dataclass
class ScorerArguments(PixelBudgetArguments):
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reward model: a directory or hub id with the base checkpoint and value_head.safetensors."},
    )
    batch_size: int = field(default=8, metadata={"help": "Responses per forward pass (a pair is two)."})
    dtype: str | None = field(default=None, metadata={"help": "bfloat16 on GPU and float32 on CPU unless set."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa or flash_attention_2."})


@dataclass(kw_only=True)
class EvaluationArguments(ScorerArguments):
    """Each recipe subclasses this to give `dataset` its default."""

    dataset: str = field(metadata={"help": "The benchmark: hub id or local path."})
    output_dir: str = field(metadata={"help": "Where predictions, metrics, table and plot go; one per model."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N items."})
    recompute: bool = field(
        default=False, metadata={"help": "Recompute the metrics from output_dir/predictions.jsonl; loads no model."},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Discard predictions in output_dir that another model or other settings "
                                 "produced (without it such a rerun stops and says so)."},
    )

    def __post_init__(self):
        if not self.recompute and not self.model_name_or_path:  # fail before a benchmark download, not after
            raise ValueError("--model_name_or_path is required (a trained reward model), unless --recompute")


def load_scorer(args: ScorerArguments) -> RewardScorer:
    if not args.model_name_or_path:
        raise ValueError("--model_name_or_path is required: a trained reward model (directory or hub id)")
    return RewardScorer.from_pretrained(  # each process of a launch on its own device
        args.model_name_or_path, device=str(process_state().device), dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        batch_size=args.batch_size, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
    )


def load_benchmark(
    name: str, split: str, columns: Iterable[str], max_samples: int | None = None
) -> tuple[Dataset, str | None]:
    """A benchmark from the hub or a local copy (.parquet / .jsonl / .json file, save_to_disk folder, data folder).

    Returns the dataset, its images left undecoded (they are opened batch by batch), and the folder that
    relative image paths start from (None for the hub).
    """
    dataset, base_dir = load_source(name, split)
    if isinstance(dataset, DatasetDict):
        dataset = dataset[split]
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; found {dataset.column_names}")
    for column, feature in dataset.features.items():
        if isinstance(feature, Image):
            dataset = dataset.cast_column(column, Image(decode=False))
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset, base_dir


def resolve_image(image, base_dir: str | None, where: str):
    """An image the renderer can open: embedded bytes as they are, a relative path joined to `base_dir`."""
    if isinstance(image, dict):
        if image.get("bytes"):
            return image
        image = image.get("path")
    if image is None:
        raise ValueError(f"{where}: the image is missing")
    if isinstance(image, str):
        if base_dir is not None and not os.path.isabs(image):
            image = os.path.join(base_dir, image)
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{where}: image file {image} does not exist")
    return image


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """The lines of a predictions file. A last line cut short by an interrupted run is left out (and rescored)."""
    return read_records(path)


def evaluate(args: EvaluationArguments, benchmark: str, load_pairs: Callable[[], Iterable[dict]],
             metrics_of: Callable[[list[dict]], dict], columns: list[str], published: dict[str, list[float]],
             notes: str = "") -> dict:
    """An evaluator's run: score the pairs `load_pairs` gives (or, with --recompute, read the predictions back),
    then the benchmark's metrics and the reports. Returns the metrics."""
    predictions = recomputed_predictions(args.output_dir) if args.recompute else score_benchmark(args, load_pairs())
    metrics = metrics_of(predictions)
    report = write_report(args.output_dir, benchmark, metrics, columns, published, predictions,
                          args.model_name_or_path, notes)
    if report:  # the main process writes the reports
        print(report)
    return metrics


def score_benchmark(args: EvaluationArguments, pairs: Iterable[dict]) -> list[dict]:
    """The evaluators' scoring: the reward model of `args` on every pair, resumable, across all processes."""
    scorer = load_scorer(args)
    return score_pairs(scorer, pairs, args.output_dir, provenance=scorer.provenance(), overwrite=args.overwrite)


def recomputed_predictions(output_dir: str | os.PathLike) -> list[dict]:
    """--recompute: each row once (the last line written for it) whatever the file's history, in row order."""
    return unique_records(Path(output_dir) / PREDICTIONS_FILE, "row")


def score_pairs(scorer, pairs: Iterable[dict], output_dir: str | os.PathLike, total: int | None = None,
                provenance: dict | None = None, overwrite: bool = False) -> list[dict]:
    """Scores both responses of every pair and appends one prediction per pair to output_dir/predictions.jsonl.

    A pair is a dict: row (its index in the benchmark), id, category, images, prompt, responses (two), preferred
    (0 or 1). Pairs already in the file (same row and id, same `provenance`) are not scored again, so an
    interrupted run resumes; the pairs are shared out across processes (recipes/eval/resumable.py).
    Returns the predictions of `pairs`, in their order.
    """
    path = Path(output_dir) / PREDICTIONS_FILE
    pairs = list(pairs)
    if not overwrite:
        done = {p["row"]: p for file in [path, *part_files(path)] for p in read_records(file)}
        for pair in pairs:
            previous = done.get(pair["row"])
            if previous is not None and previous["id"] != pair["id"]:
                raise ValueError(
                    f"{path}: row {pair['row']} was scored for id {previous['id']!r} but the benchmark has "
                    f"{pair['id']!r} there; these predictions come from another dataset: use another --output_dir"
                )
    done = score_resumably(path, "row", [(pair["row"], pair) for pair in pairs],
                           lambda chunk: _score(scorer, chunk), provenance=provenance, overwrite=overwrite,
                           per_write=PAIRS_PER_WRITE, desc="Scoring pairs")
    return [done[pair["row"]] for pair in pairs]


def _score(scorer, pairs: list[dict]) -> list[dict]:
    items = [{"images": pair["images"], "prompt": pair["prompt"], "response": response}
             for pair in pairs for response in pair["responses"]]
    scores = scorer.score(items)
    predictions = []
    for index, pair in enumerate(pairs):
        pair_scores = scores[2 * index: 2 * index + 2]
        preferred = pair["preferred"]
        predictions.append({
            "row": pair["row"],
            "id": pair["id"],
            "category": pair["category"],
            "scores": pair_scores,
            "preferred": preferred,
            "correct": pair_scores[preferred] > pair_scores[1 - preferred],
        })
    return predictions


def accuracy(predictions: list[dict]) -> float | None:
    """Percent correct; None when there is nothing to count."""
    if not predictions:
        return None
    return 100.0 * sum(p["correct"] for p in predictions) / len(predictions)


def accuracy_by_category(predictions: list[dict]) -> dict[str, dict]:
    """{category: {"accuracy", "correct", "items"}}, categories sorted by name."""
    groups = {}
    for prediction in predictions:
        groups.setdefault(prediction["category"], []).append(prediction)
    return {
        category: {"accuracy": accuracy(group), "correct": sum(p["correct"] for p in group), "items": len(group)}
        for category, group in sorted(groups.items())
    }


def margin(prediction: dict) -> float:
    scores, preferred = prediction["scores"], prediction["preferred"]
    return scores[preferred] - scores[1 - preferred]


def write_report(
    output_dir: str | os.PathLike,
    benchmark: str,
    metrics: dict,
    columns: list[str],
    published: dict[str, list[float]],
    predictions: list[dict],
    model: str | None,
    notes: str = "",
) -> str:
    """Writes metrics.json, results.md (our row beside `published`) and margins.png; returns the Markdown.

    `metrics` holds a value (percent) for each of `columns` and per-category counts under "categories".
    """
    output_dir = Path(output_dir)
    if not predictions:
        raise ValueError(f"{benchmark}: no predictions in {output_dir / PREDICTIONS_FILE}; score without --recompute")
    if not process_state().is_main_process:
        return ""
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = output_dir / METRICS_FILE
    record = provenance_file(output_dir / PREDICTIONS_FILE)
    scoring = json.loads(record.read_text()) if record.is_file() else None  # what produced the predictions
    if model is None:  # --recompute names the model that scored, never another
        model = (scoring or {}).get("model")
    summary = {"benchmark": benchmark, "model": model, "items": len(predictions), **metrics, "scoring": scoring}
    metrics_file.write_text(json.dumps(summary, indent=2) + "\n")

    model_name = Path(model).name if model else "this run"
    ours = f"**{model_name}** (ours, {len(predictions)} items)"
    lines = [f"# {benchmark}", "", "| Model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, values in published.items():
        lines.append(f"| {name} | " + " | ".join(_percent(value) for value in values) + " |")
    lines.append(f"| {ours} | " + " | ".join(_percent(metrics[column]) for column in columns) + " |")
    if notes:
        lines += ["", notes]
    lines += ["", "| Category | Items | Correct | Accuracy |", "|---|---:|---:|---:|"]
    for category, entry in metrics["categories"].items():
        lines.append(f"| {category} | {entry['items']} | {entry['correct']} | {_percent(entry['accuracy'])} |")
    markdown = "\n".join(lines) + "\n"
    (output_dir / RESULTS_FILE).write_text(markdown)

    plot_margins(predictions, output_dir / MARGINS_PLOT, f"{benchmark}: {model_name}")
    return markdown


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot_margins(predictions: list[dict], path: str | os.PathLike, title: str) -> None:
    """One box per category of score(preferred) - score(other): right of the dashed zero line is correct."""
    categories = accuracy_by_category(predictions)
    margins = {category: [] for category in categories}
    for prediction in predictions:
        margins[prediction["category"]].append(margin(prediction))
    figure = Figure(figsize=(9, 1.5 + 0.45 * len(margins)))  # a bare Figure renders with Agg: no display needed
    axes = figure.subplots()
    labels = [f"{c} (n={e['items']}, {_percent(e['accuracy'])}%)" for c, e in categories.items()]
    axes.boxplot(list(margins.values()), orientation="horizontal", tick_labels=labels)
    axes.axvline(0.0, color="tab:red", linestyle="--", linewidth=1)
    axes.invert_yaxis()  # first category on top, as in the tables
    axes.set_xlabel("reward margin: score(preferred) - score(other)")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
