"""Load, validate and mix preference datasets in the repository's one schema.

Schema (one row = one pair), from a hub id or a local .jsonl / .json / .parquet file:
    images    list of images: paths (relative to the data file), bytes or datasets Images; may be empty.
              `image` (a single image or null) is accepted instead.
    videos    optional list of videos: each a video file (path relative to the data file) or a list of frames
              (images), as qwen-vl-utils takes them; sampled and sized by the video budget (`video_fps`,
              `video_max_frames`, `video_min_pixels` / `video_max_pixels` per frame), saved with the checkpoint.
    prompt    a string, or chat messages [{"role": "user", "content": ...}, ...]
    chosen    the preferred response: a string, or assistant messages
    rejected  the other response, same form
    margin    optional float: the loss becomes -log sigmoid(r+ - r- - margin), as in TRL; finite and at most
              `max_abs_margin` (100 by default) in size, else the row is a `bad_margin` drop
    source    optional string, kept for reports
Any turn, responses included, may hold image and video parts: `{"type": "image", "image": path}` /
`{"type": "video", "video": path or [frames]}` carry their media inline; a bare `{"type": "image"}` / `{"type":
"video"}` takes the next of `images` / `videos`, and those left over go first in the first user turn. A response's
media belong to it alone: packed training encodes the prompt's media once and each response's in its branch.

Every row is checked once, before training: images and videos decode (a bad one is a counted drop naming it), responses are non-empty and differ, and both
rendered sequences fit `max_length` (a response is never cut: its last token is the one scored). Bad rows
are dropped and counted per reason (`bad_rows=drop`, the default) or stop the run with an error naming the
file and the row (`bad_rows=error`); the per-source report is logged and returned, and `write_data_report` writes
it beside a checkpoint with every dropped row listed (file, row, reason). Rows count from 0, as
`datasets` indexes them (row 0 is the first line of a .jsonl file). The check runs on the files as they are at
every load, never from `datasets`' cache. An empty source, or a mixture with no row left, is an error with the
report's table.
"""

import json
import logging
import math
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from datasets import Dataset, Features, Image, List, Value, concatenate_datasets, load_dataset

