"""The parts of sharded training that need no launcher (the runs through `accelerate launch` are tests/sharded/,
`make test-sharded`): the vision-tower call on text-only batches changes no reward and no gradient, the launch check
refuses a state that differs from what the launcher asked for, and the value head computes in fp32."""

import pytest
import torch
from accelerate.utils import DistributedType
from transformers import AutoProcessor

from collators import PackedPairCollator, PairCollator
from heads import RewardModelArguments, ValueHeadRewardModel, apply_freezing
from heads.sharding import check_launch
from heads.value_head import ValueHead


def text_pairs(step: int) -> list[dict]:
    return [{"images": [], "prompt": f"Is {n} even?", "chosen": "yes" if n % 2 == 0 else "no",
             "rejected": "no" if n % 2 == 0 else "yes", "margin": None} for n in (step, step + 1)]


@pytest.fixture(scope="module")
def model_and_processor(tiny_checkpoints):
    base = tiny_checkpoints("qwen2_5_vl")
    torch.manual_seed(0)
    model = ValueHeadRewardModel.from_pretrained(base, new_value_head=True, dtype=torch.float32, attn_implementation="sdpa")
    apply_freezing(model, RewardModelArguments())  # the recipe's default: vision tower frozen, projector trained
    return model.train(), AutoProcessor.from_pretrained(base)


def test_text_only_vision_call_changes_no_reward_and_no_gradient(model_and_processor):
    model, processor = model_and_processor
    for step, collator in enumerate((PairCollator(processor), PackedPairCollator(processor))):
        batch = collator(text_pairs(step))
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
    handle = model.pretrained_model.model.visual.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(**PairCollator(processor)(text_pairs(0)))
    handle.remove()
    assert calls == []


class State:
    def __init__(self, distributed_type, num_processes):
        self.distributed_type, self.num_processes = distributed_type, num_processes


@pytest.mark.parametrize("flag,engine", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")])
def test_launch_check_refuses_an_engine_that_was_not_set_up(monkeypatch, flag, engine):
    monkeypatch.setenv(flag, "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=f"asks for {engine}.*set up MULTI_CPU with 2.*Fix: .*ddp.yaml"):
        check_launch(State(DistributedType.MULTI_CPU, 2))
    check_launch(State(DistributedType[engine], 2))


def test_launch_check_refuses_processes_that_would_train_alone(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2.*set up NO with 1 process.*--use_cpu true"):
        check_launch(State(DistributedType.NO, 1))
    check_launch(State(DistributedType.MULTI_CPU, 2))
    monkeypatch.delenv("WORLD_SIZE")
    check_launch(State(DistributedType.NO, 1))  # a plain `python recipes/stage1.py`


def test_value_head_computes_in_fp32_from_bf16_weights_under_autocast():
    torch.manual_seed(0)
    head = ValueHead(64).to(torch.bfloat16)  # as DeepSpeed stores it
    hidden = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reward = head(hidden)
    weight, bias = head.summary.weight.float(), head.summary.bias.float()
    assert reward.dtype == torch.float32
    torch.testing.assert_close(reward, (hidden.float() @ weight.T + bias).squeeze(-1), rtol=0, atol=0)
