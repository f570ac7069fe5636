"""recipes/score.py (a reward per response, best-of-N reranking) and the released Skywork-VL-Reward-7B layout."""

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image as PILImage
from qwen_vl_utils import process_vision_info
from safetensors.torch import save_file
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
from trl import TrlParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipes import score as score_cli  # noqa: E402

from heads import RewardScorer  # noqa: E402


@pytest.fixture(scope="module")
def release_layout(tiny_checkpoints, tmp_path_factory) -> tuple[Path, dict]:
    """A tiny checkpoint written exactly as Skywork/Skywork-VL-Reward-7B ships: the Qwen2.5-VL model's own
    save_pretrained (lm_head included), its processor, and value_head.safetensors with the two v_head keys."""
    base = tiny_checkpoints("qwen2_5_vl")
    out = tmp_path_factory.mktemp("skywork_vl_reward_layout")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    generator = torch.Generator().manual_seed(0)
    head = {
        "v_head.summary.weight": torch.randn(1, model.config.text_config.hidden_size, generator=generator),
        "v_head.summary.bias": torch.randn(1, generator=generator),
    }
    save_file(head, str(out / "value_head.safetensors"), metadata={"format": "pt"})
    return out, head


@pytest.fixture
def images(tmp_path) -> Path:
    (tmp_path / "images").mkdir()
    for colour in ("red", "blue"):
        PILImage.new("RGB", (80, 60), colour).save(tmp_path / "images" / f"{colour}.png")
    return tmp_path


