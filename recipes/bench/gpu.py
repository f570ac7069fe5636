"""Shared-prefix attention on one GPU: Qwen2.5-VL-7B, bf16, forward + backward of one preference pair.

    rows     the pair as two plain rows (prompt + chosen, prompt + rejected) with flash attention (flash-attn; sdpa,
             and the table says so, where flash-attn is not installed)
    dense    one packed sequence under sdpa with the [1, 1, L, L] boolean mask (heads/packing.py, the reference)
    varlen   one packed sequence under --attn_implementation flash_attention_2: flash_attn_varlen_func with the
             prompt once in the queries and once per answer in the keys (heads/attention.py; needs flash-attn)
    flex     one packed sequence under --attn_implementation flex_attention: torch's compiled FlexAttention kernel
             with a BlockMask built from the segment ids

The model is the Qwen2.5-VL-7B architecture (the config values in recipes/bench/training.py: TEXT_7B, VISION_7B) at
random initialisation, so nothing is downloaded; the recipe's freezing (vision tower frozen), gradient
checkpointing, random token ids. Shapes are flash-preference's prefix / response tokens (1024/64, 4096/512,
16384/64) and an image-heavy pair (an image of 1,000 visual tokens + 64 text tokens, answers of 256). Each cell: one
untimed step, then the median of `--steps` steps; peak memory is torch.cuda.max_memory_allocated over the timed
steps. Each packed implementation's rewards are compared with the rows' (bf16, so ~1e-2 apart is rounding).
The implementations of a shape run in turn on the same weights (the attention implementation is switched with
set_attn_implementation). No cell starts after `--time_budget_s` (420 s; those left are marked skipped), so a run
stays under 8 minutes on one 80 GB GPU. It has not been run on a GPU yet.

    make bench-gpu   # python recipes/bench/gpu.py --output recipes/bench/results/gpu.md
    python recipes/bench/gpu.py --tiny --device cpu --output /tmp/gpu.md   # the same code path, tiny, on CPU
"""

import argparse
import importlib.metadata
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from heads import RewardModelArguments, ValueHeadRewardModel, apply_freezing
from heads.attention import LANGUAGE_MODEL_ATTENTION, load_attention
from recipes.bench.training import (
    IMAGE, PAD, TEXT_7B, VISION_7B, VISION_END, VISION_START, mrope, packed_batch, sync, two_row_batch,
)

IMPLEMENTATIONS = ("rows", "dense", "varlen", "flex")
# prefix text tokens, response tokens, image patch grid (t, h, w; 4 patches per visual token) or None
SHAPES = {
    "1024/64": dict(prefix=1024, response=64, grid=None),
    "4096/512": dict(prefix=4096, response=512, grid=None),
    "16384/64": dict(prefix=16384, response=64, grid=None),
    "image 1000 + 64/256": dict(prefix=64, response=256, grid=(1, 40, 100)),  # 1,000 visual tokens
}
TINY_SHAPES = {
    "64/8": dict(prefix=64, response=8, grid=None),
    "128/32": dict(prefix=128, response=32, grid=None),
    "300/8": dict(prefix=300, response=8, grid=None),  # crosses FlexAttention's 128-token blocks
    "image 16 + 8/16": dict(prefix=8, response=16, grid=(1, 8, 8)),
}
TINY_TEXT = dict(TEXT_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_parameters=mrope([2, 3, 3]))
TINY_VISION = dict(VISION_7B, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   fullatt_block_indexes=[1])


def attention_for(implementation: str, device: str) -> tuple[str | None, str]:
    """(--attn_implementation to load, or None when it cannot run here; what the table says about it)."""
    flash = importlib.util.find_spec("flash_attn") is not None and device == "cuda"
    if implementation == "rows":
        return ("flash_attention_2", "flash-attn") if flash else ("sdpa", "sdpa (flash-attn not installed)")
    if implementation == "dense":
        return "sdpa", "sdpa, dense L x L mask"
    if implementation == "flex":
        return "flex_attention", "FlexAttention BlockMask" + (" (CPU: block-sparse sdpa loop)" if device == "cpu" else "")
    if device == "cpu":
        return "shared_prefix_varlen", "varlen, torch reference kernel (CPU)"
    return ("flash_attention_2", "flash_attn_varlen_func") if flash else (None, "not run: flash-attn not installed")


