"""Scoring that survives interruptions and uses every process of a launch: the evaluators, score.py, MPO data.

Records (JSON objects) are appended to a jsonl file as they are scored, each under the key of the input row it
scores: a hash of that row's content (`content_key`: the text, and the images by their bytes), never its position.
An input that was edited, reordered or grown since gets, for every row, the record of exactly that content: rows
scored before are reused wherever they now are, and new or changed rows are scored.

Under `accelerate launch` / `torchrun` the missing records are split across the processes; each appends to its own
part file (`<name>.part-<rank>.jsonl`) and the main process folds the parts into the file once, so a row is
written once whatever the number of processes. A rerun (with any number of processes) resumes from the file
and from the parts an interrupted run left.

What produced the records (the model, a fingerprint of its weights, the scoring settings) is kept beside them in
`<name>.provenance.json`: a rerun with anything different refuses to reuse them and says how to start afresh.
"""

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def process_state() -> PartialState:
    """This process's place in the launch (torchrun / accelerate launch; one process otherwise). Without GPUs the
    processes talk over gloo: accelerate only sets that up when told the run is on CPU."""
    return PartialState(cpu=not torch.cuda.is_available())


class StaleRecordsError(ValueError):
    """The file holds records made by another model or other settings."""


def content_key(**fields) -> str:
    """sha256 of `fields` as canonical JSON: pass everything a record is made from (the images as their
    `image_digest`), so that two rows share a key only when they share their record."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_records(path: str | os.PathLike) -> list[dict]:
    """The lines of a records file. A last line cut short by an interrupted run is left out (and scored again)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines(keepends=True)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines) and not line.endswith("\n"):
                logger.warning("%s: line %d was cut short by an interrupted run; it will be scored again", path, number)
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({error}); delete it or the file") from error
    return records


def part_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.stem}.part-*.jsonl"))


def provenance_file(path: Path) -> Path:
    return path.parent / f"{path.stem}.provenance.json"


def check_provenance(path: Path, provenance: dict | None, overwrite: bool) -> None:
    """Refuses records of `path` (and its parts) that another model or other settings produced."""
    if provenance is None or overwrite:
        return
    records = [record for file in [path, *part_files(path)] for record in read_records(file)]
    if not records:
        return
    if any("key" not in record for record in records):
        raise StaleRecordsError(f"{path} holds records keyed by line number (an earlier version of this repository); "
                                "pass --overwrite true to discard them and score afresh.")
    record = provenance_file(path)
    previous = json.loads(record.read_text()) if record.is_file() else None
    if previous == provenance:
        return
    if previous is None:
        problem = "no record of what produced them"
    else:
        changed = sorted(k for k in set(previous) | set(provenance) if previous.get(k) != provenance.get(k))
        problem = "; ".join(f"{k}: {previous.get(k)!r} then, {provenance.get(k)!r} now" for k in changed)
    raise StaleRecordsError(
        f"{path} holds scores of another model or other settings ({problem}). Use another output path, or pass "
        "--overwrite true to discard them and score afresh."
    )


def merge_parts(path: Path, order: list[str]) -> None:
    """Folds the part files into `path` (one record per key: the input's rows in `order`, then any others) and
    removes them; atomic."""
    records = {record["key"]: record for file in [path, *part_files(path)] for record in read_records(file)}
    ordered = [records.pop(key) for key in dict.fromkeys(order) if key in records] + list(records.values())
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in ordered))
    os.replace(temporary, path)
    for part in part_files(path):
        part.unlink()


def score_resumably(path: str | os.PathLike, todo: list[tuple[str, object]], score: Callable[[list], list[dict]],
                    provenance: dict | None = None, overwrite: bool = False, per_write: int = 64,
                    desc: str = "Scoring") -> dict[str, dict]:
    """Scores what `todo` ((content key, work) pairs, in input order) still misses from `path`, across all
    processes; returns every record.

    `score` turns a list of work items into their records (dicts holding the work's `key`). Rows with equal keys
    are scored once. Every process returns the same dict {key: record}; the file holds the records in input order.
    """
    order = [key for key, _ in todo]
    path, state = Path(path), process_state()
    check_provenance(path, provenance, overwrite)  # every process raises alike, so none waits alone
    state.wait_for_everyone()
    if state.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for stale in [path, *part_files(path)]:
                stale.unlink(missing_ok=True)
        merge_parts(path, order)  # leftovers of an interrupted run; a cut last line is dropped here, never followed
        if provenance is not None:
            provenance_file(path).write_text(json.dumps(provenance, indent=2) + "\n")
    state.wait_for_everyone()

    done = {record["key"] for record in read_records(path)}
    unique = {}  # one work item per key, the first
    for key, work in todo:
        unique.setdefault(key, work)
    pending = [work for key, work in unique.items() if key not in done]
    if done and state.is_main_process:
        logger.info("Resuming: %d of %d rows already scored in %s", len(unique) - len(pending), len(unique), path)
    mine = pending[state.process_index::state.num_processes]
    output = path if state.num_processes == 1 else path.parent / f"{path.stem}.part-{state.process_index}.jsonl"
    with output.open("a") as file, tqdm(total=len(unique), initial=len(unique) - len(pending), desc=desc,
                                        disable=not state.is_main_process) as progress:
        for start in range(0, len(mine), per_write):
            chunk = mine[start:start + per_write]
            file.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in score(chunk))
            file.flush()
            progress.update(min(len(chunk) * state.num_processes, progress.total - progress.n))  # estimated
    state.wait_for_everyone()
    if state.is_main_process:
        merge_parts(path, order)
    state.wait_for_everyone()
    records = {record["key"]: record for record in read_records(path)}
    state.wait_for_everyone()  # every process has read the file before a caller may remove it
    return records
