"""Pairwise benchmark evaluation shared by recipes/eval/*.py: arguments, resumable scoring and the reports.

A benchmark item is a prompt (with its images) and two or more responses, one (or, for RewardBench 2's Ties, the
first few) preferred by the annotators. A response may hold images of its own (Multimodal RewardBench 2). Every
response is scored by `RewardScorer` (the forward pass of training); the item is correct when every preferred
response gets a strictly higher reward than every other one: a tie is wrong.

Files written to --output_dir (use one directory per model: a rerun resumes from the predictions there, and
refuses predictions that another model or other settings produced):
    predictions.jsonl   one line per item: key (a hash of the item's content), id, category, scores (one per
                        response), preferred, correct; in benchmark order
    predictions.rows.json         the keys of the benchmark's rows, in order: what --recompute expects to find
    predictions.provenance.json   the model, a fingerprint of its weights, dtype, attention and pixel budget
    metrics.json        the benchmark's metrics, in percent, and their coverage (items scored of the benchmark's rows)
    results.md          our row beside the published rows, and the accuracy of each category
    margins.png         distribution of the reward margin (lowest preferred - highest other) per category
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
from recipes.shared.images import image_digest
from recipes.shared.resumable import (
    content_key,
    part_files,
    process_state,
    provenance_file,
    read_records,
    score_resumably,
)

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
ROWS_FILE = "predictions.rows.json"
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
    batch_size: int = field(default=8, metadata={"help": "Responses per forward pass (an item is one per response)."})
    dtype: str | None = field(default=None, metadata={"help": "bfloat16 on GPU and float32 on CPU unless set."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa or flash_attention_2."})


@dataclass(kw_only=True)
class EvaluationArguments(ScorerArguments):
    """Each recipe subclasses this to give `dataset` its default."""

    dataset: str = field(metadata={"help": "The benchmark: hub id or local path."})
    output_dir: str = field(metadata={"help": "Where predictions, metrics, table and plot go; one per model."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N items."})
    recompute: bool = field(
        default=False, metadata={"help": "Recompute the metrics from output_dir/predictions.jsonl; loads no model. "
                                 "Refuses predictions that miss rows of the benchmark unless --allow_partial."},
    )
    allow_partial: bool = field(
        default=False, metadata={"help": "With --recompute: compute metrics on the rows an interrupted run scored "
                                 "(a loud warning, and the coverage in metrics.json and results.md)."},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Discard predictions in output_dir that another model or other settings "
                                 "produced (without it such a rerun stops and says so)."},
    )

    def __post_init__(self):
        if not self.recompute and not self.model_name_or_path:  # fail before a benchmark download, not after
            raise ValueError("--model_name_or_path is required (a trained reward model), unless --recompute")


def hub_dataset_field(default: str):
    """`dataset` of a text benchmark on the hub: `default` is its hub id; a local copy works too."""
    return field(
        default=default,
        metadata={"help": "Hub id, or a local copy: .jsonl / .parquet file or save_to_disk folder."},
    )


def hub_split_field(default: str):
    """`split` of a benchmark on the hub: `default` is the split the published numbers use."""
    return field(default=default, metadata={"help": "Split of the hub dataset."})


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


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """The lines of a predictions file. A last line cut short by an interrupted run is left out (and rescored)."""
    return read_records(path)


def evaluate(args: EvaluationArguments, benchmark: str, load_pairs: Callable[[], Iterable[dict]],
             metrics_of: Callable[[list[dict]], dict], columns: list[str], published: dict[str, list[float]],
             notes: str = "") -> dict:
    """An evaluator's run: score the pairs `load_pairs` gives (or, with --recompute, read the predictions back),
    then the benchmark's metrics and the reports. Returns the metrics."""
    if args.recompute:
        predictions, rows = recomputed_predictions(args.output_dir, args.allow_partial)
    else:
        predictions = score_benchmark(args, load_pairs())
        rows = len(predictions)
    metrics = metrics_of(predictions)
    report = write_report(args.output_dir, benchmark, metrics, columns, published, predictions,
                          args.model_name_or_path, notes, rows)
    if report:  # the main process writes the reports
        print(report)
    return metrics


