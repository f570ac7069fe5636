"""Build the training sets of Skywork-VL Reward (paper §3.1) from the public preference datasets and your own jsonl.

Adapt every source to the one preference schema (recipes/data/adapters.py), then the paper's two stages:
  1. drop ties and unreadable verdicts, bad images, empty / identical / over-long pairs, exact duplicates across
     sources and near duplicates (all-MiniLM-L6-v2 prompt embeddings, same images);
  2. with --surrogate_model (a reward model trained on stage 1's output): score every pair, and regenerate the
     chosen answer of pairs with a low chosen reward or a small margin through an OpenAI-compatible endpoint;
     without an endpoint those pairs go to review.jsonl and the rest continue.
Writes to --output_dir: stage1.parquet (multimodal pairs) and stage2.parquet (multimodal + text) with images/
beside them, stage{1,2}_mixture.json (the stage recipes' dataset_mixture), report.json and review.jsonl.

    python recipes/data/build_mixture.py --config recipes/qwen2_5_vl_7b/data.yaml
    python recipes/data/build_mixture.py --config recipes/qwen2_5_vl_7b/data.yaml \
        --surrogate_model outputs/qwen2.5-vl-7b-reward/stage1 --regeneration_base_url https://api.openai.com/v1
"""

import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

import numpy as np
from datasets import Dataset, Features
from transformers import AutoProcessor
from trl import TrlParser

from collators import ConversationRenderer, PixelBudgetArguments
from recipes.data.cleaning import (
    ROW_FEATURES,
    ImageStore,
    apply_drops,
    clean_stage1,
    find_problems,
    format_report,
    ingest,
    minilm_encoder,
)
from recipes.data.regeneration import ChatClient, RegenerationError, chat_messages
from heads import RewardScorer

OUTPUT_COLUMNS = ("images", "prompt", "chosen", "rejected", "source")


