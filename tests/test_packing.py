"""The packed layout (one sequence per pair, shared prompt) gives the plain layout's rewards, loss and gradients."""

import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import AutoProcessor
from trl import RewardConfig

from collators import PairCollator, pair_collator_for
from collators.packed_pair_collator import CHOSEN, PAD, PROMPT, REJECTED, PackedPairCollator
from heads import ValueHeadRewardModel, VLRewardTrainer
from heads.packing import shared_prompt_mask

VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TOLERANCE = dict(atol=1e-4, rtol=0)


def image(width, height, colour):
    return Image.new("RGB", (width, height), colour)


def image_pairs():
    return [
        {"images": [image(112, 112, (200, 20, 20))], "prompt": "What colour is the shape in the image?",
         "chosen": "The shape is red.", "rejected": "The shape is blue, I think, or maybe green."},
        {"images": [image(140, 84, (20, 20, 200))], "prompt": "Where is the dot?",
         "chosen": "top", "rejected": "The dot is at the bottom left."},
        {"images": [image(84, 112, (0, 0, 0)), image(112, 56, (250, 250, 0))], "prompt": "Which bar is taller?",
         "chosen": "The left bar.", "rejected": "The left bar. No, the right bar."},
    ]


def text_pairs():
    return [
        {"images": [], "prompt": "Which number is larger, 3 or 14?", "chosen": "14 is larger.", "rejected": "3"},
        {"images": [], "prompt": "Is 7 even or odd? Answer with one word, please.", "chosen": "7 is odd.",
         "rejected": "7 is even, because seven is two times three plus one."},
    ]


def mixed_pairs():
    return [*text_pairs()[:1], *image_pairs()[1:], *text_pairs()[1:]]


BATCHES = {"images": image_pairs, "text": text_pairs, "mixed": mixed_pairs}
CASES = [(family, batch) for family in VL_FAMILIES for batch in BATCHES] + [("qwen2", "text")]


def load(tiny_checkpoints, family):
    path = tiny_checkpoints(family)
    model = ValueHeadRewardModel.from_pretrained(path, new_value_head=True, dtype=torch.float32)
    return model, AutoProcessor.from_pretrained(path)


def pairwise_loss(rewards):
    chosen, rejected = rewards.squeeze(-1).chunk(2)
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean()


def rewards_and_grads(model, batch):
    model.zero_grad()
    rewards = model(**batch).logits
    loss = pairwise_loss(rewards)
    loss.backward()
    grads = {name: p.grad.clone() if p.grad is not None else None for name, p in model.named_parameters()}
    return rewards.detach(), loss.detach(), grads


@pytest.mark.parametrize("family,batch", CASES)
def test_packed_equals_plain(tiny_checkpoints, family, batch):
    model, processor = load(tiny_checkpoints, family)
    examples = BATCHES[batch]()
    plain = PairCollator(processor)(examples)
    packed = PackedPairCollator(processor)(examples)
    assert packed["input_ids"].shape[0] == len(examples)
    if batch != "text":  # each image is encoded once per pair, not once per row
        assert packed["pixel_values"].shape[0] * 2 == plain["pixel_values"].shape[0]

    plain_rewards, plain_loss, plain_grads = rewards_and_grads(model, plain)
    packed_rewards, packed_loss, packed_grads = rewards_and_grads(model, packed)
    torch.testing.assert_close(packed_rewards, plain_rewards, **TOLERANCE)
    torch.testing.assert_close(packed_loss, plain_loss, **TOLERANCE)
    assert packed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        if grad is None:
            assert packed_grads[name] is None, name
        else:
            torch.testing.assert_close(packed_grads[name], grad, **TOLERANCE, msg=lambda m: f"{name}: {m}")
    assert plain_grads["v_head.summary.weight"].abs().sum() > 0


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_branch_positions_are_the_plain_rows_mrope_positions(tiny_checkpoints, family):
    model, processor = load(tiny_checkpoints, family)
    examples = BATCHES["mixed"]()
    plain = PairCollator(processor)(examples)
    packed = PackedPairCollator(processor)(examples)
    # transformers' own get_rope_index (the model's is Qwen's rule, heads/positions.py): images are placed alike
    expected, _ = type(model.backbone).get_rope_index(
        model.backbone, plain["input_ids"], mm_token_type_ids=plain["mm_token_type_ids"],
        image_grid_thw=plain["image_grid_thw"], attention_mask=plain["attention_mask"],
    )
    for row in range(len(examples)):
        segments = packed["segment_ids"][row]
        for branch, plain_row in ((CHOSEN, row), (REJECTED, row + len(examples))):
            keep = (segments == PROMPT) | (segments == branch)
            real = plain["attention_mask"][plain_row].bool()
            torch.testing.assert_close(packed["position_ids"][:, row, keep], expected[:, plain_row, real])
            torch.testing.assert_close(packed["input_ids"][row, keep], plain["input_ids"][plain_row, real])


