"""Training throughput of a value-head reward model, three ways, on the same pairs and the same weights.

    naive   what peers run (LLaMA-Factory, TRL's former AutoModelForCausalLMWithValueHead): two rows per pair,
            each carrying the image; the full *ForConditionalGeneration forward with output_hidden_states, the
            vocabulary logits computed and upcast to fp32, the value head on the last hidden states.
    plain   ValueHeadRewardModel on the two-row batch (PairCollator's layout): the backbone only, no logits.
    packed  ValueHeadRewardModel on one sequence per pair (PackedPairCollator's layout): the prompt and the
            image once, the rejected answer masked from the chosen one.

A step is forward + backward + AdamW step with the recipe's freezing (vision tower frozen; projector, language
model and value head trained). Random init and random token ids (image tokens placed as the processor places
them), so no download is needed. The three run in turn, in a rotated order each round, and the median step
time is reported. pairs/s counts preference pairs; tokens/s counts the non-pad tokens each layout feeds (a
packed pair feeds its prompt once, so it feeds fewer tokens per pair).

Peak memory: on GPU torch.cuda.max_memory_allocated per step; on CPU the peak resident set of a fresh subprocess
per configuration that builds the model and runs two steps (VmHWM of /proc/self/status: the high-water mark behind
resource's ru_maxrss, which would report the parent's peak, as ru_maxrss survives fork + exec). It includes the
weights, the gradients and the AdamW state, which are the same for all three. MFU (gpu config): FLOPs counted by
torch.utils.flop_counter.FlopCounterMode over one forward + backward of that configuration, i.e. the matmuls and
attention kernels it executes (masked attention counted over its full L x L; gradient-checkpoint recompute
included; elementwise ops and the optimizer not counted), divided by the median step time and the peak dense
bf16 rate (--peak_tflops, 989 for H100/H200 SXM). Packing executes fewer FLOPs per pair, so compare pairs/s.

    make bench        # python recipes/bench/training.py --config cpu --threads 1 --output recipes/bench/results/bench_cpu.md
    python recipes/bench/training.py --config gpu --output recipes/bench/results/bench_gpu.md
    python recipes/bench/training.py --config gpu --dry_run      # the gpu code path with tiny shapes, on CPU
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from collators.packed_pair_collator import pack_pairs
from heads import RewardModelArguments, ValueHeadRewardModel, apply_freezing
from heads.value_head import last_token_index

LAYOUTS = ("naive", "plain", "packed")
# Qwen2.5-VL's special token ids; random text ids are drawn below them.
PAD, IMAGE, VISION_START, VISION_END = 151643, 151655, 151652, 151653


def mrope(section: list[int]) -> dict:
    return {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}


VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                 fullatt_block_indexes=[7, 15, 23, 31])
TEXT_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, rope_parameters=mrope([16, 24, 24]))
CONFIGS = {
    # A small Qwen2.5-VL shape with the real vocabulary, so the naive baseline's logits cost what they cost.
    "cpu": dict(
        text=dict(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, rope_parameters=mrope([8, 12, 12])),
        vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=512,
                    fullatt_block_indexes=[1]),
        device="cpu", dtype=torch.float32, pairs_per_step=2, gradient_checkpointing=False,
    ),
    "gpu": dict(text=TEXT_7B, vision=VISION_7B, device="cuda", dtype=torch.bfloat16, pairs_per_step=2,
                gradient_checkpointing=True),
    # The gpu code path (bf16, checkpointing, FLOP counting) with tiny widths, to check it runs anywhere.
    "dry_run": dict(
        text=dict(TEXT_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_parameters=mrope([2, 3, 3])),
        vision=dict(VISION_7B, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    fullatt_block_indexes=[1]),
        device="cpu", dtype=torch.bfloat16, pairs_per_step=2, gradient_checkpointing=True,
    ),
}
# Per pair: an image of one of `grids` (t, h, w patches; 4 patches per visual token), 20 + `prompt` text tokens,
# and two answers with lengths drawn from `answer`.
WORKLOADS = {
    "image-heavy": dict(grids=[(1, 56, 72), (1, 64, 64)], prompt=60, answer=(100, 300)),  # 1008 and 1024 visual tokens
    "text-heavy": dict(grids=[], prompt=200, answer=(600, 1200)),
}
DRY_WORKLOADS = {
    "image-heavy": dict(grids=[(1, 8, 12), (1, 8, 8)], prompt=10, answer=(5, 20)),
    "text-heavy": dict(grids=[], prompt=10, answer=(20, 40)),
}


def describe(workload: dict) -> str:
    images = " or ".join(str(t * h * w // 4) for t, h, w in workload["grids"])
    low, high = workload["answer"]
    return (f"{'an image of ' + images + ' visual tokens' if images else 'no image'}, {20 + workload['prompt']} prompt "
            f"text tokens, answers of {low}-{high} tokens")


def build_model(setup: dict) -> ValueHeadRewardModel:
    config = Qwen2_5_VLConfig(text_config=setup["text"], vision_config=setup["vision"], image_token_id=IMAGE,
                              vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    torch.manual_seed(0)
    with torch.device(setup["device"]):
        base = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=setup["dtype"], attn_implementation="sdpa")
    model = ValueHeadRewardModel(base).to(setup["device"]).train()
    apply_freezing(model, RewardModelArguments())
    if setup["gradient_checkpointing"]:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model


def make_pairs(workload: dict, n: int, seed: int = 0) -> tuple[list, torch.Tensor | None]:
    """n pairs of (prompt, chosen, rejected) token ids; an image (its grid cycled from the workload) per pair."""
    rng = random.Random(seed)

    def text(length: int) -> list[int]:
        return [rng.randrange(PAD) for _ in range(length)]

    pairs, grids = [], []
    for i in range(n):
        prompt = text(20)
        if workload["grids"]:
            grid = workload["grids"][i % len(workload["grids"])]
            grids.append(grid)
            prompt += [VISION_START] + [IMAGE] * (grid[0] * grid[1] * grid[2] // 4) + [VISION_END]
        prompt += text(workload["prompt"])
        pairs.append((prompt, text(rng.randint(*workload["answer"])), text(rng.randint(*workload["answer"]))))
    return pairs, torch.tensor(grids) if grids else None


def vision_inputs(grids: torch.Tensor | None, dtype, repeat: int = 1) -> dict:
    if grids is None:
        return {}
    patches = int(grids.prod(-1).sum())
    pixel_values = torch.randn(patches, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0)).to(dtype)
    return {"pixel_values": pixel_values.repeat(repeat, 1), "image_grid_thw": grids.repeat(repeat, 1)}


def two_row_batch(pairs: list, grids, dtype) -> dict:
    """PairCollator's layout: the chosen rows, then the rejected rows, each with its pair's image."""
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    length = max(map(len, rows))
    input_ids = torch.tensor([row + [PAD] * (length - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": (input_ids == IMAGE).long(),
            **vision_inputs(grids, dtype, repeat=2)}


def packed_batch(pairs: list, grids, dtype) -> dict:
    return {**pack_pairs(pairs, PAD, mrope=True, image_grids=grids, image_token_id=IMAGE, merge_size=2),
            **vision_inputs(grids, dtype)}


def naive_rewards(model: ValueHeadRewardModel, batch: dict) -> torch.Tensor:
    """The peers' forward: all hidden states and the full vocabulary logits in fp32, one value per token."""
    outputs = model.pretrained_model(**batch, output_hidden_states=True, use_cache=False)
    outputs.logits.float()  # computed and upcast, as TRL's value-head class did, then thrown away
    values = model.v_head(outputs.hidden_states[-1])
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, last_token_index(batch["attention_mask"])]


