"""One rank of a 2-process sharded run on CPU (gloo) in which rank 1's batch is text-only at every step.

    torchrun --nproc_per_node 2 tests/sharded_worker.py MODEL_DIR OUT.jsonl [--backend fsdp2|zero3] [--no_vision_sync]

Rank 0 trains on image pairs at the first two steps and video pairs at the last two, rank 1 on text-only pairs, in
the plain two-row layout at even steps and the packed layout at odd ones. Under FSDP2 the decoder layers, the vision tower and the whole model are each sharded with
`fully_shard`; under DeepSpeed ZeRO-3 every module is. Each gathers its parameters with a collective in the forward.
Rank 0 appends one JSON line per finished step (the loss averaged over both ranks) to OUT.jsonl.
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from collators import PackedPairCollator, PairCollator  # noqa: E402
from heads import RewardModelArguments, ValueHeadRewardModel, apply_freezing, find_vision_tower  # noqa: E402

STEPS = 4
LEARNING_RATE = 1e-2
COLOURS = ["red", "green", "blue", "yellow"]


def rank_batch(rank: int, step: int) -> list[dict]:
    """Two pairs: with an image (or a video, from step 2 on) on rank 0, text only on rank 1."""
    if rank == 0 and step >= 2:  # a shape moving one way: the vision tower runs on video frames only
        frames = [[Image.new("RGB", (56, 56), COLOURS[(step + t) % 4]) for t in range(4)] for _ in range(2)]
        return [{"images": [], "videos": [video], "prompt": "Which colour comes first?", "chosen": COLOURS[step % 4],
                 "rejected": COLOURS[(step + 1) % 4], "margin": None} for video in (frames[0], frames[1][::-1])]
    if rank == 0:
        colours = [COLOURS[(step + i) % 4] for i in range(2)]
        return [{"images": [Image.new("RGB", (56, 56), c)], "prompt": "What colour?", "chosen": c,
                 "rejected": COLOURS[(COLOURS.index(c) + 1) % 4], "margin": None} for c in colours]
    numbers = [step + i for i in range(2)]
    return [{"images": [], "prompt": f"Is {n} even?", "chosen": "yes" if n % 2 == 0 else "no",
             "rejected": "no" if n % 2 == 0 else "yes", "margin": None} for n in numbers]


def build_model(model_dir: str) -> ValueHeadRewardModel:
    model = ValueHeadRewardModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    apply_freezing(model, RewardModelArguments())  # the recipe's default: vision tower frozen, projector trained
    return model.train()


def collators(processor) -> list:
    """The collator of each step: the plain layout, then the packed one."""
    return [(PairCollator, PackedPairCollator)[step % 2](processor) for step in range(STEPS)]


def pair_loss(model, batch: dict) -> torch.Tensor:
    rewards = model(**batch).logits.squeeze(-1)
    chosen, rejected = rewards.chunk(2)
    return -F.logsigmoid(chosen - rejected).mean()


def shard_fsdp2(model, world_size: int):
    """fully_shard on every decoder layer, the vision tower and the whole model; returns (model, optimizer, number of
    sharded parameters: DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.backbone.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(find_vision_tower(model.pretrained_model), mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    return model, optimizer, sum(isinstance(p, DTensor) for p in model.parameters())


def shard_zero3(model, world_size: int):
    """DeepSpeed ZeRO-3 (CPU accelerator, gloo); returns (engine, engine, number of sharded parameters: those whose
    full tensor this rank does not hold)."""
    import deepspeed

    # gloo runs the collectives; DeepSpeed's shared-memory CPU all-reduce is a C++ build of minutes, not needed here.
    # (`deepspeed.comm.torch` as an attribute is PyTorch itself, re-exported: go through the module table.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": LEARNING_RATE, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    return engine, engine, sum(p.numel() == 0 and p.ds_numel > 0 for p in model.parameters())


def main():
    from transformers import AutoProcessor

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--backend", choices=["fsdp2", "zero3"], default="fsdp2")
    parser.add_argument("--no_vision_sync", action="store_true", help="skip the vision tower on text-only batches")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_model(args.model_dir)
    model.run_vision_tower_always = False if args.no_vision_sync else None
    total = sum(1 for _ in model.parameters())
    model, optimizer, sharded = (shard_fsdp2 if args.backend == "fsdp2" else shard_zero3)(model, world_size)
    collate = collators(AutoProcessor.from_pretrained(args.model_dir))
    out = Path(args.out)
    if rank == 0:
        out.write_text(json.dumps({"world_size": world_size, "sharded_parameters": sharded, "parameters": total}) + "\n")
    for step in range(STEPS):
        loss = pair_loss(model, collate[step](rank_batch(rank, step)))
        if args.backend == "zero3":
            model.backward(loss)  # ZeRO-3 averages the gradients over the ranks
            model.step()
        else:
            loss.backward()  # FSDP2 averages the gradients over the ranks
            optimizer.step()
            optimizer.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            with out.open("a") as f:
                f.write(json.dumps({"step": step, "loss": mean_loss.item() / world_size}) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
