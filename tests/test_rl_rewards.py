"""RL glue: a TRL GRPO run on CPU scores its completions with our reward model, each with its own prompt's images;
the HTTP reward function and verl's custom reward function reach the reward server with the samples' images."""

import base64
import io
import sys
from pathlib import Path

import pytest
from datasets import Dataset
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from PIL import Image
from serving_helpers import ServerThread, noise, train_grpo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipes.serve.rl_rewards import (  # noqa: E402
    RewardModelReward, RewardServerReward, compute_score, image_data_url,
)
from recipes.serve.server import ServerArguments, build_app  # noqa: E402

QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def server(vl_model, scorer):
    with ServerThread(build_app(scorer, ServerArguments(model_name_or_path=str(vl_model)))) as running:
        yield running


class RecordingReward(RewardModelReward):
    """Our reward function, keeping what TRL gave it and what it returned."""

    calls = []

    def __call__(self, prompts, completions, **kwargs):
        rewards = super().__call__(prompts, completions, **kwargs)
        self.calls.append((prompts, completions, kwargs, rewards))
        return rewards


def test_grpo_run_scores_each_completion_with_its_own_images(tiny_checkpoints, scorer, tmp_path):
    """Two prompts per reward call, each with its own image: a completion scored with another prompt's image fails."""
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": QUESTION}] for _ in range(4)],
        "images": [[noise(56 + 28 * (i % 2), 56, seed=i)] for i in range(4)],
    })
    reward = RecordingReward(scorer=scorer)
    trainer = train_grpo(tiny_checkpoints("qwen2_5_vl"), reward, dataset, tmp_path / "grpo")

    assert len(reward.calls) == 2
    for prompts, completions, kwargs, rewards in reward.calls:
        images = kwargs["images"]
        assert len(images) == len(completions) == 4 and images[0][0].tobytes() != images[2][0].tobytes()  # two prompts
        assert any(part.get("image") is not None for part in prompts[0][0]["content"])  # TRL put the image inline too
        # one image per conversation: the column's, not the inline copy as well
        again = scorer.score([{"images": im, "prompt": QUESTION, "response": c} for im, c in zip(images, completions)])
        assert rewards == pytest.approx(again, abs=1e-6)
        first_image = scorer.score([{"images": images[0], "prompt": QUESTION, "response": c} for c in completions])
        assert rewards[2:] != pytest.approx(first_image[2:], abs=1e-4)  # the second prompt's image reached the model
    assert "rewards/reward_model/mean" in trainer.state.log_history[0]


def test_http_reward_function_scores_trl_rows_with_their_images(server, scorer):
    """TRL's call of a conversational VLM dataset: prompts with image parts holding the images, an `images` column."""
    pictures = [noise(84, 56, seed=1), noise(56, 84, seed=2), noise(70, 90, seed=3)]
    prompts = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": QUESTION}]}]
               for im in pictures for _ in range(2)]
    completions = [[{"role": "assistant", "content": text}] for _ in pictures for text in ("A cat.", "Noise.\n")]
    images = [[im] for im in pictures for _ in range(2)]
    expected = scorer.score([{"images": im, "prompt": QUESTION, "response": c} for im, c in zip(images, completions)])
    reward = RewardServerReward(server.url, rows_per_request=4)  # two requests for six rows
    got = reward(prompts=prompts, completions=completions, images=images, trainer_state=None)
    assert got == pytest.approx(expected, abs=1e-5)
    single = reward(prompts=[QUESTION] * 3, completions=["A cat."] * 3, image=pictures)  # an `image` column
    assert single == pytest.approx(scorer.score([{"images": [im], "prompt": QUESTION, "response": "A cat."}
                                                 for im in pictures]), abs=1e-5)


