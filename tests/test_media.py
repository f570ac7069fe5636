"""Videos and images inside responses: every path gives a row the reward of its plain row.

Plain rows (PairCollator), packed pairs (PackedPairCollator: the prompt and its media once, each response's media in
its branch), N-way scoring (RewardScorer) and the training-data check all place the same media at the same places.
"""

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoProcessor

from collators import PackedPairCollator, PairCollator, load_preference_mixture
from collators.packed_pair_collator import video_time_interval
from heads import RewardScorer, ValueHeadRewardModel

TOLERANCE = dict(atol=1e-4, rtol=0)


def moving_square(direction: str, frames: int = 4, size: int = 56) -> list[Image.Image]:
    """A white square crossing a black frame left to right (or right to left)."""
    images = []
    for t in range(frames):
        x = 4 + t * (size - 20) // (frames - 1)
        x = x if direction == "right" else size - 16 - x
        image = Image.new("RGB", (size, size))
        ImageDraw.Draw(image).rectangle([x, 20, x + 12, 32], fill=(255, 255, 255))
        images.append(image)
    return images


def write_video(path, frames: list[Image.Image], fps: int = 4) -> str:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def picture(colour) -> Image.Image:
    image = Image.new("RGB", (56, 84), (30, 30, 30))
    ImageDraw.Draw(image).ellipse([8, 8, 48, 48], fill=colour)
    return image


def answer_with(image, text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}, {"type": "image", "image": image}]}]


def pairs() -> list[dict]:
    """A video pair, an image-in-response pair, and a pair with both (a video prompt, image answers)."""
    return [
        {"images": [], "videos": [moving_square("right")], "prompt": "Where does the shape move?",
         "chosen": "right", "rejected": "left"},
        {"images": [], "videos": [], "prompt": "Show me a red circle.",
         "chosen": answer_with(picture("red"), "Here it is."), "rejected": answer_with(picture("blue"), "Here it is.")},
        {"images": [picture("green")], "videos": [moving_square("left", frames=6)],
         "prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Draw where it goes."}]}],
         "chosen": answer_with(picture("yellow"), "left"), "rejected": answer_with(picture("cyan"), "The right.")},
    ]


def items(pair: dict) -> list[dict]:
    return [{"images": pair["images"], "videos": pair["videos"], "prompt": pair["prompt"], "response": pair[side]}
            for side in ("chosen", "rejected")]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def model_and_processor(request, tiny_checkpoints):
    path = tiny_checkpoints(request.param)
    model = ValueHeadRewardModel.from_pretrained(path, new_value_head=True, dtype=torch.float32).eval()
    torch.nn.init.normal_(model.v_head.summary.weight, std=1.0)  # a head that tells responses apart
    return model, AutoProcessor.from_pretrained(path)


@torch.no_grad()
def test_media_rows_equal_along_every_path(model_and_processor):
    model, processor = model_and_processor
    examples = pairs()
    plain = PairCollator(processor)(examples)
    packed = PackedPairCollator(processor, video_interval=video_time_interval(model.config))(examples)
    assert "segment_ids" in packed and packed["video_grid_thw"].shape[0] == 2  # each prompt's video encoded once
    # the prompt's image once, each response's own in its branch
    assert plain["video_grid_thw"].shape[0] == 4 and (packed["image_grid_thw"].shape[0], plain["image_grid_thw"].shape[0]) == (5, 6)
    expected = model(**plain).logits.squeeze(-1)
    assert expected.std() > 1e-3  # rewards differ, so a mixed-up medium or position would show
    torch.testing.assert_close(model(**packed).logits.squeeze(-1), expected, **TOLERANCE)
    rows = [item for pair in examples for item in items(pair)]
    order = [side * len(examples) + pair for pair in range(len(examples)) for side in (0, 1)]
    for shared_prompt in (True, False):  # N-way (prompt once per group) and plain rows
        scored = RewardScorer(model, processor, shared_prompt=shared_prompt).score(rows)
        torch.testing.assert_close(torch.tensor(scored), expected[order], **TOLERANCE)


