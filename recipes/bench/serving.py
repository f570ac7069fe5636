"""Reward server throughput: concurrent clients versus one request at a time, versus in-process scoring, in one run.

The workload is an RL step's: prompts with an image, a group of responses per prompt, one row per request (as
OpenRLHF and verl send them). The server (recipes/serve/server.py) runs in its own process on 127.0.0.1.

    python recipes/bench/serving.py --output recipes/bench/results/serving_cpu.md
    python recipes/bench/serving.py --model_name_or_path outputs/demo/stage2 --prompts 64 --clients 64
"""

import argparse
import base64
import io
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: heads/, collators/, recipes/
sys.path.insert(0, str(ROOT / "recipes" / "demo"))

import httpx
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoConfig

from heads import RewardScorer

RESPONSES = ["It is red.", "The shape is blue.", "Green, I think.", "There are three shapes in the picture."]


def tiny_reward_model(directory: Path) -> Path:
    """The demo's tiny Qwen2.5-VL with a random value head, in the release layout."""
    from tiny_model import save_tiny_model

    save_tiny_model("qwen2_5_vl", directory)
    hidden = AutoConfig.from_pretrained(directory).get_text_config().hidden_size
    generator = torch.Generator().manual_seed(0)
    save_file({"v_head.summary.weight": torch.randn(1, hidden, generator=generator),
               "v_head.summary.bias": torch.zeros(1)}, str(directory / "value_head.safetensors"))
    return directory


def workload(prompts: int, group: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The same rows twice: images as PIL images (in-process) and as data URLs (over HTTP)."""
    rng = random.Random(seed)
    rows, local = [], []
    for p in range(prompts):
        image = Image.frombytes("RGB", (112, 112), rng.randbytes(112 * 112 * 3))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        for r in range(group):
            row = {"prompt": f"Question {p}: what colour is the shape?", "response": RESPONSES[r % 4]}
            rows.append(dict(row, images=[url]))
            local.append(dict(row, images=[image]))
    return rows, local


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "recipes/serve/server.py"), "--model_name_or_path", model,
                                "--port", str(port), *extra], env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.25)
    process.terminate()
    raise RuntimeError("the server did not start")


def post_rows(client: httpx.Client, rows: list[dict]) -> list[float]:
    response = client.post("/score", json={"rows": rows})
    response.raise_for_status()
    return response.json()["rewards"]


def scorer_batches(url: str) -> int:
    lines = httpx.get(url + "/metrics").text.splitlines()
    return int(next(float(line.split()[1]) for line in lines if line.startswith("reward_server_batch_rows_count ")))


def sequential(url: str, rows: list[dict]) -> tuple[float, list[float]]:
    with httpx.Client(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        rewards = [post_rows(client, [row])[0] for row in rows]
        return time.perf_counter() - start, rewards


def concurrent(url: str, rows: list[dict], clients: int) -> tuple[float, list[float]]:
    rewards = [None] * len(rows)

    def worker(c: int):
        with httpx.Client(base_url=url, timeout=600) as client:
            for i in range(c, len(rows), clients):
                rewards[i] = post_rows(client, [rows[i]])[0]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return time.perf_counter() - start, rewards


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", help="a reward model; the demo's tiny model (random head) by default")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=4, help="responses per prompt")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output", help="markdown results file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model_name_or_path or str(tiny_reward_model(Path(tmp) / "tiny"))
        rows, local = workload(args.prompts, args.group)
        scorer = RewardScorer.from_pretrained(model, batch_size=args.batch_size)
        scorer.score(local[:args.group])  # warm-up
        start = time.perf_counter()
        expected = scorer.score(local)
        in_process_batched = time.perf_counter() - start
        start = time.perf_counter()
        for row in local:
            scorer.score([row])
        in_process_single = time.perf_counter() - start
        del scorer

        process, url = start_server(model, ["--batch_size", str(args.batch_size)])
        try:
            post_rows(httpx.Client(base_url=url, timeout=600), rows[:args.group])  # warm-up
            one_at_a_time, got_sequential = sequential(url, rows)
            batches_before = scorer_batches(url)
            under_load, got_concurrent = concurrent(url, rows, args.clients)
            batches = scorer_batches(url) - batches_before
        finally:
            process.terminate()
            process.wait(timeout=60)

    worst = max(abs(a - b) for got in (got_sequential, got_concurrent) for a, b in zip(got, expected))
    n = len(rows)
    table = [
        ("in-process, `RewardScorer.score` on all rows at once", in_process_batched),
        ("in-process, one row per call", in_process_single),
        ("server, one request at a time (1 row each)", one_at_a_time),
        (f"server, {args.clients} concurrent clients (1 row per request)", under_load),
    ]
    lines = [
        "# Reward server throughput (CPU)",
        "",
        "    " + " ".join(["python"] + sys.argv),
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads). Model: {args.model_name_or_path or 'the demo tiny Qwen2.5-VL (random head)'}. "
        f"{n} rows: {args.prompts} prompts with a 112x112 image, {args.group} responses each; scorer batch size "
        f"{args.batch_size}.",
        "",
        "| | seconds | rows/s |",
        "| --- | --- | --- |",
        *[f"| {name} | {seconds:.2f} | {n / seconds:.1f} |" for name, seconds in table],
        "",
        f"Concurrent load over one request at a time: {one_at_a_time / under_load:.2f}x. "
        f"Under load the server scored the {n} requests in {batches} batches ({n / batches:.1f} rows each). "
        f"Largest |server - in-process| reward: {worst:.1e}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
