"""Memory and time of shared-prefix attention on CPU: one packed pair, forward + backward, at 2k to 32k tokens.

    dense   the packed pair under sdpa with the [B, 1, L, L] boolean mask (heads/packing.py, the reference)
    flex    the packed pair under --attn_implementation flex_attention: a FlexAttention BlockMask from the segment
            ids (heads/attention.py); on CPU, where torch's FlexAttention has no backward, it runs as the
            block-sparse sdpa loop, one checkpointed 128-token query block at a time
    rows    the pair as two plain rows (prompt + chosen, prompt + rejected) under sdpa, causal without a mask

The varlen path (flash-attn) is a GPU kernel; its layout's index tensors are listed in the mask column (computed,
not run). A pair of total length L is a prompt of L/2 tokens and two answers of L/4; the two rows hold 3L/2 tokens.

Model: Qwen2.5-VL's language model with a tiny width (hidden 64, 4 heads, 2 KV heads, 2 layers) and the real
151,936-token vocabulary, random init, random token ids, fp32, no images. Each implementation and length runs in a
fresh process (its peak resident set, VmHWM, is the memory column; the weights are the same in all) that builds the
model, warms up on a 256-token pair and times `--steps` forward + backward steps; the median step is reported. The mask
column is the bytes of the attention mask object each path builds (dense: the boolean L x L tensor; flex: the
BlockMask's block tables and the segment ids its mask_mod reads; varlen: the index and cu_seqlens tensors).

    make bench   # python recipes/bench/attention.py --threads 1 --output recipes/bench/results/attention_cpu.md
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from collators.packed_pair_collator import pack_pairs
from heads import ValueHeadRewardModel
from heads.attention import load_attention, shared_prefix_block_mask, varlen_layout
from recipes.bench.training import PAD, loss_of, mrope, peak_rss_gb, two_row_batch

IMPLEMENTATIONS = {"dense": "sdpa", "flex": "flex_attention", "rows": "sdpa"}
LENGTHS = (2048, 8192, 16384, 32768)
TEXT = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=65536, rope_parameters=mrope([2, 3, 3]))
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0])


def build_model(implementation: str) -> ValueHeadRewardModel:
    config = Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION)
    torch.manual_seed(0)
    base = Qwen2_5_VLForConditionalGeneration._from_config(
        config, dtype=torch.float32, attn_implementation=load_attention(IMPLEMENTATIONS[implementation], config))
    return ValueHeadRewardModel(base).train()


def make_pair(length: int) -> tuple[list[int], list[int], list[int]]:
    generator = torch.Generator().manual_seed(length)
    tokens = torch.randint(0, PAD, (length,), generator=generator).tolist()
    return tokens[:length // 2], tokens[length // 2:3 * length // 4], tokens[3 * length // 4:]


def batch_for(implementation: str, length: int) -> dict:
    pair = make_pair(length)
    if implementation == "rows":
        return two_row_batch([pair], None, torch.float32)
    return pack_pairs([pair], PAD, mrope=True)


def mask_bytes(length: int) -> dict[str, int]:
    segment_ids = pack_pairs([make_pair(length)], PAD, mrope=True)["segment_ids"]
    block_mask = shared_prefix_block_mask(segment_ids)
    flex = [block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices, segment_ids]
    layout = varlen_layout(segment_ids)
    varlen = [layout.query_index, layout.key_index, layout.cu_seqlens_q, layout.cu_seqlens_k]
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    return {"dense": length * length * torch.bool.itemsize, "flex": size(flex), "varlen": size(varlen), "rows": 0}


def step(model, batch: dict) -> float:
    start = time.perf_counter()
    loss_of(model, "packed", batch).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def probe(implementation: str, length: int, steps: int) -> None:
    """One fresh process: build, warm up, time `steps` steps, print the median and the peak RSS as JSON."""
    model = build_model(implementation)
    step(model, batch_for(implementation, 256))  # warm-up on a short pair: one-time costs, not the long step twice
    batch = batch_for(implementation, length)
    seconds = statistics.median(step(model, batch) for _ in range(steps))
    print(json.dumps({"step_s": seconds, "peak_gb": peak_rss_gb()}))


def run(implementation: str, length: int, args) -> dict:
    command = [sys.executable, __file__, "--threads", str(args.threads), "--steps", str(args.steps),
               "--probe", implementation, str(length)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return {"error": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict, masks: dict) -> list[str]:
    lines = ["| total tokens | " + " | ".join(f"{name}: s / step" for name in IMPLEMENTATIONS)
             + " | dense vs flex (time) | " + " | ".join(f"{name}: peak RSS (GB)" for name in IMPLEMENTATIONS)
             + " | mask dense (MB) | mask flex (MB) | mask varlen (MB) |",
             "|" + "---|" * (2 + 2 * len(IMPLEMENTATIONS) + 3)]
    for length, row in results.items():
        times = [f"{row[name]['step_s']:.2f}" if "error" not in row[name] else "failed" for name in IMPLEMENTATIONS]
        peaks = [f"{row[name]['peak_gb']:.2f}" if "error" not in row[name] else "failed" for name in IMPLEMENTATIONS]
        ratio = (f"{row['dense']['step_s'] / row['flex']['step_s']:.2f}x"
                 if "error" not in row["dense"] and "error" not in row["flex"] else "-")
        mask = [f"{masks[length][name] / 2**20:.3f}" for name in ("dense", "flex", "varlen")]
        lines.append(f"| {length:,} | " + " | ".join(times) + f" | {ratio} | " + " | ".join(peaks) + " | "
                     + " | ".join(mask) + " |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--steps", type=int, default=1, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", help="write the markdown table here")
    parser.add_argument("--probe", nargs=2, metavar=("IMPLEMENTATION", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        return probe(args.probe[0], int(args.probe[1]), args.steps)

    load_start = os.getloadavg()[0]
    results, masks = {}, {}
    for length in args.lengths:
        masks[length] = mask_bytes(length)
        results[length] = {name: run(name, length, args) for name in IMPLEMENTATIONS}
        print(f"{length}: {json.dumps(results[length])}", flush=True)
    command = "python recipes/bench/attention.py " + " ".join(sys.argv[1:])
    lines = [f"## Shared-prefix attention, one packed pair, forward + backward (CPU, {os.cpu_count()} cores, "
             f"{args.threads} torch threads, torch {torch.__version__}, {platform.machine()})", "",
             f"`{command}`", "",
             "Qwen2.5-VL language model, hidden 64 x 2 layers (4 heads, 2 KV heads), vocab 151,936, fp32; a pair is a "
             "prompt of L/2 tokens and two answers of L/4 (two rows: 3L/2 tokens). s / step: median of "
             f"{args.steps} step(s) after a short warm-up; peak RSS of a fresh process per cell (the same weights in each). "
             "Mask: bytes of the attention mask object each path builds (varlen: its index tensors; computed).", "",
             *table(results, masks), "",
             f"Load average (1 min, this run included) at the start: {load_start:.1f}, at the end: {os.getloadavg()[0]:.1f}."]
    print("\n".join(lines))
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