from .conversation import (
    ConversationRenderer,
    PixelBudgetArguments,
    VideoBudgetArguments,
    open_image,
    place_media,
    video_source,
)

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
DATA_REPORT_FILE, DROPPED_ROWS_FILE = "data_report.json", "dropped_rows.jsonl"
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class PreferenceDataArguments(PixelBudgetArguments, VideoBudgetArguments):
    """Which pairs train and how they are checked and laid out in a batch."""

    dataset_mixture: dict | str | None = field(
        default=None,
        metadata={"help": 'Datasets and weights, e.g. {"data/pairs.jsonl": 1.0, "org/hub-set": 0.5} (JSON on the CLI). '
                  "A weight scales the rows used: 0.5 takes a random half, 2.0 repeats the set twice."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of hub datasets."})
    eval_dataset_mixture: dict | str | None = field(default=None, metadata={"help": "Same form, for evaluation."})
    bad_rows: str = field(default="drop", metadata={"help": "drop: count and report bad rows; error: stop at the first."})
    max_abs_margin: float = field(
        default=100.0,
        metadata={"help": "Largest |margin| kept: a larger or non-finite margin is a bad_margin drop (a margin of 1e30 "
                  "makes the loss 1e30, 1e40 overflows fp32)."},
    )
    pack_pairs: bool = field(
        default=True,
        metadata={"help": "One forward per pair with a shared prompt (the image encoded once); falls back to two rows "
                  "per pair where unsupported (other families, attention other than sdpa)."},
    )

    def __post_init__(self):
        for name in ("dataset_mixture", "eval_dataset_mixture"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, json.loads(value) if value.lstrip().startswith("{") else {value: 1.0})
        if self.bad_rows not in ("drop", "error"):
            raise ValueError(f"bad_rows must be 'drop' or 'error', got {self.bad_rows!r}")


class BadRowError(ValueError):
    pass


def load_source(path: str, split: str = "train") -> tuple[Dataset, str | None]:
    """A dataset from a local file / directory or a hub id; also returns the base dir for relative image paths."""
    local = Path(path)
    if local.is_file():
        if local.suffix not in LOCAL_FORMATS:
            raise ValueError(f"{path}: unsupported file type {local.suffix!r}; use one of {sorted(LOCAL_FORMATS)}")
        if LOCAL_FORMATS[local.suffix] == "json" and not local.read_text().strip():
            raise ValueError(f"{path}: the file is empty (no rows)")
        return load_dataset(LOCAL_FORMATS[local.suffix], data_files=str(local), split="train"), str(local.parent)
    if local.is_dir():
        if (local / "dataset_info.json").exists() or (local / "state.json").exists():
            return datasets.load_from_disk(str(local)), str(local)
        return load_dataset(str(local), split=split), str(local)
    return load_dataset(path, split=split), None


def _undecoded_images(dataset: Dataset) -> Dataset:
    """Images as {"bytes", "path"} dicts: decoding happens once, in validation and in the collator."""
    for column in ("image", "images"):
        feature = dataset.features.get(column)
        if isinstance(feature, Image):
            dataset = dataset.cast_column(column, Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), Image):
            dataset = dataset.cast_column(column, List(Image(decode=False)))
    return dataset


def _image_entry(image, base_dir: str | None) -> dict:
    if isinstance(image, dict):
        return {"bytes": image.get("bytes"), "path": image.get("path")}
    if isinstance(image, (bytes, bytearray)):
        return {"bytes": bytes(image), "path": None}
    path = Path(image)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    return {"bytes": None, "path": str(path)}


def _video_entry(video, base_dir: str | None) -> dict:
    """A video as the dataset stores it: {"path": a video file, "frames": []} or {"path": None, "frames": [images]}."""
    video = video_source(video)
    if isinstance(video, (list, tuple)):
        return {"path": None, "frames": [_image_entry(frame, base_dir) for frame in video]}
    return {"path": _image_entry(video, base_dir)["path"], "frames": []}


MEDIA_COLUMNS = ("images", "videos", "chosen_images", "chosen_videos", "rejected_images", "rejected_videos")
IMAGES = List(Image(decode=False))
MESSAGES = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
# The checked rows' columns: the prompt's media, each response's own, and the conversation with bare placeholders.
CHECKED_FEATURES = {
    **{column: List({"path": Value("string"), "frames": IMAGES}) if column.endswith("videos") else IMAGES
       for column in MEDIA_COLUMNS},
    "prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES,
    "source": Value("string"), "drop_reason": Value("string"), "drop_detail": Value("string"),
}


def is_empty(messages: list[dict]) -> bool:
    return not any((part["text"] or "").strip() or part["type"] != "text" for m in messages for part in m["content"])


def message_problem(value) -> str | None:
    """What makes `value` neither a string nor a list of chat messages (None when it is one)."""
    if isinstance(value, str):
        return None
    if not isinstance(value, list):
        return f"expected a string or a list of chat messages, got {type(value).__name__}"
    for number, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            return f"message {number} is not a {{role, content}} dict: {message!r:.80}"
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
            return f"message {number}: content must be a string or a list of parts, got {content!r:.80}"
    return None


class RowChecker:
    """Normalises one row to the canonical form and finds what is wrong with it ('' when nothing)."""

    def __init__(self, name, base_dir, renderer: ConversationRenderer, max_length: int | None, strict: bool,
                 max_abs_margin: float = 100.0):
        self.name, self.base_dir, self.renderer, self.max_length, self.strict = name, base_dir, renderer, max_length, strict
        self.max_abs_margin = max_abs_margin

    def __call__(self, row: dict, index: int) -> dict:
        out = {**{column: [] for column in MEDIA_COLUMNS}, "prompt": [], "chosen": [], "rejected": [],
               "source": str(row.get("source") or self.name), "drop_reason": "", "drop_detail": ""}
        if "margin" in row:
            out["margin"] = 0.0
        problem = self.normalise(row, out)
        if problem is None:
            problem = self.find_problem(out)
        if problem:
            reason, detail = problem
            out["drop_reason"], out["drop_detail"] = reason, f"{self.name}: row {index}: {detail}"
            if self.strict:
                raise BadRowError(out["drop_detail"])
        return out

    def normalise(self, row: dict, out: dict) -> tuple[str, str] | None:
        """Fills `out` with the canonical form of `row`, or says which field has the wrong type."""
        for field_name in ("prompt", "chosen", "rejected"):
            problem = message_problem(row[field_name])
            if problem:
                return f"bad_{'prompt' if field_name == 'prompt' else 'response'}", f"{field_name}: {problem}"
        images = row.get("images")
        if images is None:
            images = [] if row.get("image") is None else [row["image"]]
        if not isinstance(images, list) or any(image is None for image in images):
            return "bad_image_field", f"images must be a list of images, got {images!r:.80}"
        videos = row.get("videos") or []
        if not isinstance(videos, list) or any(not video for video in videos):
            return "bad_video_field", f"videos must be a list of video files or frame lists, got {videos!r:.80}"
        sides = {}
        for side in ("chosen", "rejected"):
            try:
                sides[side] = place_media(row["prompt"], row[side], images, videos)
            except ValueError as error:
                return "bad_media", f"{side}: {error}"
        if sides["chosen"].prompt != sides["rejected"].prompt:
            return "bad_media", ("the responses hold different numbers of bare image / video placeholders, so the "
                                 "prompt's media differ between them; give a response's media inline in its parts")
        placed = sides["chosen"]
        out["prompt"] = placed.prompt
        out["images"] = [_image_entry(image, self.base_dir) for image in placed.images[:placed.prompt_images]]
        out["videos"] = [_video_entry(video, self.base_dir) for video in placed.videos[:placed.prompt_videos]]
        for side, placed in sides.items():
            out[side] = placed.response
            out[f"{side}_images"] = [_image_entry(image, self.base_dir) for image in placed.images[placed.prompt_images:]]
            out[f"{side}_videos"] = [_video_entry(video, self.base_dir) for video in placed.videos[placed.prompt_videos:]]
        if "margin" in row:
            margin = row["margin"]
            if isinstance(margin, bool) or not isinstance(margin, (int, float)):
                return "bad_margin", f"margin must be a number, got {margin!r:.80}"
            if not math.isfinite(margin) or abs(margin) > self.max_abs_margin:
                return "bad_margin", (f"margin {margin!r} is not finite or exceeds max_abs_margin "
                                      f"{self.max_abs_margin} in size")
            out["margin"] = float(margin)
        return None

    def check_image(self, image: dict):
        """(the image resized for the model, None) or (None, what is wrong)."""
        where = image["path"] or "embedded bytes"
        if image["bytes"] is None and not os.path.isfile(image["path"]):
            return None, ("missing_image", f"image file {where} does not exist")
        try:
            decoded = open_image(image)
            decoded.load()
        except Exception as error:  # PIL raises several types for undecodable data
            return None, ("corrupt_image", f"image {where} cannot be decoded ({type(error).__name__}: {error})")
        try:  # the resize of training: qwen-vl-utils refuses extreme shapes
            return self.renderer.load_image(decoded), None
        except Exception as error:
            return None, ("unusable_image", f"image {where} cannot be resized for the model ({error})")

    def check_video(self, video: dict, number: int):
        """(the video loaded for the model, None) or (None, ("bad_video", which video and what is wrong))."""
        where = video["path"] or f"video {number} (a list of {len(video['frames'])} frames)"
        if video["path"] is not None and not os.path.isfile(video["path"]):
            return None, ("bad_video", f"video file {where} does not exist")
        try:
            return self.renderer.load_video(video), None
        except Exception as error:  # PyAV, PIL and qwen-vl-utils raise many types for undecodable or unusable data
            return None, ("bad_video", f"video {where} cannot be decoded or sampled ({type(error).__name__}: {error})")

    def find_problem(self, row: dict) -> tuple[str, str] | None:
        loaded = {}  # each image and video decoded once; the length check below renders these
        for column in MEDIA_COLUMNS:
            check = self.check_video if column.endswith("videos") else lambda image, _: self.check_image(image)
            loaded[column] = []
            for number, medium in enumerate(row[column]):
                value, problem = check(medium, number)
                if problem:
                    return problem
                loaded[column].append(value)
        if is_empty(row["prompt"]):  # the prompt's images and videos are placeholder parts in it
            return "empty_prompt", "the prompt is empty"
        for side in ("chosen", "rejected"):
            if is_empty(row[side]):
                return "empty_response", f"the {side} response is empty"
        if all(row[f"chosen{key}"] == row[f"rejected{key}"] for key in ("", "_images", "_videos")):
            return "identical_responses", "chosen and rejected are identical"
        if self.max_length is not None:
            items = [{"images": loaded["images"] + loaded[f"{s}_images"], "videos": loaded["videos"] + loaded[f"{s}_videos"],
                      "prompt": row["prompt"], "response": row[s]} for s in ("chosen", "rejected")]
            length = int(self.renderer(items)["attention_mask"].sum(-1).max())
            if length > self.max_length:
                return "overlong", f"{length} tokens > max_length {self.max_length} (responses are never cut)"
        return None


def _weighted(dataset: Dataset, weight: float, seed: int) -> Dataset:
    whole, fraction = int(weight), weight - int(weight)
    parts = [dataset] * whole
    if fraction > 0:
        parts.append(dataset.shuffle(seed=seed).select(range(round(len(dataset) * fraction))))
    return concatenate_datasets(parts) if parts else dataset.select([])


def load_preference_mixture(
    mixture: dict[str, float],
    processing_class,
    max_length: int | None = None,
    split: str = "train",
    bad_rows: str = "drop",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    seed: int = 42,
    num_proc: int | None = None,
    max_abs_margin: float = 100.0,
) -> tuple[Dataset, dict]:
    """Loads every source, checks each row, drops bad ones by policy, applies weights and concatenates.

    Returns the mixed dataset (canonical columns: MEDIA_COLUMNS, prompt, chosen, rejected, source[, margin])
    and a report {source: {rows, kept, dropped: {reason: n}, examples: {reason: message}, dropped_rows: [...]}}, where
    dropped_rows lists every dropped row as {file, row, reason, message}.
    """
    if not mixture:
        raise ValueError("no dataset given: set dataset_mixture, e.g. {\"data/pairs.jsonl\": 1.0}")
    renderer = ConversationRenderer(processing_class, min_pixels=min_pixels, max_pixels=max_pixels)
    parts, report = [], {}
    has_margin = False
    for name, weight in mixture.items():
        dataset, base_dir = load_source(name, split)
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{name}: missing column(s) {missing}; found {dataset.column_names}. "
                f"Expected the preference schema: images (or image), {', '.join(REQUIRED_COLUMNS)}, optional margin."
            )
        if len(dataset) == 0:
            raise ValueError(f"{name}: no rows")
        dataset = _undecoded_images(dataset)
        checker = RowChecker(name, base_dir, renderer, max_length, strict=bad_rows == "error",
                             max_abs_margin=max_abs_margin)
        # A fingerprint of its own at every load: datasets keys its cache on the data file, not on the images, which
        # may have been fixed or broken since; every later step (filter, cast) then runs afresh too.
        features = Features({**CHECKED_FEATURES, **({"margin": Value("float64")} if "margin" in dataset.column_names else {})})
        checked = dataset.map(
            checker, with_indices=True, num_proc=num_proc, desc=f"Checking {name}", features=features,
            remove_columns=dataset.column_names, new_fingerprint=f"row-check-{uuid.uuid4().hex}",
        )
        reasons = Counter(checked["drop_reason"])
        dropped_rows = [{"file": name, "row": row, "reason": reason, "message": detail}
                        for row, (reason, detail) in enumerate(zip(checked["drop_reason"], checked["drop_detail"]))
                        if reason]
        examples = {}
        for dropped in dropped_rows:
            examples.setdefault(dropped["reason"], dropped["message"])
        kept = checked.filter(lambda r: r == "", input_columns="drop_reason")
        kept = kept.remove_columns(["drop_reason", "drop_detail"])
        report[name] = {
            "rows": len(dataset),
            "kept": len(kept),
            "dropped": {reason: n for reason, n in reasons.items() if reason},
            "examples": examples,
            "weight": weight,
            "dropped_rows": dropped_rows,
        }
        has_margin |= "margin" in kept.column_names
        parts.append(_weighted(kept, weight, seed))
    if has_margin:
        parts = [p if "margin" in p.column_names else p.add_column("margin", [0.0] * len(p)) for p in parts]
    mixed = concatenate_datasets(parts)
    table = format_report(report, len(mixed))
    if len(mixed) == 0:
        raise ValueError(f"no pair is left to train on from {', '.join(report)}: every row was dropped or "
                         f"weighted out.\n{table}")
    logger.info("Preference data:\n%s", table)
    return mixed, report


