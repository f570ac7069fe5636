"""Sharded training on mixed batches: real FSDP2 and DeepSpeed ZeRO-3 on 2 CPU processes (gloo), one of them
text-only at every step.

Without the vision-tower call on text-only batches (heads/sharding.py) the ranks' parameter gathers no longer match
and no step completes; with it the run finishes and its losses equal a single process's on the same data. The
mechanism itself changes neither rewards nor gradients of a text-only batch.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

import sharded_worker
from heads import ValueHeadRewardModel

WORKER = Path(sharded_worker.__file__)


@pytest.fixture(scope="module")
def reward_model_dir(tiny_checkpoints, tmp_path_factory):
    """A tiny Qwen2.5-VL reward model with a fixed value head, so that every process starts from the same weights."""
    base = tiny_checkpoints("qwen2_5_vl")
    directory = tmp_path_factory.mktemp("reward_model")
    torch.manual_seed(0)
    ValueHeadRewardModel.from_pretrained(base, new_value_head=True).save_pretrained(directory)
    AutoProcessor.from_pretrained(base).save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(model_dir: Path, out: Path, timeout: float, *flags) -> tuple[int | None, str]:
    """(return code, or None on timeout; the output). A hung run is killed with its whole process group."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(WORKER), str(model_dir), str(out), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output


def read_log(out: Path) -> tuple[dict, list[float]]:
    lines = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    header = lines[0] if lines else {}
    return header, [line["loss"] for line in lines[1:]]


def single_process_losses(model_dir: Path) -> list[float]:
    """The same steps on one process: each step's loss is the mean of the two ranks' losses (their gradients
    are averaged by FSDP), computed on one unsharded model."""
    torch.manual_seed(0)
    model = sharded_worker.build_model(str(model_dir))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=sharded_worker.LEARNING_RATE)
    collate = sharded_worker.collators(AutoProcessor.from_pretrained(model_dir))
    losses = []
    for step in range(sharded_worker.STEPS):
        loss = sum(sharded_worker.pair_loss(model, collate[step](sharded_worker.rank_batch(rank, step)))
                   for rank in (0, 1)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def one_process_losses(reward_model_dir):
    return single_process_losses(reward_model_dir)


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_text_only_rank_finishes_and_matches_one_process(backend, reward_model_dir, one_process_losses, tmp_path):
    returncode, output = run_two_ranks(reward_model_dir, tmp_path / "log.jsonl", 180, "--backend", backend)
    assert returncode == 0, output[-4000:]
    header, losses = read_log(tmp_path / "log.jsonl")
    # Really sharded on really two processes: every parameter is a DTensor (FSDP2) or held by this rank only as a
    # shard (ZeRO-3); a silent fallback to DDP or to one process would leave whole tensors.
    assert header == {"world_size": 2, "sharded_parameters": header["parameters"], "parameters": header["parameters"]}
    assert len(losses) == sharded_worker.STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one_process_losses), rtol=1e-4, atol=1e-5)


def test_text_only_rank_without_vision_call_never_completes_a_step(reward_model_dir, tmp_path):
    """The control (FSDP2 only, to keep the suite short; ZeRO-3 shares the mechanism): with the tower skipped on
    text-only batches, rank 0 gathers the vision tower while rank 1 gathers a decoder layer. gloo notices the size
    mismatch and aborts; NCCL has no such check and waits forever; here the run either aborts or is killed at the
    timeout, and no step completes in either case."""
    returncode, output = run_two_ranks(reward_model_dir, tmp_path / "log.jsonl", 90, "--no_vision_sync")
    header, losses = read_log(tmp_path / "log.jsonl")
    assert header.get("world_size") == 2, output[-4000:]  # it got as far as the first step
    assert returncode != 0 and losses == []
    assert returncode is None or "collective mismatch" in output or "Connection reset" in output, output[-4000:]


def test_text_only_vision_call_changes_no_reward_and_no_gradient(reward_model_dir):
    model = sharded_worker.build_model(str(reward_model_dir))
    collate = sharded_worker.collators(AutoProcessor.from_pretrained(reward_model_dir))
    for step in range(2):  # the plain and the packed layout
        batch = collate[step](sharded_worker.rank_batch(1, step))
        assert "pixel_values" not in batch
        results = []
        for always in (False, True):
            model.run_vision_tower_always = always
            model.zero_grad()
            rewards = model(**batch).logits
            rewards.sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((rewards.detach(), grads))
        (rewards_off, grads_off), (rewards_on, grads_on) = results
        assert torch.equal(rewards_off, rewards_on)
        # The vision call adds zero gradients to the trainable projector, and changes no other gradient.
        added = set(grads_on) - set(grads_off)
        assert added and all(".merger." in name for name in added)
        assert all(torch.count_nonzero(grads_on[name]) == 0 for name in added)
        assert all(torch.equal(grads_on[name], grads_off[name]) for name in grads_off)
    # One process with no setting: the scoring path runs no vision tower on text-only batches.
    model.run_vision_tower_always = None
    calls = []
    tower = model.pretrained_model.model.visual
    handle = tower.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(**collate[0](sharded_worker.rank_batch(1, 0)))
    handle.remove()
    assert calls == []
