"""Videos and images inside responses: every path gives a row the reward of its plain row.

Plain rows (PairCollator), packed pairs (PackedPairCollator: the prompt and its media once, each response's media in
its branch), N-way scoring (RewardScorer) and the training-data check all place the same media at the same places.
"""

import copy
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


@torch.no_grad()
def test_text_after_a_video_starts_at_its_largest_position_plus_one(model_and_processor):
    """Qwen's rule, as vLLM and Qwen's code place it (heads/positions.py), not transformers 5.x's (the video's start +
    max(h, w) / merge): the same positions up to the end of the video, then the text one past the video's largest
    position. The rules differ wherever a video reaches further in time than in space: every video of two or more
    temporal patches in Qwen2.5-VL (tokens_per_second apart), only the 3-patch one (6 frames) in Qwen2-VL (1 apart)."""
    model, processor = model_and_processor
    batch = PairCollator(processor)(pairs())
    inputs = {key: batch[key] for key in ("mm_token_type_ids", "image_grid_thw", "video_grid_thw",
                                          "second_per_grid_ts", "attention_mask") if key in batch}
    ours, deltas = model.backbone.get_rope_index(batch["input_ids"], **inputs)
    theirs, transformers_deltas = type(model.backbone).get_rope_index(model.backbone, batch["input_ids"], **inputs)
    rows_that_differ = 0
    for row in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][row].bool()
        positions, transformers_positions = ours[:, row, real], theirs[:, row, real]
        video = (batch["mm_token_type_ids"][row][real] == 2).nonzero().flatten()
        if len(video) == 0:  # images: both rules agree
            torch.testing.assert_close(positions, transformers_positions)
            assert deltas[row] == transformers_deltas[row]
            continue
        after = int(video[-1]) + 1
        torch.testing.assert_close(positions[:, :after], transformers_positions[:, :after])
        assert positions[:, after].tolist() == [int(positions[:, video].max()) + 1] * 3
        assert deltas[row].item() == int(positions.max()) + 1 - positions.shape[1]  # where generation goes on
        rows_that_differ += bool(positions[0, after] != transformers_positions[0, after])
    assert rows_that_differ == {"qwen2_5_vl": 4, "qwen2_vl": 2}[model.config.model_type]  # rows: each side


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


def test_video_frames_meet_the_image_limit_and_the_frame_budget_before_decoding(processor, tmp_path, monkeypatch):
    """A video file's frame size is checked against PIL's image limit from its header; a frame list is cut to the
    frame budget before any frame is opened (the frames left out here are not images at all)."""
    from collators import ConversationRenderer, set_video_budget
    from collators.conversation import VideoBudgetArguments

    path = write_video(tmp_path / "clip.mp4", moving_square("right"))  # 56 x 56
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 56 * 56 - 1)
    with pytest.raises(ValueError, match="video frames of 56x56 pixels exceed the image limit of 3135"):
        ConversationRenderer(processor).load_video(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 56 * 56)
    assert ConversationRenderer(processor).load_video(path)[0].shape[0] == 4

    set_video_budget(processor, VideoBudgetArguments(video_max_frames=4))
    (tmp_path / "not_an_image.png").write_bytes(b"not an image")
    frames = [str(tmp_path / "not_an_image.png")] * 8
    for t, frame in zip((0, 2, 5, 7), moving_square("left")):  # what 4 frames of 8, taken evenly, keep
        frame.save(tmp_path / f"f{t}.png")
        frames[t] = str(tmp_path / f"f{t}.png")
    assert ConversationRenderer(processor).load_video(frames)[0].shape[0] == 4


def png_url(image: Image.Image) -> str:
    from recipes.serve.rl_rewards import image_data_url

    return image_data_url(image)


@pytest.fixture(scope="module")
def served(vl_model, scorer):
    """The reward model in process and behind the server (sampled video frames meet the image limits)."""
    from serving_helpers import ServerThread

    from recipes.serve.server import ServerArguments, build_app

    args = ServerArguments(model_name_or_path=str(vl_model), max_image_pixels=160 * 160, max_request_pixels=200_000,
                           max_videos_per_row=1, batch_wait_ms=20)
    with ServerThread(build_app(scorer, args), args) as running:
        yield scorer, running.url