def score_benchmark(args: EvaluationArguments, pairs: Iterable[dict]) -> list[dict]:
    """The evaluators' scoring: the reward model of `args` on every pair, resumable, across all processes."""
    scorer = load_scorer(args)
    return score_pairs(scorer, pairs, args.output_dir, provenance=scorer.provenance(), overwrite=args.overwrite)


def recomputed_predictions(output_dir: str | os.PathLike, allow_partial: bool = False) -> tuple[list[dict], int]:
    """--recompute: the prediction of each row the last scoring run was asked for, in row order, and the number of
    those rows. Predictions that miss some of them (an interrupted run) are refused unless `allow_partial`."""
    path = Path(output_dir) / PREDICTIONS_FILE
    rows_file = path.parent / ROWS_FILE
    if not rows_file.is_file():
        raise ValueError(f"{rows_file} does not exist: --recompute reads the rows a scoring run wrote there; run the "
                         "evaluation with --model_name_or_path (it resumes from the predictions it can use)")
    keys = json.loads(rows_file.read_text())["keys"]
    records = {record.get("key"): record for file in [path, *part_files(path)] for record in read_records(file)}
    predictions = [dict(records[key], row=row) for row, key in enumerate(keys) if key in records]
    if len(predictions) < len(keys):
        missing = (f"{path} holds predictions for {len(predictions)} of the {len(keys)} rows of the benchmark "
                   "(its scoring run was interrupted)")
        if not allow_partial:
            raise ValueError(f"{missing}: rerun the evaluation without --recompute to finish it (it resumes), or "
                             "pass --allow_partial true for metrics of those rows only")
        logger.warning("PARTIAL METRICS: %s; the metrics cover %.1f%% of the benchmark and are not comparable to "
                       "published numbers", missing, 100.0 * len(predictions) / len(keys))
    return predictions, len(keys)


def pair_key(pair: dict) -> str:
    """The pair's content: everything its prediction is made from (the images by their bytes), not its row."""
    fields = {name: value for name, value in pair.items() if name not in ("row", "images", "response_images")}
    fields["images"] = [image_digest(image) for image in pair["images"]]
    if "response_images" in pair:
        fields["response_images"] = [[image_digest(image) for image in images] for images in pair["response_images"]]
    return content_key(**fields)


def score_pairs(scorer, pairs: Iterable[dict], output_dir: str | os.PathLike, provenance: dict | None = None,
                overwrite: bool = False) -> list[dict]:
    """Scores every response of every pair and appends one prediction per pair to output_dir/predictions.jsonl.

    A pair is a dict: row (its index in the benchmark), id, category, images (the prompt's), prompt, responses (two
    or more), preferred (the index of the preferred response), and optionally num_preferred (responses
    preferred..preferred + num_preferred - 1 are all preferred; 1 unless given) and response_images (a list per
    response: the images inside it, after the prompt's in the conversation). Its prediction holds its labels (every
    key but the inputs and the row), the scores and `correct`. Pairs already in the file (the same content, same
    `provenance`) are not scored again, wherever they are in the benchmark now, so an interrupted run resumes; the
    pairs are shared out across processes (recipes/shared/resumable.py). Returns the predictions of `pairs`, in
    their order, with their row.
    """
    path = Path(output_dir) / PREDICTIONS_FILE
    pairs = [dict(pair, key=pair_key(pair)) for pair in pairs]
    if process_state().is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / ROWS_FILE).write_text(json.dumps({"keys": [pair["key"] for pair in pairs]}) + "\n")
    done = score_resumably(path, [(pair["key"], pair) for pair in pairs], lambda chunk: _score(scorer, chunk),
                           provenance=provenance, overwrite=overwrite, per_write=PAIRS_PER_WRITE,
                           desc="Scoring pairs")
    return [dict(done[pair["key"]], row=pair["row"]) for pair in pairs]


INPUTS = ("row", "images", "prompt", "responses", "response_images")  # what is not a label of the prediction


