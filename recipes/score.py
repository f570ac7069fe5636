"""Score responses with a trained reward model, or rerank N candidates (best-of-N).

Input, one JSON object per line:
    image       a path (relative to the input file) or null; `images`, a list of paths, for several
    prompt      a string, or chat messages
    response    one response (string or assistant messages)  -> the output line adds `score`
    responses   a list of candidates                          -> adds `scores`, `best_index` and `best`
Output: the input lines, in order, with those fields added. Rewards come from the forward pass of training
(`RewardScorer`), in batches of similar length; bf16 on GPU.

    python recipes/score.py --model_name_or_path Skywork/Skywork-VL-Reward-7B \
        --input candidates.jsonl --output scored.jsonl --batch_size 8
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: heads/, collators/, recipes/

from trl import TrlParser

from recipes.eval.benchmark import ScorerArguments, load_scorer, resolve_image


@dataclass(kw_only=True)
class ScoreFileArguments(ScorerArguments):
    input: str = field(metadata={"help": "jsonl: image(s), prompt and response or responses per line."})
    output: str = field(metadata={"help": "jsonl: the input lines with score, or scores / best_index / best."})


def line_images(line: dict, base_dir: str, where: str) -> list:
    if "image" in line and "images" in line:
        raise ValueError(f"{where}: give `image` or `images`, not both")
    images = line.get("images") or ([] if line.get("image") is None else [line["image"]])
    return [resolve_image(image, base_dir, where) for image in images]


def line_responses(line: dict, where: str) -> list:
    if ("response" in line) == ("responses" in line):
        raise ValueError(f"{where}: give exactly one of `response` (one answer) or `responses` (a list to rerank)")
    if "response" in line:
        return [line["response"]]
    if not isinstance(line["responses"], list) or not line["responses"]:
        raise ValueError(f"{where}: `responses` must be a non-empty list")
    return line["responses"]


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


def main(args: ScoreFileArguments) -> list[dict]:
    input_file = Path(args.input)
    numbered = read_jsonl(input_file)
    lines = [line for _, line in numbered]
    items, spans = [], []
    for number, line in numbered:
        where = f"{args.input} line {number}"
        if "prompt" not in line:
            raise ValueError(f"{where}: missing `prompt`")
        images = line_images(line, str(input_file.parent), where)
        responses = line_responses(line, where)
        spans.append((len(items), len(responses)))
        items += [{"images": images, "prompt": line["prompt"], "response": response} for response in responses]

    scores = load_scorer(args).score(items, progress=True)

    for line, (start, count) in zip(lines, spans):
        line_scores = scores[start:start + count]
        if "response" in line:
            line["score"] = line_scores[0]
        else:
            best = max(range(count), key=line_scores.__getitem__)
            line.update(scores=line_scores, best_index=best, best=line["responses"][best])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return lines


if __name__ == "__main__":
    main(*TrlParser((ScoreFileArguments,)).parse_args_and_config())