@torch.no_grad()
def test_server_and_rl_functions_give_the_scorer_rewards(served, tmp_path):
    import httpx

    from recipes.serve.rl_rewards import RewardModelReward, RewardServerReward, compute_score, video_data_url

    scorer, url = served
    video = write_video(tmp_path / "right.mp4", moving_square("right", frames=8))
    frames = moving_square("left", size=150)  # larger than the video budget: sized once, by it
    red, blue = picture("red"), picture("blue")
    items = [  # a video file, a frame list, an image inside each response
        {"images": [], "videos": [video], "prompt": "Where does the shape move?", "response": "right"},
        {"images": [], "videos": [video], "prompt": "Where does the shape move?", "response": "left"},
        {"images": [], "videos": [frames], "prompt": "Where does the shape move?", "response": "left"},
        {"images": [], "prompt": "Show me a red circle.", "response": answer_with(red, "Here it is.")},
        {"images": [], "prompt": "Show me a red circle.", "response": answer_with(blue, "Here it is.")},
    ]
    expected = torch.tensor(scorer.score(items))
    assert expected.std() > 1e-3

    def messages(item):  # OpenAI chat: video_url in the user turn, image_url in the assistant's
        user = [{"type": "video_url", "video_url": {"url": video_data_url(v)}} for v in item.get("videos", [])]
        assistant = item["response"] if isinstance(item["response"], str) else [
            {"type": "text", "text": "Here it is."},
            {"type": "image_url", "image_url": {"url": png_url(item["response"][0]["content"][1]["image"])}}]
        return [{"role": "user", "content": user + [{"type": "text", "text": item["prompt"]}]},
                {"role": "assistant", "content": assistant}]

    answer = httpx.post(f"{url}/score", json={"rows": [{"messages": messages(item)} for item in items]}, timeout=120)
    assert answer.status_code == 200, answer.text
    torch.testing.assert_close(torch.tensor(answer.json()["rewards"]), expected, **TOLERANCE)

    # TRL reward functions: the dataset's `videos` column, completions holding their own images
    prompts = [item["prompt"] for item in items]
    completions = [item["response"] for item in items]
    videos = [item.get("videos", []) for item in items]
    for reward in (RewardModelReward(scorer=scorer), RewardServerReward(url)):
        torch.testing.assert_close(torch.tensor(reward(prompts, completions, videos=videos)), expected, **TOLERANCE)
    # verl: `<video>` marks the video's place; extra_info carries it
    rewards = compute_score(solution_strs=["right", "left"], data_sources=["x"] * 2, ground_truths=[None] * 2,
                            extra_infos=[{"question": "<video>Where does the shape move?", "videos": [video]}] * 2,
                            reward_url=url)
    torch.testing.assert_close(torch.tensor(rewards), expected[:2], **TOLERANCE)


def test_server_video_limits(served, tmp_path):
    import httpx

    from recipes.serve.rl_rewards import video_data_url

    _, url = served
    big = write_video(tmp_path / "big.mp4", moving_square("left", 4, size=168))
    long = write_video(tmp_path / "long.mp4", moving_square("left", 40, size=112), fps=4)  # 20 frames at 2 fps
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))

    def post(videos, **row):
        row = {"prompt": "Where?", "response": "left", "videos": videos, **row}
        return httpx.post(f"{url}/score", json={"rows": [row]}, timeout=60)

    cases = [
        (post([video_data_url(big)]), 422, "168x168 pixels exceed the limit of 25600"),
        (post([video_data_url(long)]), 413, "20 sampled frames exceed the request's budget"),
        (post([video_data_url(tmp_path / "broken.mp4")]), 422, "cannot be decoded"),
        (post([png_url(picture("red"))] * 2), 422, "2 videos exceed the limit of 1 per row"),
        (post([[png_url(Image.new("RGB", (200, 150)))] * 2]), 422, "more than 25600 pixels"),
        (post(["http://example.com/a.mp4"]), 422, "remote video URLs are not fetched"),
    ]
    for answer, status, message in cases:
        assert answer.status_code == status, answer.text
        assert any(part in answer.json()["error"]["message"] for part in message.split("|")), answer.text
    assert post([video_data_url(moving_square("left"))]).status_code == 200


def test_trainer_trains_on_video_and_image_in_response_rows(model_and_processor, tmp_path):
    """The checked rows through VLRewardTrainer as stage1.py runs it: the media columns reach the collator."""
    from trl import RewardConfig

    from collators import pair_collator_for
    from heads import VLRewardTrainer

    model, processor = model_and_processor
    model = copy.deepcopy(model)  # the module's other tests keep theirs untrained
    dataset, _ = load_preference_mixture({write_rows(tmp_path): 1.0}, processor)
    args = RewardConfig(output_dir=str(tmp_path / "out"), report_to=[], bf16=False, use_cpu=True, max_steps=2,
                        per_device_train_batch_size=3, logging_steps=1, save_strategy="no", learning_rate=1e-2)
    trainer = VLRewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                              data_collator=pair_collator_for(model, processor))
    before = model.v_head.summary.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, model.v_head.summary.weight)