@dataclass
class BuildMixtureArguments(PixelBudgetArguments):
    sources: dict | str | None = field(
        default=None,
        metadata={"help": 'Sources in priority order (the first wins duplicates), {path or hub id: adapter}, e.g. '
                  '{"openbmb/RLAIF-V-Dataset": "rlaif_v", "data/inhouse.jsonl": "preference"} (JSON on the CLI). '
                  "Adapters: llava_critic, rlaif_v, skywork_preference, mmpr (a folder with meta.json), preference."},
    )
    output_dir: str = field(default="data/mixture", metadata={"help": "Where the sets, images and report go."})
    processor: str = field(default="Qwen/Qwen2.5-VL-7B-Instruct",
                           metadata={"help": "The training model's processor: pair lengths are counted with it."})
    max_length: int | None = field(default=8192, metadata={"help": "Drop longer pairs; as in the stage configs."})
    min_image_side: int = field(default=28, metadata={"help": "Drop images with a shorter side (pixels)."})
    near_duplicate_threshold: float = field(
        default=0.95, metadata={"help": "Cosine similarity of prompts (same images) from which a pair is a near "
                                "duplicate of an earlier one; above 1 turns the check off."})
    embedding_device: str | None = field(default=None, metadata={"help": "Prompt embedder's device (cuda if any)."})
    split: str = field(default="train", metadata={"help": "Split of hub datasets."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes that adapt sources and check images."})
    surrogate_model: str | None = field(
        default=None, metadata={"help": "Stage 2: a reward model of ours that scores every pair. Without it the "
                                "sets are stage 1's output (train a surrogate on them, then rerun with it)."})
    surrogate_batch_size: int = field(default=8, metadata={"help": "Pairs' responses scored per forward."})
    low_chosen_reward: str = field(default="q0.05", metadata={
        "help": "Flag pairs whose chosen reward is below this: a value, or qP for the P quantile; =-inf flags none."})
    small_margin: str = field(default="q0.05", metadata={
        "help": "Flag pairs whose chosen - rejected reward is below this: a value or qP, as low_chosen_reward."})
    regeneration_base_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible endpoint (env OPENAI_BASE_URL) that rewrites flagged chosen answers."})
    regeneration_model: str | None = field(default=None, metadata={"help": "Model name (env OPENAI_MODEL; gpt-4o)."})
    regeneration_api_key: str | None = field(default=None, metadata={"help": "API key (env OPENAI_API_KEY)."})
    regeneration_concurrency: int = field(default=8, metadata={"help": "Requests in flight at once."})
    regeneration_retries: int = field(default=4, metadata={"help": "Retries on 429 / 5xx / network errors."})
    regeneration_backoff: float = field(default=2.0, metadata={"help": "Seconds before the first retry, then doubled."})
    regeneration_timeout: float = field(default=120.0, metadata={"help": "Seconds per request."})
    regeneration_max_tokens: int = field(default=2048, metadata={"help": "Longest regenerated answer, in tokens."})
    regeneration_cache: str | None = field(default=None, metadata={
        "help": "Answers by request hash, so a rerun never pays twice (default: output_dir/regeneration_cache)."})

    def __post_init__(self):
        if isinstance(self.sources, str):
            self.sources = json.loads(self.sources)
        if not self.sources:
            raise ValueError('no source given: set sources, e.g. {"openbmb/RLAIF-V-Dataset": "rlaif_v"}')
        self.regeneration_base_url = self.regeneration_base_url or os.environ.get("OPENAI_BASE_URL")
        self.regeneration_model = self.regeneration_model or os.environ.get("OPENAI_MODEL", "gpt-4o")
        self.regeneration_api_key = self.regeneration_api_key or os.environ.get("OPENAI_API_KEY")
        self.regeneration_cache = self.regeneration_cache or str(Path(self.output_dir) / "regeneration_cache")


def threshold(spec: str, values: np.ndarray) -> float:
    """'q0.05' is the 5% quantile of `values`; anything else is a number."""
    return float(np.quantile(values, float(spec[1:]))) if spec.startswith("q") else float(spec)


def refine(rows: list[dict], args, renderer, report: dict, out: Path) -> tuple[list[dict], list[dict]]:
    """Stage 2: the surrogate scores both responses of every pair; pairs with a low chosen reward or a small margin
    get their chosen answer regenerated, or go to review. Returns (kept rows, review rows)."""
    started = time.perf_counter()
    scorer = RewardScorer.from_pretrained(args.surrogate_model, batch_size=args.surrogate_batch_size,
                                          min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    items = [{"images": [str(out / p) for p in row["images"]], "prompt": row["prompt"], "response": row[side]}
             for side in ("chosen", "rejected") for row in rows]
    rewards = np.array(scorer.score(items, progress=True)).reshape(2, len(rows))
    del scorer
    chosen, margin = rewards[0], rewards[0] - rewards[1]
    low, small = threshold(args.low_chosen_reward, chosen), threshold(args.small_margin, margin)
    flagged = [i for i in range(len(rows)) if chosen[i] < low or margin[i] < small]
    why = {i: ("low_chosen_reward" if chosen[i] < low else "small_margin",
               f"chosen reward {chosen[i]:.3f} (flagged below {low:.3f}), margin {margin[i]:.3f} (flagged below "
               f"{small:.3f})") for i in flagged}

    problems, refined, regenerated = [None] * len(rows), list(rows), []
    if args.regeneration_base_url:
        client = ChatClient(args.regeneration_base_url, args.regeneration_model, args.regeneration_api_key,
                            args.regeneration_cache, args.regeneration_concurrency, args.regeneration_retries,
                            args.regeneration_timeout, args.regeneration_max_tokens, backoff=args.regeneration_backoff)
        conversations = [chat_messages(rows[i]["prompt"], [str(out / p) for p in rows[i]["images"]]) for i in flagged]
        for i, answer in zip(flagged, client.complete_all(conversations)):
            if isinstance(answer, RegenerationError):
                problems[i] = "regeneration_failed", f"{why[i][1]}; {answer}"
            else:
                refined[i] = dict(rows[i], chosen=answer)
                regenerated.append(i)
        # A new answer passes the checks of every pair: it may be too long, or the rejected one again.
        for i, problem in zip(regenerated, find_problems([refined[i] for i in regenerated], renderer, args.max_length)):
            problems[i] = problem
    else:
        for i in flagged:
            problems[i] = why[i][0], f"{why[i][1]}; no regeneration endpoint"

    review = [dict({k: rows[i][k] for k in OUTPUT_COLUMNS}, chosen_reward=float(chosen[i]),
                   rejected_reward=float(rewards[1][i]), reason=problem[0], detail=problem[1],
                   regenerated_chosen=refined[i]["chosen"] if refined[i] is not rows[i] else None)
              for i, problem in enumerate(problems) if problem is not None]
    kept = apply_drops(report, "refine", refined, problems, time.perf_counter() - started)
    report["steps"]["refine"].update(
        thresholds={"low_chosen_reward": low, "small_margin": small}, flagged=len(flagged),
        regenerated=sum(problems[i] is None for i in regenerated),
    )
    return kept, review


def write_sets(rows: list[dict], out: Path) -> dict:
    """Stage 1 trains on the multimodal pairs, stage 2 on all: a parquet file each, next to images/, and a mixture
    file holding the stage recipes' dataset_mixture (paths as given in --output_dir)."""
    features = Features({name: ROW_FEATURES[name] for name in OUTPUT_COLUMNS})
    outputs = {}
    for stage, subset in (("stage1", [row for row in rows if row["images"]]), ("stage2", rows)):
        path, mixture = out / f"{stage}.parquet", out / f"{stage}_mixture.json"
        columns = {name: [row[name] for row in subset] for name in OUTPUT_COLUMNS}  # from_list fails when empty
        Dataset.from_dict(columns, features=features).to_parquet(path)
        mixture.write_text(json.dumps({str(path): 1.0}) + "\n")
        outputs[stage] = {"path": str(path), "mixture": str(mixture), "pairs": len(subset),
                          "with_images": sum(bool(row["images"]) for row in subset),
                          "sources": dict(Counter(row["source"] for row in subset))}
    return outputs


def remove_unused_images(out: Path, rows: list[dict]) -> int:
    """Images of dropped pairs were stored while adapting; only those the sets or the review file use stay."""
    used = {out / path for row in rows for path in row["images"]}
    unused = [path for path in (out / "images").glob("*/*") if path not in used]
    for path in unused:
        path.unlink()
    return len(unused)


def main(args: BuildMixtureArguments) -> dict:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    renderer = ConversationRenderer(AutoProcessor.from_pretrained(args.processor), args.min_pixels, args.max_pixels)
    arguments = {k: v for k, v in asdict(args).items() if k != "regeneration_api_key"}
    report = {"arguments": arguments, "steps": {}}

    # Every source in the one preference schema; images stored once, by content, under output_dir/images.
    started = time.perf_counter()
    store = ImageStore(out, args.min_image_side)
    rows = [row for path, adapter in args.sources.items()
            for row in ingest(path, adapter, store, args.split, args.num_proc)]
    report["adapt_seconds"] = round(time.perf_counter() - started, 2)

    # Stage 1: ties and unusable pairs, then exact and near duplicates across sources.
    rows = clean_stage1(rows, report, renderer, args.max_length, minilm_encoder(args.embedding_device),
                        args.near_duplicate_threshold)

    # Stage 2: the surrogate reward model's scores decide which chosen answers are regenerated or reviewed.
    review = []
    if args.surrogate_model and rows:
        rows, review = refine(rows, args, renderer, report, out)
    with (out / "review.jsonl").open("w") as f:  # rewritten every run: it never lists an earlier run's pairs
        f.writelines(json.dumps(row) + "\n" for row in review)

    report["outputs"] = write_sets(rows, out)
    report["unused_images_removed"] = remove_unused_images(out, rows + review)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    for stage, output in report["outputs"].items():
        print(f"{stage}: {output['pairs']} pairs ({output['with_images']} with images) -> {output['path']}, "
              f"dataset_mixture in {output['mixture']}")
    return report


if __name__ == "__main__":
    main(*TrlParser((BuildMixtureArguments,)).parse_args_and_config())