def test_http_reward_function_retries_a_busy_server_and_stops_on_a_refusal():
    calls = {"busy": 0, "refusing": 0}
    app = FastAPI()

    @app.post("/busy/score")
    async def busy(payload: dict):
        calls["busy"] += 1
        if calls["busy"] < 3:
            return JSONResponse({"error": {"message": "queue full"}}, 503)
        return {"rewards": [1.5] * len(payload["rows"])}

    # the server's words for a row with fewer images than placeholders
    refusal = "1 image placeholders without their own image but 0 images given"

    @app.post("/refusing/score")
    async def refusing():
        calls["refusing"] += 1
        return JSONResponse({"error": {"message": refusal, "row": 0}}, 422)

    with ServerThread(app) as fake:
        assert RewardServerReward(fake.url + "/busy", retries=2)(["q"], ["a"]) == [1.5]
        assert calls["busy"] == 3
        with pytest.raises(RuntimeError, match=f"HTTP 422.*{refusal}"):
            RewardServerReward(fake.url + "/refusing", retries=3)(["q"], ["a"])
        assert calls["refusing"] == 1
    with pytest.raises(RuntimeError, match="ConnectError"):
        RewardServerReward(fake.url, retries=0, timeout=2)(["q"], ["a"])


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_verl_compute_score_per_sample_and_batched_with_image_markers(server, scorer):
    """Called as verl's reward managers call a custom reward function, with the reward_kwargs of its config."""
    left, right = noise(84, 56, seed=4), noise(56, 56, seed=5)
    infos = [
        {"index": 0, "question": QUESTION, "images": [{"bytes": png_bytes(left)}]},
        {"index": 1, "question": "Compare <image> with <image>. Which is brighter?",
         "images": [{"bytes": png_bytes(left)}, {"bytes": png_bytes(right)}]},
        {"index": 2, "question": "Is 4 even?"},
    ]
    responses = ["Noise.", "The first.\n", "yes"]
    items = [
        {"images": [left], "prompt": QUESTION, "response": responses[0]},
        {"images": [left, right], "prompt": [{"role": "user", "content": [
            {"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " with "}, {"type": "image"},
            {"type": "text", "text": ". Which is brighter?"}]}], "response": responses[1]},
        {"images": [], "prompt": "Is 4 even?", "response": responses[2]},
    ]
    expected = scorer.score(items)
    literal = scorer.score([{"images": [left, right], "prompt": infos[1]["question"], "response": responses[1]}])[0]
    assert abs(literal - expected[1]) > 1e-3  # markers read as text would score otherwise

    per_sample = [compute_score(data_source="vqa", solution_str=r, ground_truth=None, extra_info=dict(info),
                                reward_url=server.url, num_turns=1, reward_router_address=None)
                  for r, info in zip(responses, infos)]
    batched = compute_score(data_sources=["vqa"] * 3, solution_strs=responses, ground_truths=[None] * 3,
                            extra_infos=[dict(info) for info in infos], reward_url=server.url)
    assert per_sample == pytest.approx(expected, abs=1e-5)
    assert isinstance(batched, list) and batched == pytest.approx(expected, abs=1e-5)

    wrong = dict(infos[1], images=infos[1]["images"][:1])
    with pytest.raises(ValueError, match=r"sample 1 \(extra_info index 1\).*2 <image> markers but 1 images"):
        compute_score(data_sources=["vqa"] * 2, solution_strs=responses[:2], ground_truths=[None] * 2,
                      extra_infos=[infos[0], wrong], reward_url=server.url)
    with pytest.raises(KeyError, match="question"):
        compute_score("vqa", "red", None, {"images": []}, reward_url="http://127.0.0.1:9")


def test_client_side_resize_is_the_scorers(server, scorer):
    """With the model's pixel budget, image_data_url resizes exactly as the scorer: same pixels, same reward."""
    budget = {"min_pixels": scorer.renderer.min_pixels, "max_pixels": scorer.renderer.max_pixels}
    picture = noise(90, 70, seed=6)  # sides not multiples of 28: the resize changes it
    url = image_data_url(picture, **budget)
    sent = Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))
    resized = scorer.renderer.load_image(picture)
    assert sent.size == resized.size != picture.size
    assert sent.tobytes() == resized.tobytes()
    info = {"question": QUESTION, "images": [picture]}
    reward = compute_score("vqa", "Noise.", None, info, reward_url=server.url, **budget)
    assert reward == pytest.approx(scorer.score([{"images": [picture], "prompt": QUESTION, "response": "Noise."}])[0], abs=1e-5)