def model_card_score(directory: Path, head: dict, image: Path | None, question: str, answer: str) -> float:
    """The scoring code of the model card, with TRL's value head (gone from TRL >= 1.13) applied by hand."""
    processor = AutoProcessor.from_pretrained(directory)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    content = ([{"type": "image", "image": str(image)}] if image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    image_inputs, video_inputs = process_vision_info(messages)
    inputs = processor(text=[text], images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs, return_dict=True, use_cache=False, output_hidden_states=True).hidden_states[-1]
    values = (hidden @ head["v_head.summary.weight"].T).squeeze(-1) + head["v_head.summary.bias"]
    return values.gather(-1, inputs["attention_mask"].sum(dim=-1, keepdim=True) - 1).item()


def test_release_layout_loads_unchanged_and_scores_as_the_model_card(release_layout, images):
    directory, head = release_layout
    scorer = RewardScorer.from_pretrained(str(directory))
    assert scorer.model.value_head_source.endswith("value_head.safetensors")
    assert torch.equal(scorer.model.v_head.summary.weight, head["v_head.summary.weight"])
    assert torch.equal(scorer.model.v_head.summary.bias, head["v_head.summary.bias"])

    cases = [
        (images / "images" / "red.png", "What colour is the shape in the image?", "The answer is red."),
        (images / "images" / "blue.png", "Is Purple the highest value?", "The answer is: B"),
        (None, "Which number is larger? 3 or 7", "7 is larger."),  # text only, in the same padded batch
    ]
    items = [{"images": [image] if image else [], "prompt": q, "response": a} for image, q, a in cases]
    expected = [model_card_score(directory, head, *case) for case in cases]
    assert scorer.score(items) == pytest.approx(expected, abs=1e-5)


def write_requests(directory: Path) -> Path:
    requests = [
        {"image": "images/red.png", "prompt": "What colour is the shape in the image?",
         "responses": ["red", "The answer is blue.", "It is a green circle."]},
        {"image": None, "prompt": "Is 4 even or odd?", "response": "4 is even."},
        {"images": ["images/red.png", "images/blue.png"],
         "prompt": [{"role": "user", "content": "Which picture is red?"}], "responses": ["The first.", "The second."]},
    ]
    path = directory / "requests.jsonl"
    path.write_text("".join(json.dumps(request) + "\n" for request in requests))
    return path


def test_best_of_n_picks_the_highest_reward(release_layout, images):
    directory, _ = release_layout
    requests = write_requests(images)
    output = images / "out" / "scored.jsonl"
    score_cli.main(score_cli.ScoreFileArguments(model_name_or_path=str(directory), input=str(requests),
                                                output=str(output), batch_size=2))
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    red, blue = str(images / "images" / "red.png"), str(images / "images" / "blue.png")

    scorer = RewardScorer.from_pretrained(str(directory))
    first, single, several = lines
    expected = scorer.score([{"images": [red], "prompt": first["prompt"], "response": r} for r in first["responses"]])
    assert first["scores"] == pytest.approx(expected, abs=1e-5)
    assert first["best_index"] == max(range(3), key=expected.__getitem__)
    assert first["best"] == first["responses"][first["best_index"]]
    assert scorer.rank(first["prompt"], first["responses"], images=[red])[0][0] == first["best"]

    assert "scores" not in single and single["image"] is None
    expected = scorer.score([{"images": [], "prompt": single["prompt"], "response": "4 is even."}])
    assert single["score"] == pytest.approx(expected[0], abs=1e-5)

    expected = scorer.score([{"images": [red, blue], "prompt": several["prompt"], "response": r}
                             for r in several["responses"]])
    assert several["scores"] == pytest.approx(expected, abs=1e-5)
    assert several["best"] == several["responses"][max(range(2), key=expected.__getitem__)]


def test_command_line_flags(release_layout, images):
    directory, _ = release_layout
    requests, output = write_requests(images), images / "scored.jsonl"
    argv = ["--model_name_or_path", str(directory), "--input", str(requests), "--output", str(output), "--batch_size", "4"]
    (args,) = TrlParser((score_cli.ScoreFileArguments,)).parse_args_and_config(argv)
    score_cli.main(args)
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [("best" in line, "score" in line) for line in lines] == [(True, False), (False, True), (True, False)]


def test_media_are_found_beside_an_input_named_by_a_relative_path(images, monkeypatch):
    """`--input sub/in.jsonl`: every medium, given or inline, is joined to `sub` once, and the line keeps its key."""
    requests = write_media_requests(images)
    lines = [json.loads(line) for line in requests.read_text().splitlines()]
    monkeypatch.chdir(images.parent)
    relative = [score_cli.read_line(line, images.name, f"line {i}") for i, line in enumerate(lines, start=1)]
    absolute = [score_cli.read_line(line, str(images), f"line {i}") for i, line in enumerate(lines, start=1)]
    assert [work["key"] for work in relative] == [work["key"] for work in absolute]
    paths = [path for work in relative for item in work["items"] for medium in item["images"] + item["videos"]
             for path in (medium if isinstance(medium, list) else [medium])]
    assert len(paths) == 2 + 4 + 2 and all(Path(path).is_file() for path in paths)


NOT_MESSAGES = "expected a string or a list of chat messages"
BAD_LINES = [  # line 2 of the input -> the error, which names it; each was a raw TypeError or KeyError before
    ({"prompt": None, "response": "a"}, rf"line 2: `prompt`: {NOT_MESSAGES}, got NoneType"),
    ({"prompt": 3, "response": "a"}, rf"line 2: `prompt`: {NOT_MESSAGES}, got int"),
    ({"prompt": [{"content": "q"}], "response": "a"}, r"line 2: `prompt`: message 0 is not a \{role, content\} dict"),
    ({"prompt": "q", "response": None}, rf"line 2: `response`: {NOT_MESSAGES}, got NoneType"),
    ({"prompt": "q", "responses": ["a", {"text": "b"}]}, rf"line 2: `responses\[1\]`: {NOT_MESSAGES}, got dict"),
    ({"prompt": "q", "response": "a", "responses": ["a", "b"]}, "line 2: give exactly one of `response`"),
    ({"prompt": "q", "responses": []}, "line 2: `responses` must be a non-empty list"),
    ({"prompt": "q", "responses": "a"}, "line 2: `responses` must be a non-empty list"),
    ({"response": "a"}, "line 2: missing `prompt`"),
    ({"prompt": " ", "response": "a"}, r"line 2: `prompt` is empty \(no text and no image\)"),
    ({"prompt": "q", "responses": ["a", ""]}, r"line 2: `responses\[1\]` is empty"),
    ({"prompt": "q", "images": "images/red.png", "response": "a"}, r"line 2: .*`images` a list of paths"),
    ({"prompt": "q", "images": [None], "response": "a"}, r"line 2: .*`images` a list of paths"),
    ({"prompt": "q", "image": 5, "response": "a"}, r"line 2: `image` must be a path or null"),
    ({"prompt": "q", "image": "images/red.png", "images": [], "response": "a"}, "line 2: give `image` or `images`"),
    ({"prompt": "q", "image": "images/none.png", "response": "a"}, r"line 2: image file .*none.png does not exist"),
    (["q", "a"], "line 2: expected a JSON object, got list"),
    # videos, and media inside the turns
    ({"prompt": "q", "videos": "media/clip.mp4", "response": "a"}, r"line 2: `videos` must be a list of videos"),
    ({"prompt": "q", "videos": [[]], "response": "a"}, r"line 2: a video is a file path or a non-empty list"),
    ({"prompt": "q", "videos": [["media/none.png"]], "response": "a"}, r"line 2: frame file .*none.png does not exist"),
    ({"prompt": "q", "videos": ["media/none.mp4"], "response": "a"}, r"line 2: video file .*none.mp4 does not exist"),
    ({"prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "q"}]}], "response": "a"},
     r"line 2: `response`: 1 video placeholders without their own video but 0 videos given"),
    ({"prompt": "q", "responses": ["a", [{"role": "assistant", "content": [{"type": "image", "image": "none.png"}]}]]},
     r"line 2: image file .*none.png does not exist"),
]


@pytest.mark.parametrize("line, error", BAD_LINES)
def test_bad_input_lines_are_named_before_any_scoring(images, line, error):
    path = images / "in.jsonl"
    path.write_text(json.dumps({"image": "images/red.png", "prompt": "q", "response": "a"}) + "\n" + json.dumps(line))
    with pytest.raises((ValueError, FileNotFoundError), match=error):  # no model: checked before one would load
        score_cli.main(score_cli.ScoreFileArguments(input=str(path), output=str(images / "out.jsonl")))
    assert not (images / "out.jsonl").exists()


def test_invalid_json_is_named(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "q", "response": "a"}\n\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"in.jsonl line 3: not valid JSON"):
        score_cli.main(score_cli.ScoreFileArguments(input=str(path), output=str(tmp_path / "out.jsonl")))


def write_media_requests(directory: Path) -> Path:
    """A video file, a frame list and responses that hold images, all named relative to the input file."""
    from test_media import moving_square, write_video

    (directory / "media").mkdir()
    write_video(directory / "media" / "clip.mp4", moving_square("right", frames=8))
    for t, frame in enumerate(moving_square("left")):
        frame.save(directory / "media" / f"f{t}.png")
    frames = [f"media/f{t}.png" for t in range(4)]
    drawing = [[{"role": "assistant", "content": [{"type": "text", "text": "Here."},
                                                  {"type": "image", "image": f"images/{colour}.png"}]}]
               for colour in ("red", "blue")]
    requests = [
        {"videos": ["media/clip.mp4"], "prompt": "Where does the shape move?", "responses": ["left", "right"]},
        {"videos": [frames], "prompt": [{"role": "user", "content": [{"type": "text", "text": "Where to?"},
                                                                     {"type": "video"}]}], "response": "left"},
        {"prompt": "Draw a red circle.", "responses": drawing},
    ]
    path = directory / "media_requests.jsonl"
    path.write_text("".join(json.dumps(request) + "\n" for request in requests))
    return path


def test_videos_and_images_inside_responses_are_scored_with_their_media(release_layout, images):
    directory, _ = release_layout
    requests, output = write_media_requests(images), images / "scored.jsonl"
    score_cli.main(score_cli.ScoreFileArguments(model_name_or_path=str(directory), input=str(requests),
                                                output=str(output), batch_size=4))
    clip, drawn = [json.loads(line) for line in output.read_text().splitlines()][0::2]
    frames = json.loads(output.read_text().splitlines()[1])
    media = images / "media"
    scorer = RewardScorer.from_pretrained(str(directory))
    video_items = [{"images": [], "videos": [str(media / "clip.mp4")], "prompt": clip["prompt"], "response": r}
                   for r in clip["responses"]]
    expected = scorer.score(video_items)
    assert clip["scores"] == pytest.approx(expected, abs=1e-5)
    # the video counts: without it the same text scores otherwise
    without = scorer.score([dict(item, videos=[]) for item in video_items])
    assert max(abs(a - b) for a, b in zip(expected, without)) > 1e-3
    frame_list = [str(media / f"f{t}.png") for t in range(4)]
    assert frames["score"] == pytest.approx(scorer.score([{"images": [], "videos": [frame_list],
                                                           "prompt": frames["prompt"], "response": "left"}])[0], abs=1e-5)
    inline = [[{"role": "assistant", "content": [{"type": "text", "text": "Here."},
                                                 {"type": "image", "image": str(images / "images" / f"{c}.png")}]}]
              for c in ("red", "blue")]
    expected = scorer.score([{"images": [], "prompt": drawn["prompt"], "response": r} for r in inline])
    assert drawn["scores"] == pytest.approx(expected, abs=1e-5) and abs(expected[0] - expected[1]) > 1e-4


def test_a_line_is_keyed_by_the_bytes_of_every_medium(images):
    """Resumed progress is keyed by content: a video frame or a response's image replaced under its old name makes
    the line new."""
    requests = write_media_requests(images)
    lines = [json.loads(line) for line in requests.read_text().splitlines()]

    def keys():
        return [score_cli.read_line(line, str(images), f"line {i}")["key"] for i, line in enumerate(lines, start=1)]

    before = keys()
    assert len(set(before)) == 3
    PILImage.new("RGB", (56, 56), "white").save(images / "media" / "f2.png")
    after_frame = keys()
    assert after_frame[1] != before[1] and after_frame[0::2] == before[0::2]
    PILImage.new("RGB", (80, 60), "green").save(images / "images" / "blue.png")
    after_image = keys()
    assert after_image[2] != after_frame[2] and after_image[:2] == after_frame[:2]
    (images / "media" / "clip.mp4").write_bytes((images / "media" / "clip.mp4").read_bytes() + b"\0")
    assert keys()[0] != before[0]


def test_an_undecodable_video_is_named(release_layout, images):
    directory, _ = release_layout
    (images / "broken.mp4").write_bytes(b"not a video" * 100)
    path = images / "in.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n"
                    + json.dumps({"videos": ["broken.mp4"], "prompt": "q", "response": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"in.jsonl line 2: video .*broken.mp4 cannot be read or sampled"):
        score_cli.main(score_cli.ScoreFileArguments(model_name_or_path=str(directory), input=str(path),
                                                    output=str(images / "out.jsonl")))
