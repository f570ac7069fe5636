"""Reward models in the release layout, a real server on 127.0.0.1 and a tiny GRPO run, shared by the serving and RL
tests."""

import dataclasses
import random
import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
)
from trl import GRPOConfig, GRPOTrainer


def write_reward_model(base: Path, out: Path, seed: int = 0) -> Path:
    """The base checkpoint's own save_pretrained plus a random value_head.safetensors (the release layout)."""
    config = AutoConfig.from_pretrained(base)
    vision = hasattr(config, "vision_config")
    model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_pretrained(base)
    model.save_pretrained(out)
    (AutoProcessor if vision else AutoTokenizer).from_pretrained(base).save_pretrained(out)
    generator = torch.Generator().manual_seed(seed)
    hidden = config.get_text_config().hidden_size
    head = {"v_head.summary.weight": torch.randn(1, hidden, generator=generator) / hidden**0.5,
            "v_head.summary.bias": torch.randn(1, generator=generator)}
    save_file(head, str(out / "value_head.safetensors"), metadata={"format": "pt"})
    return out


def train_grpo(policy_dir: Path, reward, dataset, output_dir: Path) -> GRPOTrainer:
    """Two steps of TRL's GRPOTrainer on the tiny Qwen2.5-VL policy in fp32 on CPU: 4 rows a step, two completions
    per prompt, each of at most 6 tokens."""
    policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(policy_dir, dtype=torch.float32)
    config = GRPOConfig(output_dir=str(output_dir), per_device_train_batch_size=4, num_generations=2,
                        max_completion_length=6, max_steps=2, learning_rate=1e-5, use_cpu=True, bf16=False,
                        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=AutoProcessor.from_pretrained(policy_dir))
    trainer.train()
    return trainer


def noise(width: int, height: int, seed: int) -> Image.Image:
    """Random pixels: no two images score alike by chance, and any resampling shows (a plain colour would hide it)."""
    return Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on a free port of 127.0.0.1 in a background thread; with the server's `args`, under the
    connection limits and timeouts the command line serves it with."""

    def __init__(self, app, args=None):
        self.port = free_port()
        if args is None:
            config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        else:
            from recipes.serve.server import uvicorn_config

            config = uvicorn_config(app, dataclasses.replace(args, host="127.0.0.1", port=self.port))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