def _score(scorer, pairs: list[dict]) -> list[dict]:
    items = []
    for pair in pairs:
        response_images = pair.get("response_images") or [[] for _ in pair["responses"]]
        items += [{"images": [*pair["images"], *images], "prompt": pair["prompt"], "response": response}
                  for response, images in zip(pair["responses"], response_images, strict=True)]
    scores = iter(scorer.score(items))
    predictions = []
    for pair in pairs:
        prediction = {key: value for key, value in pair.items() if key not in INPUTS}
        prediction["scores"] = [next(scores) for _ in pair["responses"]]
        prediction["correct"] = margin(prediction) > 0
        predictions.append(prediction)
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
    """The lowest reward of a preferred response minus the highest of the others: positive when correct."""
    scores, first = prediction["scores"], prediction["preferred"]
    last = first + prediction.get("num_preferred", 1)
    return min(scores[first:last]) - max(scores[:first] + scores[last:])


def write_report(
    output_dir: str | os.PathLike,
    benchmark: str,
    metrics: dict,
    columns: list[str],
    published: dict[str, list[float]],
    predictions: list[dict],
    model: str | None,
    notes: str = "",
    rows: int | None = None,
) -> str:
    """Writes metrics.json, results.md (our row beside `published`) and margins.png; returns the Markdown.

    `metrics` holds a value (percent) for each of `columns` and per-category counts under "categories"; `rows` is
    the number of rows of the benchmark (the predictions' count unless some are missing).
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
    rows = len(predictions) if rows is None else rows
    coverage = {"items": len(predictions), "rows": rows, "fraction": round(len(predictions) / rows, 4)}
    summary = {"benchmark": benchmark, "model": model, "items": len(predictions), "coverage": coverage, **metrics,
               "scoring": scoring}
    metrics_file.write_text(json.dumps(summary, indent=2) + "\n")

    model_name = Path(model).name if model else "this run"
    ours = f"**{model_name}** (ours, {len(predictions)} items)"
    if len(predictions) < rows:
        ours = f"**{model_name}** (ours, PARTIAL: {len(predictions)} of {rows} items)"
    lines = [f"# {benchmark}", "", "| Model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, values in published.items():
        lines.append(f"| {name} | " + " | ".join(_percent(value) for value in values) + " |")
    lines.append(f"| {ours} | " + " | ".join(_percent(metrics[column]) for column in columns) + " |")
    if notes:
        lines += ["", notes]
    lines += ["", "| Category | Items | Correct | Accuracy |", "|---|---:|---:|---:|"]
    for category, entry in metrics["categories"].items():
        lines.append(f"| {category} | {entry['items']} | {_count(entry['correct'])} | {_percent(entry['accuracy'])} |")
    markdown = "\n".join(lines) + "\n"
    (output_dir / RESULTS_FILE).write_text(markdown)

    plot_margins(predictions, metrics["categories"], output_dir / MARGINS_PLOT, f"{benchmark}: {model_name}")
    return markdown


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _count(value: float | None) -> str:
    """Correct items; a benchmark that gives partial credit (RewardBench 2's ties at the top) sums fractions."""
    return "-" if value is None else str(int(value)) if value == int(value) else f"{value:.2f}"


def plot_margins(predictions: list[dict], categories: dict[str, dict], path: str | os.PathLike, title: str) -> None:
    """One box per category of `margin` (lowest preferred reward - highest other): right of the dashed zero line is
    correct. The labels give each category's size and score from `categories` (the metrics' own, as in the
    tables)."""
    margins = {category: [] for category in categories}
    for prediction in predictions:
        margins[prediction["category"]].append(margin(prediction))
    figure = Figure(figsize=(9, 1.5 + 0.45 * len(margins)))  # a bare Figure renders with Agg: no display needed
    axes = figure.subplots()
    labels = [f"{c} (n={e['items']}, {_percent(e['accuracy'])}%)" for c, e in categories.items()]
    axes.boxplot(list(margins.values()), orientation="horizontal", tick_labels=labels)
    axes.axvline(0.0, color="tab:red", linestyle="--", linewidth=1)
    axes.invert_yaxis()  # first category on top, as in the tables
    axes.set_xlabel("reward margin: score(preferred) - max score(others)")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
