"""Score responses with a trained reward model, or rerank N candidates (best-of-N).

Input, one JSON object per line:
    image       a path (relative to the input file) or null; `images`, a list of paths, for several
    videos      optional: a list of videos, each a video file or a list of frame paths (relative to the input file)
    prompt      a string, or chat messages
    response    one response (string or assistant messages)  -> the output line adds `score`
    responses   a list of candidates                          -> adds `scores`, `best_index` and `best`
Any turn, responses included, may hold image and video parts with their media inline (paths relative to the input
file), as the training data may. Every line is checked before any scoring, as the training data is (prompt and
responses are strings or chat messages, not empty; media existing files, one for each placeholder); an error names the
line (1-based, as editors count).
Output: the input lines, in order, with those fields added. Rewards come from the forward pass of training
(`RewardScorer`), in batches of similar length; bf16 on GPU; the pixel budget the model was trained with. Scores
are kept as they are made (in <output>.progress.jsonl), each under a hash of its line's content (text, and images
and videos by their bytes): an interrupted run, or one stopped by a bad line, resumes when rerun, even on an input
edited, reordered or grown since (only new or changed lines are scored). What produced them (model, weights fingerprint,
settings) is written to <output>.provenance.json.
Under `torchrun --nproc_per_node N` (or `accelerate launch`) every process scores a share of the lines.

    python recipes/score.py --model_name_or_path Skywork/Skywork-VL-Reward-7B \
        --input candidates.jsonl --output scored.jsonl --batch_size 8
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: heads/, collators/, recipes/

from trl import TrlParser

from collators import open_image, to_messages
from collators.conversation import place_media
from collators.preference_data import is_empty, message_problem
from recipes.eval.benchmark import ScorerArguments, load_scorer
from recipes.shared.images import image_digest, resolve_image, resolve_video, video_digest
from recipes.shared.resumable import content_key, process_state, provenance_file, score_resumably

logger = logging.getLogger(__name__)
LINES_PER_WRITE = 32  # an interruption loses at most this many scored lines


@dataclass(kw_only=True)
class ScoreFileArguments(ScorerArguments):
    input: str = field(metadata={"help": "jsonl: image(s), videos, prompt and response or responses per line."})
    output: str = field(metadata={"help": "jsonl: the input lines with score, or scores / best_index / best."})
    overwrite: bool = field(default=False, metadata={
        "help": "Discard the progress of an interrupted run that another model or other settings made."})


def line_images(line: dict, where: str) -> list:
    if "image" in line and "images" in line:
        raise ValueError(f"{where}: give `image` or `images`, not both")
    images = line.get("images")
    if images is None:
        images = [] if line.get("image") is None else [line["image"]]
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise ValueError(f"{where}: `image` must be a path or null, `images` a list of paths; got {images!r:.80}")
    return images


def line_videos(line: dict, where: str) -> list:
    videos = line.get("videos") or []
    if not isinstance(videos, list):
        raise ValueError(f"{where}: `videos` must be a list of videos (a file or a list of frames each); "
                         f"got {videos!r:.80}")
    return videos


def line_responses(line: dict, where: str) -> list:
    if ("response" in line) == ("responses" in line):
        raise ValueError(f"{where}: give exactly one of `response` (one answer) or `responses` (a list to rerank)")
    if "response" in line:
        return [line["response"]]
    if not isinstance(line["responses"], list) or not line["responses"]:
        raise ValueError(f"{where}: `responses` must be a non-empty list")
    return line["responses"]


def read_line(line, base_dir: str, where: str) -> dict:
    """A line as work to score, checked field by field as the training data is (collators/preference_data.py)."""
    if not isinstance(line, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(line).__name__}")
    if "prompt" not in line:
        raise ValueError(f"{where}: missing `prompt`")
    responses = line_responses(line, where)
    named = [("prompt", line["prompt"], "user")] + [
        ("response" if "response" in line else f"responses[{i}]", response, "assistant")
        for i, response in enumerate(responses)]
    for name, value, _ in named:
        problem = message_problem(value)
        if problem:
            raise ValueError(f"{where}: `{name}`: {problem}")
    images, videos = line_images(line, where), line_videos(line, where)
    found = {}  # (kind, medium as given) -> (path, digest): each file resolved and hashed once per line

    def resolved(kind: str, medium) -> tuple:
        name = (kind, json.dumps(medium, sort_keys=True, default=str))
        if name not in found:
            path = resolve_video(medium, base_dir, where) if kind == "video" else resolve_image(medium, base_dir, where)
            found[name] = path, video_digest(path) if kind == "video" else image_digest(path)
        return found[name]

    items, media = [], []  # one row per response: its media in placeholder order, given or inline
    for name, value, _ in named[1:]:
        try:
            placed = place_media(line["prompt"], value, images, videos)
        except ValueError as error:
            raise ValueError(f"{where}: `{name}`: {error}") from None
        row_images = [resolved("image", image) for image in placed.images]
        row_videos = [resolved("video", video) for video in placed.videos]
        items.append({"images": [path for path, _ in row_images], "videos": [path for path, _ in row_videos],
                      "prompt": placed.prompt, "response": placed.response})
        media.append([[digest for _, digest in row_images], [digest for _, digest in row_videos]])
    for name, value, role in named:
        if is_empty(to_messages(value, role)) and not (name == "prompt" and (images or videos)):
            raise ValueError(f"{where}: `{name}` is empty (no text{' and no image' if name == 'prompt' else ''})")
    key = content_key(prompt=line["prompt"], responses=responses, media=media)
    return {"key": key, "where": where, "items": items}


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line."""
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if text.strip():
            try:
                lines.append((number, json.loads(text)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: not valid JSON ({error})") from error
    return lines


def check_media(work: dict, renderer) -> None:
    """Decodes and resizes a line's images and videos as the scorer does, to name the line whose medium it could not
    use."""
    for video in (video for item in work["items"] for video in item["videos"]):
        name = video if isinstance(video, str) else f"(a list of {len(video)} frames)"
        try:
            renderer.load_video(video)
        except Exception as error:  # PyAV, PIL and qwen-vl-utils raise several types
            raise ValueError(f"{work['where']}: video {name} cannot be read or sampled ({type(error).__name__}: "
                             f"{error}); fix or remove the line, then rerun: the lines scored so far are kept") from error
    for image in (image for item in work["items"] for image in item["images"]):
        name = image if isinstance(image, str) else "bytes"
        try:
            decoded = open_image(image)
            decoded.load()
        except Exception as error:  # PIL raises several types for undecodable data
            raise ValueError(f"{work['where']}: image {name} cannot be decoded ({type(error).__name__}: {error}); fix "
                             "or remove the line, then rerun: the lines scored so far are kept") from error
        try:  # qwen-vl-utils refuses extreme shapes (an aspect ratio over 200)
            renderer.load_image(decoded)
        except Exception as error:
            raise ValueError(f"{work['where']}: image {name} cannot be resized for the model ({error}); fix or "
                             "remove the line, then rerun: the lines scored so far are kept") from error


def score_lines(scorer, works: list[dict]) -> list[dict]:
    try:
        scores = scorer.score([item for work in works for item in work["items"]])
    except Exception:
        for work in works:  # the media are decoded again only to say which line failed
            check_media(work, scorer.renderer)
        raise
    records, start = [], 0
    for work in works:
        records.append({"key": work["key"], "scores": scores[start:start + len(work["items"])]})
        start += len(work["items"])
    return records


def main(args: ScoreFileArguments) -> list[dict]:
    input_file = Path(args.input)
    numbered = read_jsonl(input_file)
    works = [read_line(line, str(input_file.parent), f"{args.input} line {number}") for number, line in numbered]
    output = Path(args.output)
    if not works:
        logger.warning("%s holds no lines to score; %s is written empty", args.input, args.output)
    else:
        # Scores are appended to <output>.progress.jsonl as they are made, so an interrupted run resumes.
        scorer = load_scorer(args)
        progress = output.parent / f"{output.stem}.progress.jsonl"
        scored = score_resumably(progress, [(work["key"], work) for work in works],
                                 lambda chunk: score_lines(scorer, chunk), provenance=scorer.provenance(),
                                 overwrite=args.overwrite, per_write=LINES_PER_WRITE, desc="Scoring lines")
    lines = []
    for (_, line), work in zip(numbered, works):
        line_scores = scored[work["key"]]["scores"]
        if "response" in line:
            line["score"] = line_scores[0]
        else:
            best = max(range(len(line_scores)), key=line_scores.__getitem__)
            line.update(scores=line_scores, best_index=best, best=line["responses"][best])
        lines.append(line)
    if process_state().is_main_process:
        output.parent.mkdir(parents=True, exist_ok=True)
        temporary = output.with_suffix(".tmp")
        temporary.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
        os.replace(temporary, output)
        if works:  # what produced the scores stays beside them
            progress.unlink()
            os.replace(provenance_file(progress), provenance_file(output))
    return lines


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    main(*TrlParser((ScoreFileArguments,)).parse_args_and_config())