def test_mask_keeps_the_branches_apart():
    segments = torch.tensor([[PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED, PAD]])
    mask = shared_prompt_mask(segments)[0, 0].int()
    assert mask.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # rejected: the prompt and itself, not the chosen answer
        [1, 1, 0, 0, 0, 1],  # padding: never seen by real tokens, never a fully masked row
    ]


def test_trainer_loss_and_throughput_with_packing(tiny_checkpoints, tmp_path):
    model, processor = load(tiny_checkpoints, "qwen2_5_vl")
    examples = [dict(example, margin=0.5) for example in BATCHES["mixed"]()]
    args = RewardConfig(output_dir=str(tmp_path), report_to=[], bf16=False)
    trainer = VLRewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                              processing_class=processor, data_collator=pair_collator_for(model, processor))
    assert isinstance(trainer.data_collator, PackedPairCollator)  # on by default for Qwen2.5-VL with sdpa
    model.train()
    losses = {}
    for name, collator in (("plain", PairCollator(processor)), ("packed", trainer.data_collator)):
        trainer._throughput = {"pairs": 0, "tokens": 0, "start": None}
        batch = collator(examples)
        losses[name] = trainer.compute_loss(model, batch)
        assert trainer._throughput["pairs"] == len(examples)
        assert trainer._throughput["tokens"] == int(batch["attention_mask"].sum())
    torch.testing.assert_close(losses["packed"], losses["plain"], **TOLERANCE)


def test_fallbacks(tiny_checkpoints):
    model, processor = load(tiny_checkpoints, "qwen2_5_vl")
    assert type(pair_collator_for(model, processor, pack_pairs=False)) is PairCollator
    model.config.get_text_config()._attn_implementation = "eager"
    assert type(pair_collator_for(model, processor)) is PairCollator
    # Videos on a family whose packed video positions are not computed keep the two-row layout.
    examples = image_pairs()[:1]
    examples[0]["videos"] = [[Image.new("RGB", (56, 56), (9, 9, 9))] * 2]
    batch = PackedPairCollator(processor, video_interval=None)(examples)
    assert "segment_ids" not in batch and batch["input_ids"].shape[0] == 2


def test_training_with_packing_logs_throughput_and_updates_weights(tiny_checkpoints, tmp_path):
    model, processor = load(tiny_checkpoints, "qwen2_5_vl")
    dataset = Dataset.from_list(BATCHES["mixed"]())
    args = RewardConfig(output_dir=str(tmp_path), report_to=[], bf16=False, gradient_checkpointing=False, max_steps=2,
                        per_device_train_batch_size=2, per_device_eval_batch_size=2, logging_steps=1, save_strategy="no",
                        learning_rate=1e-2)
    trainer = VLRewardTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                              processing_class=processor, data_collator=pair_collator_for(model, processor))
    before = model.v_head.summary.weight.detach().clone()
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["pairs_per_second"] > 0 and entry["tokens_per_second"] > 0 for entry in logs)
    assert not torch.equal(before, model.v_head.summary.weight)
    assert 0.0 <= trainer.evaluate()["eval_accuracy"] <= 1.0