def loss_of(model, layout: str, batch: dict) -> torch.Tensor:
    rewards = naive_rewards(model, batch) if layout == "naive" else model(**batch).logits.squeeze(-1)
    chosen, rejected = rewards.chunk(2)
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean()


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_rss_gb() -> float:
    """This process's peak resident set so far (VmHWM of /proc/self/status), in GiB."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 2**20


def train_step(model, optimizer, layout: str, batch: dict, device: str) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one step."""
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    loss_of(model, layout, batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def batches_for(setup: dict, workload: dict) -> dict:
    pairs, grids = make_pairs(workload, setup["pairs_per_step"])
    two_rows = two_row_batch(pairs, grids, setup["dtype"])
    batches = {"naive": two_rows, "plain": two_rows, "packed": packed_batch(pairs, grids, setup["dtype"])}
    return {layout: {k: v.to(setup["device"]) for k, v in batch.items()} for layout, batch in batches.items()}


def make_optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-6, fused=True)  # the Trainer's default (adamw_torch_fused)


def count_flops(model, layout: str, batch: dict) -> int:
    with FlopCounterMode(display=False) as counter:
        loss_of(model, layout, batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(setup: dict, workload: dict, rounds: int, with_flops: bool) -> dict:
    model = build_model(setup)
    optimizer = make_optimizer(model)
    batches = batches_for(setup, workload)
    times = {layout: [] for layout in LAYOUTS}
    cpu_times = {layout: [] for layout in LAYOUTS}
    peaks = {layout: 0 for layout in LAYOUTS}
    for round_ in range(rounds + 1):  # round 0 warms up (allocator, AdamW state) and is not timed
        order = LAYOUTS[round_ % 3:] + LAYOUTS[:round_ % 3]
        for layout in order:
            if setup["device"] == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds, cpu_seconds = train_step(model, optimizer, layout, batches[layout], setup["device"])
            if round_:
                times[layout].append(seconds)
                cpu_times[layout].append(cpu_seconds)
            if setup["device"] == "cuda":
                peaks[layout] = max(peaks[layout], torch.cuda.max_memory_allocated())
    results = {}
    for layout in LAYOUTS:
        step = statistics.median(times[layout])
        batch = batches[layout]
        results[layout] = {
            "step_s": step,
            "cpu_s": statistics.median(cpu_times[layout]),
            "pairs_per_s": setup["pairs_per_step"] / step,
            "tokens_per_s": int(batch["attention_mask"].sum()) / step,
            "peak_gb": peaks[layout] / 2**30 if setup["device"] == "cuda" else None,
        }
        if with_flops:
            results[layout]["flops"] = count_flops(model, layout, batch)
    return results


def cpu_peak_memory(config_args: list[str], workload: str) -> dict:
    """Peak RSS (GB) of a fresh process per layout that builds the model and runs two steps."""
    peaks = {}
    for layout in LAYOUTS:
        command = [sys.executable, __file__, *config_args, "--memory_probe", workload, layout]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        peaks[layout] = json.loads(output.strip().splitlines()[-1])["peak_gb"]
    return peaks


def memory_probe(setup: dict, workload: dict, layout: str):
    model = build_model(setup)
    optimizer = make_optimizer(model)
    batch = batches_for(setup, workload)[layout]
    for _ in range(2):
        train_step(model, optimizer, layout, batch, setup["device"])
    print(json.dumps({"peak_gb": peak_rss_gb()}))


def table(name: str, results: dict, peak_tflops: float | None, cpu: bool) -> str:
    naive, plain = results["naive"]["pairs_per_s"], results["plain"]["pairs_per_s"]
    columns = {
        "step (s)": lambda r: f"{r['step_s']:.2f}",
        # One thread's CPU seconds do not grow when other processes share the cores, wall-clock seconds do.
        **({"CPU time (s)": lambda r: f"{r['cpu_s']:.2f}"} if cpu else {}),
        "pairs/s": lambda r: f"{r['pairs_per_s']:.3f}",
        "tokens/s": lambda r: f"{r['tokens_per_s']:.0f}",
        "peak mem (GB)": lambda r: f"{r['peak_gb']:.2f}",
        "pairs/s vs naive": lambda r: f"{r['pairs_per_s'] / naive:.2f}x",
        "pairs/s vs plain": lambda r: f"{r['pairs_per_s'] / plain:.2f}x",
        **({"TFLOP/step": lambda r: f"{r['flops'] / 1e12:.2f}",
            "MFU": lambda r: f"{100 * r['flops'] / r['step_s'] / (peak_tflops * 1e12):.1f}%"} if peak_tflops else {}),
    }
    lines = [f"### {name}", "", "| layout | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for layout, r in results.items():
        lines.append(f"| {layout} | " + " | ".join(cell(r) for cell in columns.values()) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dry_run", action="store_true", help="the config's code path with tiny shapes on CPU")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per layout (after one warm-up round)")
    parser.add_argument("--pairs_per_step", type=int, help="override the config's (cpu 2, gpu 2)")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the GPU, for MFU")
    parser.add_argument("--threads", type=int, help="CPU threads (torch's default: all cores); 1 stays fair when "
                        "other processes share the cores, where OpenMP threads wait on each other")
    parser.add_argument("--output", help="also write the tables (markdown) here")
    parser.add_argument("--memory_probe", nargs=2, metavar=("WORKLOAD", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    config = "dry_run" if args.dry_run else args.config
    setup, workloads = CONFIGS[config], DRY_WORKLOADS if args.dry_run else WORKLOADS
    setup = dict(setup, pairs_per_step=args.pairs_per_step or setup["pairs_per_step"])
    if args.memory_probe:
        return memory_probe(setup, workloads[args.memory_probe[0]], args.memory_probe[1])
    device = (torch.cuda.get_device_name() if setup["device"] == "cuda"
              else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    text, vision = setup["text"], setup["vision"]
    peak_tflops = args.peak_tflops if args.config == "gpu" else None
    command = "python recipes/bench/training.py " + " ".join(sys.argv[1:])
    report = [f"## Reward-model training step, {config} config ({device}, torch {torch.__version__})", "",
              f"`{command}`", "",
              f"Qwen2.5-VL shape: text {text['hidden_size']} x {text['num_hidden_layers']} layers, "
              f"vocab {text['vocab_size']}; vision {vision['hidden_size']} x {vision['depth']} blocks (frozen). "
              f"{setup['pairs_per_step']} pairs per step, {setup['dtype']}, "
              f"median of {args.rounds} interleaved steps per layout."
              + (" Peak memory: peak RSS of a fresh process per layout." if setup["device"] == "cpu" else ""), ""]
    load_at_start = os.getloadavg()[0]
    for name in args.workloads:
        results = measure(setup, workloads[name], args.rounds, with_flops=peak_tflops is not None)
        if setup["device"] == "cpu":
            for layout, peak in cpu_peak_memory(sys.argv[1:], name).items():
                results[layout]["peak_gb"] = peak
        title = f"{name}: {describe(workloads[name])}"
        report += [table(title, results, peak_tflops, cpu=setup["device"] == "cpu"), ""]
        print("\n".join(report[-2:]), flush=True)
    if setup["device"] == "cpu":  # other processes on the machine slow every layout; say how busy it was
        report.append(f"Load average (1 min, this run included) at the start: {load_at_start:.1f}, "
                      f"at the end: {os.getloadavg()[0]:.1f}.")
        print(report[-1])
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text("\n".join(report))


if __name__ == "__main__":
    main()
