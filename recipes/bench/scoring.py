"""Scoring throughput of a reward model: N responses to one prompt, one row per response vs one packed sequence.

    rows    one row per response, each carrying the prompt and the image (the vision tower runs N times)
    packed  prompt | response 1 | ... | response N in one sequence (collators/packed_pair_collator.py
            `pack_branches`, what RewardScorer does for responses that share a prompt): the vision tower runs once,
            the prompt is encoded once, each response sees the prompt and itself only

A step scores the N responses of one prompt (no gradients): the reward forward of ValueHeadRewardModel on a
Qwen2.5-VL-shaped model (recipes/bench/training.py's cpu config: text 512 x 4 layers, the real vocabulary; random
init and random token ids, so no download). The layouts run in turn, in a rotated order each round, and the median
step time is reported as rows/s (responses scored per second). Peak memory: the peak resident set (VmHWM) of a fresh
process per layout and N that builds the model and scores twice. Rendering and tokenizing are not timed (the same
for both layouts).

It also prints the speed-up that the work predicts at the Qwen2.5-VL-7B shape: the weight-matmul FLOPs of the
language model (2 x 6.53B per token; lm_head is never computed) plus the vision tower's (2 x 0.67B per patch,
4 patches per visual token) for N rows, divided by those of one packed sequence (attention scores not counted).

    make bench   # runs this too: python recipes/bench/scoring.py --threads 1 --output recipes/bench/results/scoring_cpu.md
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

import torch

from collators.packed_pair_collator import pack_branches
from recipes.bench.training import (
    CONFIGS, IMAGE, PAD, VISION_END, VISION_START, build_model, peak_rss_gb, vision_inputs,
)

LAYOUTS = ("rows", "packed")
NS = (2, 4, 8, 16)
# One prompt: an image of `grid` (t, h, w patches; 4 per visual token) or none, `prompt` text tokens, and N answers
# with lengths drawn from `answer`.
WORKLOADS = {
    "image-heavy": dict(grid=(1, 64, 64), prompt=80, answer=(100, 300)),  # 1024 visual tokens
    "text-heavy": dict(grid=None, prompt=1000, answer=(100, 300)),
}
LM_PARAMS_7B, VIT_PARAMS_7B = 6.53e9, 0.67e9  # Qwen2.5-VL-7B: 28 layers x 233M (lm_head and embeddings excluded)


def describe(workload: dict) -> str:
    image = f"an image of {workload['grid'][1] * workload['grid'][2] // 4} visual tokens, " if workload["grid"] else "no image, "
    return f"{image}{workload['prompt']} prompt text tokens, answers of {workload['answer'][0]}-{workload['answer'][1]} tokens"


def make_group(workload: dict, n: int, seed: int = 0) -> tuple[list[int], list[list[int]]]:
    generator = torch.Generator().manual_seed(seed)

    def text(length: int) -> list[int]:
        return torch.randint(0, PAD, (length,), generator=generator).tolist()

    prompt = text(workload["prompt"])
    if workload["grid"]:
        t, h, w = workload["grid"]
        prompt = prompt[:20] + [VISION_START] + [IMAGE] * (t * h * w // 4) + [VISION_END] + prompt[20:]
    low, high = workload["answer"]
    answers = [text(int(torch.randint(low, high + 1, (1,), generator=generator))) for _ in range(n)]
    return prompt, answers


def batches_for(setup: dict, workload: dict, n: int) -> dict:
    prompt, answers = make_group(workload, n)
    grids = torch.tensor([workload["grid"]]) if workload["grid"] else None
    rows = [prompt + answer for answer in answers]
    length = max(map(len, rows))
    input_ids = torch.tensor([row + [PAD] * (length - len(row)) for row in rows])
    plain = {"input_ids": input_ids,
             "attention_mask": torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows]),
             "mm_token_type_ids": (input_ids == IMAGE).long(), **vision_inputs(grids, setup["dtype"], repeat=n)}
    packed = {**pack_branches([(prompt, answers)], PAD, mrope=True, image_grids=grids, image_token_id=IMAGE),
              **vision_inputs(grids, setup["dtype"])}
    return {"rows": plain, "packed": packed, "tokens": {"prompt": len(prompt), "answers": sum(map(len, answers))}}


@torch.no_grad()
def score_step(model, batch: dict) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    rewards = model(**batch).logits
    return time.perf_counter() - start, rewards


def measure(setup: dict, workload: dict, n: int, rounds: int, model) -> dict:
    batches = batches_for(setup, workload, n)
    times = {layout: [] for layout in LAYOUTS}
    for round_ in range(rounds + 1):  # round 0 warms up, is not timed, and checks that both give the same rewards
        rewards = {}
        for layout in (LAYOUTS if round_ % 2 == 0 else LAYOUTS[::-1]):
            seconds, rewards[layout] = score_step(model, batches[layout])
            if round_:
                times[layout].append(seconds)
        if not round_:
            torch.testing.assert_close(rewards["packed"], rewards["rows"], atol=1e-3, rtol=0)
    results = {layout: {"step_s": statistics.median(times[layout]), "rows_per_s": n / statistics.median(times[layout])}
               for layout in LAYOUTS}
    results["tokens"] = batches["tokens"]
    return results


def predicted_speedup(workload: dict, tokens: dict, n: int) -> float:
    """Weight-matmul FLOPs of N rows over those of one packed sequence, at the 7B shape."""
    patches = workload["grid"][0] * workload["grid"][1] * workload["grid"][2] if workload["grid"] else 0
    prompt, answers = tokens["prompt"], tokens["answers"]
    rows = LM_PARAMS_7B * (n * prompt + answers) + VIT_PARAMS_7B * n * patches
    packed = LM_PARAMS_7B * (prompt + answers) + VIT_PARAMS_7B * patches
    return rows / packed


def memory_probe(setup: dict, workload: dict, n: int, layout: str):
    model = build_model(setup).eval()
    batch = batches_for(setup, workload, n)[layout]
    for _ in range(2):
        score_step(model, batch)
    print(json.dumps({"peak_gb": peak_rss_gb()}))


def peak_memory(args_list: list[str], workload: str, n: int) -> dict:
    peaks = {}
    for layout in LAYOUTS:
        command = [sys.executable, __file__, *args_list, "--memory_probe", workload, str(n), layout]
        peaks[layout] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True)
                                   .stdout.strip().splitlines()[-1])["peak_gb"]
    return peaks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed scoring steps per layout (after a warm-up round)")
    parser.add_argument("--ns", type=int, nargs="+", default=list(NS), help="responses per prompt")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--threads", type=int, help="CPU threads (1 stays fair when other processes share the cores)")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--output", help="also write the tables (markdown) here")
    parser.add_argument("--memory_probe", nargs=3, metavar=("WORKLOAD", "N", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = CONFIGS["cpu"]
    if args.memory_probe:
        workload, n, layout = args.memory_probe
        return memory_probe(setup, WORKLOADS[workload], int(n), layout)
    probe_args = ["--threads", str(args.threads)] if args.threads else []
    text, vision = setup["text"], setup["vision"]
    report = [f"## Reward-model scoring, N responses per prompt (CPU, {os.cpu_count()} cores, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__})", "",
              f"`python recipes/bench/scoring.py {' '.join(sys.argv[1:])}`", "",
              f"Qwen2.5-VL shape: text {text['hidden_size']} x {text['num_hidden_layers']} layers, vocab "
              f"{text['vocab_size']}; vision {vision['hidden_size']} x {vision['depth']} blocks. {setup['dtype']}, no "
              f"gradients, median of {args.rounds} interleaved steps per layout; one step scores the N responses of "
              "one prompt. Predicted at 7B: the ratio of weight-matmul FLOPs (see the script's docstring).", ""]
    load_at_start = os.getloadavg()[0]
    model = build_model(setup).eval()
    for name in args.workloads:
        workload = WORKLOADS[name]
        lines = [f"### {name}: {describe(workload)}", "",
                 "| N | rows: rows/s | packed: rows/s | packed vs rows | predicted at 7B | peak mem rows (GB) "
                 "| peak mem packed (GB) |", "|---|---|---|---|---|---|---|"]
        for n in args.ns:
            results = measure(setup, workload, n, args.rounds, model)
            peaks = {layout: None for layout in LAYOUTS} if args.no_memory else peak_memory(probe_args, name, n)
            memory = [f"{peaks[layout]:.2f}" if peaks[layout] is not None else "-" for layout in LAYOUTS]
            lines.append(f"| {n} | {results['rows']['rows_per_s']:.2f} | {results['packed']['rows_per_s']:.2f} | "
                         f"{results['packed']['rows_per_s'] / results['rows']['rows_per_s']:.2f}x | "
                         f"{predicted_speedup(workload, results['tokens'], n):.2f}x | {memory[0]} | {memory[1]} |")
            print(lines[-1], flush=True)
        report += lines + [""]
        print("\n".join(lines), flush=True)
    report.append(f"Load average (1 min, this run included) at the start: {load_at_start:.1f}, "
                  f"at the end: {os.getloadavg()[0]:.1f}.")
    print(report[-1])
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