def format_report(report: dict, total: int) -> str:
    lines = [f"{'source':<48} {'rows':>8} {'kept':>8}  dropped"]
    for name, entry in report.items():
        dropped = ", ".join(f"{reason}: {n}" for reason, n in sorted(entry["dropped"].items())) or "-"
        lines.append(f"{name[-48:]:<48} {entry['rows']:>8} {entry['kept']:>8}  {dropped}")
        for reason, example in entry["examples"].items():
            lines.append(f"    e.g. {example}")
    lines.append(f"mixture after weights: {total} pairs")
    return "\n".join(lines)


def write_data_report(report: dict, output_dir: str | os.PathLike) -> None:
    """data_report.json (rows, kept and drops per reason of each source) and dropped_rows.jsonl beside it: every
    dropped row, one line each, {split, file, row, reason, message}."""
    splits = report if set(report) == {"train", "eval"} else {"train": report}
    summary = {split: {name: {key: value for key, value in entry.items() if key != "dropped_rows"}
                       for name, entry in sources.items()} for split, sources in splits.items()}
    dropped = [{"split": split, **row} for split, sources in splits.items()
               for entry in sources.values() for row in entry["dropped_rows"]]
    output_dir = Path(output_dir)
    (output_dir / DATA_REPORT_FILE).write_text(json.dumps(summary if splits is report else summary["train"], indent=2))
    (output_dir / DROPPED_ROWS_FILE).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in dropped))


def load_training_data(data_args: PreferenceDataArguments, processing_class, training_args):
    """Train (and optional eval) mixtures as a recipe configures them; returns (train, eval, report)."""
    load = dict(
        processing_class=processing_class, max_length=training_args.max_length, split=data_args.dataset_split,
        bad_rows=data_args.bad_rows, min_pixels=data_args.min_pixels, max_pixels=data_args.max_pixels,
        seed=training_args.seed, num_proc=training_args.dataset_num_proc, max_abs_margin=data_args.max_abs_margin,
    )
    train, report = load_preference_mixture(data_args.dataset_mixture, **load)
    evaluation = None
    if data_args.eval_dataset_mixture:
        evaluation, eval_report = load_preference_mixture(data_args.eval_dataset_mixture, **load)
        report = {"train": report, "eval": eval_report}
    return train, evaluation, report