def build_model(tiny: bool, device: str, dtype: torch.dtype) -> ValueHeadRewardModel:
    config = Qwen2_5_VLConfig(text_config=TINY_TEXT if tiny else TEXT_7B, vision_config=TINY_VISION if tiny else VISION_7B,
                              image_token_id=IMAGE, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    torch.manual_seed(0)
    with torch.device(device):
        base = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = ValueHeadRewardModel(base).to(device).train()
    apply_freezing(model, RewardModelArguments())
    model.activation_checkpointing_enable({"use_reentrant": False})
    return model


def make_pair(shape: dict, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, PAD, (n,), generator=generator).tolist()  # noqa: E731
    prompt, grids = text(20), None
    if shape["grid"]:
        t, h, w = shape["grid"]
        prompt += [VISION_START] + [IMAGE] * (t * h * w // 4) + [VISION_END]
        grids = torch.tensor([shape["grid"]])
    prompt += text(shape["prefix"] - len(prompt) if not shape["grid"] else shape["prefix"])
    return [(prompt, text(shape["response"]), text(shape["response"]))], grids


def step(model, batch: dict, device: str) -> tuple[float, torch.Tensor]:
    sync(device)
    start = time.perf_counter()
    rewards = model(**batch).logits.squeeze(-1)
    chosen, rejected = rewards.chunk(2)
    (-torch.nn.functional.logsigmoid(chosen - rejected).mean()).backward()
    model.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start, rewards.detach().float().cpu()


def measure(model, implementation: str, shape: dict, args, dtype) -> dict:
    attention, kernel = attention_for(implementation, args.device)
    if attention is None:
        return {"kernel": kernel}
    model.pretrained_model.set_attn_implementation(load_attention(attention, model.config))
    running = model.config.get_text_config()._attn_implementation
    if running != LANGUAGE_MODEL_ATTENTION.get(attention, attention):
        raise RuntimeError(f"{implementation}: the language model runs {running}, not {attention}")
    pairs, grids = make_pair(shape)
    batch = two_row_batch(pairs, grids, dtype) if implementation == "rows" else packed_batch(pairs, grids, dtype)
    batch = {key: value.to(args.device) for key, value in batch.items()}
    try:
        _, rewards = step(model, batch, args.device)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = statistics.median(step(model, batch, args.device)[0] for _ in range(args.steps))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"kernel": kernel + ", out of memory"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    return {"kernel": kernel, "pairs_per_s": 1 / seconds, "peak_gb": peak, "rewards": rewards}


def versions() -> str:
    names = ("torch", "transformers", "flash-attn")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def report(results: dict, args, dtype, seconds: float) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.machine()})"
    lines = [f"## Shared-prefix attention, Qwen2.5-VL-7B{' (tiny widths)' if args.tiny else ''}, one pair, "
             f"forward + backward ({device}, {str(dtype).removeprefix('torch.')})", "",
             f"`python recipes/bench/gpu.py {' '.join(sys.argv[1:])}`", "",
             versions() + f"; median of {args.steps} steps after one untimed, no cell started after "
             f"{args.time_budget_s:.0f} s; random init; {seconds:.0f} s in all.", "",
             "| prefix/response tokens | implementation | attention | pairs/s | vs rows | peak memory (GB) | "
             "max abs reward difference vs rows |", "|---|---|---|---|---|---|---|"]
    for name, cells in results.items():
        rows = cells.get("rows", {})
        for implementation, cell in cells.items():
            if "pairs_per_s" not in cell:
                lines.append(f"| {name} | {implementation} | {cell['kernel']} | - | - | - | - |")
                continue
            ratio = f"{cell['pairs_per_s'] / rows['pairs_per_s']:.2f}x" if "pairs_per_s" in rows else "-"
            peak = f"{cell['peak_gb']:.1f}" if cell["peak_gb"] is not None else "-"
            difference = (f"{(cell['rewards'] - rows['rewards']).abs().max():.2e}"
                          if implementation != "rows" and "rewards" in rows else "-")
            lines.append(f"| {name} | {implementation} | {cell['kernel']} | {cell['pairs_per_s']:.3f} | {ratio} | "
                         f"{peak} | {difference} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny widths and shapes: the same code path, anywhere")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per cell, after one untimed step")
    parser.add_argument("--time_budget_s", type=float, default=420, help="cells starting later are skipped")
    parser.add_argument("--output", help="write the markdown table here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no GPU here: run on a GPU machine, or check the code path with --tiny --device cpu")
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    start = time.perf_counter()
    model = build_model(args.tiny, args.device, dtype)
    results = {}
    for name, shape in (TINY_SHAPES if args.tiny else SHAPES).items():
        results[name] = {}
        for implementation in IMPLEMENTATIONS:
            if time.perf_counter() - start > args.time_budget_s:
                results[name][implementation] = {"kernel": f"skipped: past --time_budget_s {args.time_budget_s:.0f}"}
                continue
            results[name][implementation] = measure(model, implementation, shape, args, dtype)
            print(name, implementation, {k: v for k, v in results[name][implementation].items() if k != "rewards"},
                  flush=True)
    text = report(results, args, dtype, time.perf_counter() - start)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
