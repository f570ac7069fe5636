"""One prompt + N responses in one packed sequence gives the rewards of N plain rows (N = 1, 2, 5)."""

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from collators import ConversationRenderer
from collators.packed_pair_collator import PAD, PROMPT, pack_conversations
from heads import RewardScorer, ValueHeadRewardModel
from heads.packing import shared_prompt_mask

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen2")
CASES = [(family, with_images) for family in FAMILIES for with_images in (True, False)
         if not (family == "qwen2" and with_images)]
TOLERANCE = dict(atol=1e-4, rtol=0)


def groups(with_images: bool) -> list[tuple[list, str, list[str]]]:
    """Three prompts of different lengths with N = 5, 2 and 1 responses; the images differ in size."""
    images = ([[Image.new("RGB", (112, 84), (200, 20, 20))], [Image.new("RGB", (56, 140), (20, 20, 200))],
               [Image.new("RGB", (84, 84), (0, 0, 0)), Image.new("RGB", (112, 56), (250, 250, 0))]]
              if with_images else [[], [], []])
    return [
        (images[0], "What colour is the shape in the image? Answer with one word.",
         ["red", "The shape is red.", "blue", "It is green, or maybe blue, I cannot tell from here.", "red red"]),
        (images[1], "Where is the dot?", ["top", "The dot is at the bottom left."]),
        (images[2], "Which bar is taller, the left one or the right one?", ["The left bar."]),
    ]


def load(tiny_checkpoints, family):
    path = tiny_checkpoints(family)
    model = ValueHeadRewardModel.from_pretrained(path, new_value_head=True, dtype=torch.float32).eval()
    torch.nn.init.normal_(model.v_head.summary.weight, std=1.0)  # a head that tells responses apart
    return model, AutoProcessor.from_pretrained(path)


def item_groups(batch_groups):
    return [[{"images": images, "prompt": prompt, "response": response} for response in responses]
            for images, prompt, responses in batch_groups]


def plain_items(batch_groups):
    return [{"images": images, "prompt": prompt, "response": response}
            for images, prompt, responses in batch_groups for response in responses]


@pytest.mark.parametrize("family,with_images", CASES)
def test_nway_packed_equals_plain_rows(tiny_checkpoints, family, with_images):
    model, processor = load(tiny_checkpoints, family)
    renderer = ConversationRenderer(processor)
    batch_groups = groups(with_images)
    packed = pack_conversations(renderer, item_groups(batch_groups))
    plain = renderer(plain_items(batch_groups))
    assert packed["input_ids"].shape[0] == 3 and packed["branch_index"].shape[0] == 8
    if with_images:  # each image is encoded once per prompt, not once per response
        assert packed["image_grid_thw"].shape[0] == 4 and plain["image_grid_thw"].shape[0] == 5 * 1 + 2 * 1 + 1 * 2
    with torch.no_grad():
        packed_rewards = model(**packed).logits
        plain_rewards = model(**plain).logits
    assert plain_rewards.std() > 1e-3  # the responses get different rewards, so the comparison can fail
    torch.testing.assert_close(packed_rewards, plain_rewards, **TOLERANCE)


@pytest.mark.parametrize("family", ("qwen2_5_vl", "qwen2"))
def test_scorer_groups_responses_by_prompt(tiny_checkpoints, family):
    model, processor = load(tiny_checkpoints, family)
    with_images = family != "qwen2"
    items = plain_items(groups(with_images))
    # Interleaved, and the first prompt's image arrives as equal copies: grouping goes by content, not position.
    items = items[::2] + items[1::2]
    for item in items:
        item["images"] = [image.copy() for image in item["images"]]
    calls = []
    forward = model.forward

    def recording_forward(**batch):
        calls.append(("packed" if "segment_ids" in batch else "rows", batch["input_ids"].shape[0]))
        return forward(**batch)

    model.forward = recording_forward
    shared = RewardScorer(model, processor, batch_size=8).score(items)
    assert sorted(calls) == [("packed", 2), ("rows", 1)]  # N = 5 and N = 2 in one packed batch; N = 1 as a row
    calls.clear()
    rows = RewardScorer(model, processor, batch_size=8, shared_prompt=False).score(items)
    assert calls == [("rows", 8)]
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(rows), **TOLERANCE)

    calls.clear()  # more responses than batch_size: the prompt is packed once per chunk
    images, prompt, responses = groups(with_images)[0]
    ranked = RewardScorer(model, processor, batch_size=2).rank(prompt, responses, images=images)
    assert sorted(calls) == [("packed", 1), ("packed", 1), ("rows", 1)]
    expected = RewardScorer(model, processor, shared_prompt=False).score(
        [{"images": images, "prompt": prompt, "response": response} for response in responses])
    assert [response for response, _ in ranked] == [responses[i] for i in sorted(range(5), key=lambda i: -expected[i])]
    torch.testing.assert_close(torch.tensor([score for _, score in ranked]), torch.tensor(sorted(expected)[::-1]),
                               **TOLERANCE)


def test_mask_keeps_n_branches_apart():
    segments = torch.tensor([[PROMPT, 1, 2, 2, 3, PAD]])
    assert shared_prompt_mask(segments)[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 0, 0, 0, 1, 0],  # branch 3: the prompt and itself only
        [1, 0, 0, 0, 0, 1],
    ]


def test_image_inside_a_response_packs_in_its_branch(tiny_checkpoints):
    model, processor = load(tiny_checkpoints, "qwen2_5_vl")
    answer_with_image = [{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "This."}]}]
    prompt_image, answer_image = Image.new("RGB", (56, 56), (0, 255, 0)), Image.new("RGB", (84, 56), (0, 0, 255))
    items = [{"images": [prompt_image], "prompt": "Show me.", "response": "No."},
             {"images": [prompt_image, answer_image], "prompt": "Show me.", "response": answer_with_image}]
    packed = pack_conversations(ConversationRenderer(processor), [items])
    assert packed["image_grid_thw"].shape[0] == 2 and (packed["segment_ids"] == PROMPT).sum() > 0
    shared = RewardScorer(model, processor).score(items)
    rows = RewardScorer(model, processor, shared_prompt=False).score(items)
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(rows), **TOLERANCE)


def test_scorer_never_packs_responses_to_the_same_prompt_about_other_images(tiny_checkpoints):
    """One question asked of a red and of a blue image: two prompts, each packed with its own image."""
    model, processor = load(tiny_checkpoints, "qwen2_5_vl")
    images = [Image.new("RGB", (56, 56), (220, 20, 20)), Image.new("RGB", (56, 56), (20, 20, 220))]
    items = [{"images": [image], "prompt": "What colour is the shape?", "response": response}
             for response in ("red", "blue", "It is red.") for image in images]
    calls = []
    forward = model.forward
    model.forward = lambda **batch: calls.append(batch["input_ids"].shape[0]) or forward(**batch)
    shared = RewardScorer(model, processor, batch_size=8).score(items)
    assert calls == [2]  # one packed sequence per image
    rows = RewardScorer(model, processor, shared_prompt=False).score(items)
    assert abs(rows[0] - rows[1]) > 1e-3  # the image changes the reward, so packing the wrong one would show
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(rows), **TOLERANCE)
