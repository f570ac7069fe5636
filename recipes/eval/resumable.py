"""Scoring that survives interruptions and uses every process of a launch: the evaluators, score.py, MPO data.

Records (JSON objects with a unique integer key, e.g. a benchmark row) are appended to a jsonl file as they are
scored. Under `accelerate launch` / `torchrun` the missing records are split across the processes; each appends
to its own part file (`<name>.part-<rank>.jsonl`) and the main process folds the parts into the file once, so a
row is written once whatever the number of processes. A rerun (with any number of processes) resumes from the file
and from the parts an interrupted run left.

What produced the records (the model, a fingerprint of its weights, the scoring settings) is kept beside them in
`<name>.provenance.json`: a rerun with anything different refuses to reuse them and says how to start afresh.
"""

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


def unique_records(path: str | os.PathLike, key: str) -> list[dict]:
    """One record per key (the last written wins), sorted by key: what a file means whatever its history."""
    return sorted({record[key]: record for record in read_records(path)}.values(), key=lambda record: record[key])


def part_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.stem}.part-*.jsonl"))


def provenance_file(path: Path) -> Path:
    return path.parent / f"{path.stem}.provenance.json"


def check_provenance(path: Path, provenance: dict | None, overwrite: bool) -> None:
    """Refuses records of `path` (and its parts) that another model or other settings produced."""
    if provenance is None or overwrite:
        return
    has_records = bool(read_records(path)) or any(read_records(part) for part in part_files(path))
    record = provenance_file(path)
    previous = json.loads(record.read_text()) if record.is_file() else None
    if not has_records or previous == provenance:
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


def merge_parts(path: Path, key: str) -> None:
    """Folds the part files into `path` (one record per key, in key order) and removes them; atomic."""
    records = {record[key]: record for file in [path, *part_files(path)] for record in read_records(file)}
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for _, r in sorted(records.items())))
    os.replace(temporary, path)
    for part in part_files(path):
        part.unlink()


def score_resumably(path: str | os.PathLike, key: str, todo: list[tuple[int, object]],
                    score: Callable[[list], list[dict]], provenance: dict | None = None, overwrite: bool = False,
                    per_write: int = 64, desc: str = "Scoring") -> dict[int, dict]:
    """Scores what `todo` ((key, work) pairs) still misses from `path`, across all processes; returns every record.

    `score` turns a list of work items into their records (dicts holding `key`). Every process returns the same
    dict {key: record}.
    """
    path, state = Path(path), process_state()
    check_provenance(path, provenance, overwrite)  # every process raises alike, so none waits alone
    state.wait_for_everyone()
    if state.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for stale in [path, *part_files(path)]:
                stale.unlink(missing_ok=True)
        merge_parts(path, key)  # leftovers of an interrupted run; a cut last line is dropped here, never followed
        if provenance is not None:
            provenance_file(path).write_text(json.dumps(provenance, indent=2) + "\n")
    state.wait_for_everyone()

    done = {record[key] for record in read_records(path)}
    pending = [work for k, work in todo if k not in done]
    if done and state.is_main_process:
        logger.info("Resuming: %d of %d already scored in %s", len(todo) - len(pending), len(todo), path)
    mine = pending[state.process_index::state.num_processes]
    output = path if state.num_processes == 1 else path.parent / f"{path.stem}.part-{state.process_index}.jsonl"
    with output.open("a") as file, tqdm(total=len(todo), initial=len(todo) - len(pending), desc=desc,
                                        disable=not state.is_main_process) as progress:
        for start in range(0, len(mine), per_write):
            chunk = mine[start:start + per_write]
            file.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in score(chunk))
            file.flush()
            progress.update(len(chunk) * state.num_processes)
    state.wait_for_everyone()
    if state.is_main_process and state.num_processes > 1:
        merge_parts(path, key)
    state.wait_for_everyone()
    records = {record[key]: record for record in read_records(path)}
    state.wait_for_everyone()  # every process has read the file before a caller may remove it
    return records