def write_rows(tmp_path) -> str:
    """A jsonl file in the schema: a video file, a frame list, images inside the responses, and two bad videos."""
    for name, image in [("red.png", picture("red")), ("blue.png", picture("blue"))]:
        image.save(tmp_path / name)
    for t, frame in enumerate(moving_square("left")):
        frame.save(tmp_path / f"frame{t}.png")
    write_video(tmp_path / "right.mp4", moving_square("right", frames=8))
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    rows = [
        {"videos": ["right.mp4"], "prompt": "Where does the shape move?", "chosen": "right", "rejected": "left"},
        {"videos": [[f"frame{t}.png" for t in range(4)]], "prompt": "Where does the shape move?",
         "chosen": "left", "rejected": "right"},
        {"prompt": "Show me a red circle.", "chosen": answer_with("red.png", "Here it is."),
         "rejected": answer_with("blue.png", "Here it is.")},
        {"videos": ["broken.mp4"], "prompt": "Where?", "chosen": "left", "rejected": "right"},
        {"videos": ["missing.mp4"], "prompt": "Where?", "chosen": "left", "rejected": "right"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@torch.no_grad()
def test_checked_rows_train_as_given_and_bad_videos_are_named_drops(model_and_processor, tmp_path):
    model, processor = model_and_processor
    path = write_rows(tmp_path)
    dataset, report = load_preference_mixture({path: 1.0}, processor, max_length=2048)
    assert report[path]["dropped"] == {"bad_video": 2} and len(dataset) == 3
    messages = [row["message"] for row in report[path]["dropped_rows"]]
    assert "row 3" in messages[0] and "broken.mp4" in messages[0] and "cannot be decoded" in messages[0]
    assert "row 4" in messages[1] and "missing.mp4 does not exist" in messages[1]
    assert dataset[2]["images"] == [] and len(dataset[2]["chosen_images"]) == len(dataset[2]["rejected_images"]) == 1
    # The checked rows give the rewards of the same pairs given directly (video file, frame list, inline images).
    direct = [
        {"images": [], "videos": [str(tmp_path / "right.mp4")], "prompt": "Where does the shape move?",
         "chosen": "right", "rejected": "left"},
        {"images": [], "videos": [moving_square("left")], "prompt": "Where does the shape move?",
         "chosen": "left", "rejected": "right"},
        pairs()[1],
    ]
    rows = [dataset[i] for i in range(len(dataset))]
    for collator in (PairCollator(processor), PackedPairCollator(processor, video_interval=video_time_interval(model.config))):
        expected = model(**collator(direct)).logits
        assert expected.std() > 1e-3
        torch.testing.assert_close(model(**collator(rows)).logits, expected, **TOLERANCE)


def test_video_file_is_sampled_at_the_budget_fps(processor, tmp_path):
    from collators import ConversationRenderer, set_video_budget, video_budget
    from collators.conversation import VideoBudgetArguments

    path = write_video(tmp_path / "clip.mp4", moving_square("right", frames=16), fps=8)  # 2 seconds
    set_video_budget(processor, VideoBudgetArguments(video_fps=4.0, video_max_pixels=56 * 56))
    processor.save_pretrained(tmp_path / "saved")  # the budget travels with the checkpoint
    reloaded = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert video_budget(reloaded)["fps"] == 4.0 and video_budget(reloaded)["max_pixels"] == 56 * 56
    frames, fps = ConversationRenderer(reloaded).load_video(path)
    assert frames.shape[0] == 8 and fps == pytest.approx(4.0)  # 2 s at 4 frames per second
    # the square moves right: its centre of mass in the last frame lies right of the first
    columns = torch.arange(frames.shape[-1], dtype=torch.float32)
    centre = [(frame.mean(0).sum(0) * columns).sum() / frame.mean(0).sum() for frame in frames[[0, -1]]]
    assert centre[1] > centre[0] + 10
    # the rate reaches the model: Qwen2.5-VL spaces temporal patches by temporal_patch_size / fps seconds
    batch = ConversationRenderer(reloaded)([{"images": [], "videos": [path], "prompt": "Where?", "response": "right"}])
    assert batch["second_per_grid_ts"].tolist() == [pytest.approx(2 / 4.0)]
