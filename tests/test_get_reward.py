"""/get_reward as RL trainers call it: the same reward as /score and RewardScorer for the same conversation, the
images of OpenRLHF's prompt dataset found by prompt (--prompt_images), batches capped by --max_batch_tokens, and
metrics in Prometheus' format."""

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import ServerThread, noise

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heads import RewardScorer  # noqa: E402
from recipes.serve.rl_rewards import image_data_url  # noqa: E402
from recipes.serve.server import DynamicBatcher, Metrics, PromptImages, ServerArguments, build_app  # noqa: E402


def openrlhf_query(scorer: RewardScorer, content, response: str, images=()) -> tuple[str, str]:
    """(query, prompt) as OpenRLHF's trainer builds them: the chat template with the generation prompt; for images
    the processor's expanded image tokens; the response as the policy generated it, ending with its stop token."""
    processor = scorer.renderer.processing_class
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    if images:
        ids = processor(text=[prompt], images=list(images), add_special_tokens=False)["input_ids"][0]
        expanded = processor.tokenizer.decode(ids, skip_special_tokens=False)
    else:
        expanded = prompt
    return expanded + response + "<|im_end|>", prompt


def test_get_reward_scores_what_score_and_the_scorer_score(vl_model, scorer):
    """Whitespace at the end of a response is part of the response: only the end tokens are cut."""
    responses = ["red", "red\n", "red  ", "\n\nred\n\n"]
    items = [{"images": [], "prompt": "What colour is a tomato?", "response": r} for r in responses]
    expected = scorer.score(items)
    assert len({round(e, 5) for e in expected}) == len(responses)  # the trailing whitespace changes the reward
    queries = [openrlhf_query(scorer, "What colour is a tomato?", r)[0] for r in responses]
    plain_prompt = "Q: What colour is a tomato?\nA:"
    plain = [{"images": [], "prompt": plain_prompt, "response": r} for r in responses]
    with ServerThread(build_app(scorer, ServerArguments(model_name_or_path=str(vl_model)))) as server:
        chatml = httpx.post(server.url + "/get_reward", json={"query": queries}, timeout=60).json()["rewards"]
        scored = httpx.post(server.url + "/score", json={"rows": items}, timeout=60).json()["rewards"]
        plain_rewards = httpx.post(server.url + "/get_reward", json={
            "query": [plain_prompt + r + "<|endoftext|>" for r in responses], "prompts": [plain_prompt] * 4}, timeout=60).json()
    assert chatml == pytest.approx(expected, abs=1e-5)
    assert scored == pytest.approx(expected, abs=1e-5)
    assert plain_rewards["rewards"] == pytest.approx(scorer.score(plain), abs=1e-5)


@pytest.fixture(scope="module")
def prompt_dataset(tmp_path_factory) -> tuple[Path, dict]:
    """OpenRLHF's prompt dataset: `input` with `<image>` marking the image, `images` as paths."""
    root = tmp_path_factory.mktemp("prompts")
    rows, images = [], {}
    for i, question in enumerate(["<image>What is in the picture?", "Compare <image> and <image>. Which is brighter?"]):
        paths = []
        for j in range(question.count("<image>")):
            images[root / f"{i}_{j}.png"] = noise(84 + 28 * j, 56, seed=10 * i + j)
            images[root / f"{i}_{j}.png"].save(root / f"{i}_{j}.png")
            paths.append(str(root / f"{i}_{j}.png"))
        rows.append({"input": question, "images": paths, "label": ""})
    rows.append({"input": "Is 4 even?", "images": None, "label": "yes"})
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, images


def test_openrlhf_queries_get_the_images_of_their_prompt_row(vl_model, scorer, prompt_dataset):
    path, images = prompt_dataset
    red_car, left, right = (images[path.parent / name] for name in ("0_0.png", "1_0.png", "1_1.png"))
    cases = [  # (content as OpenRLHF renders the row, its images, response)
        ([{"type": "image"}, {"type": "text", "text": "What is in the picture?"}], [red_car], "A red car."),
        ([{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
          {"type": "text", "text": ". Which is brighter?"}], [left, right], "The left one.\n"),
        ("Is 4 even?", [], "yes"),
    ]
    queries, prompts, items = [], [], []
    for content, row_images, response in cases:
        query, prompt = openrlhf_query(scorer, content, response, row_images)
        queries.append(query)
        prompts.append(prompt)
        messages = [{"role": "user", "content": content}] if row_images else content
        items.append({"images": row_images, "prompt": messages, "response": response})
    expected = scorer.score(items)
    swapped = scorer.score([dict(items[1], images=[right, left])])[0]
    assert abs(swapped - expected[1]) > 1e-3  # the images' order matters, so the test can see it

    args = ServerArguments(model_name_or_path=str(vl_model), prompt_images=str(path))
    with ServerThread(build_app(scorer, args)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        got = [client.post("/get_reward", json={"query": [q], "prompts": [p], "labels": [""]}).json()["rewards"][0]
               for q, p in zip(queries, prompts)]
        unknown, _ = openrlhf_query(scorer, [{"type": "image"}, {"type": "text", "text": "Unknown?"}], "no", [red_car])
        missing = client.post("/get_reward", json={"query": [unknown], "prompts": [""], "labels": [""]})
    assert got == pytest.approx(expected, abs=1e-5)
    assert missing.status_code == 422
    error = missing.json()["error"]
    assert error["field"] == "query" and error["row"] == 0 and "--prompt_images" in error["message"]
    assert str(path) not in error["message"]  # no server path in a message


def test_prompt_images_file_errors_name_the_file_and_row(tmp_path):
    image = tmp_path / "a.png"
    noise(28, 28, 0).save(image)
    other = tmp_path / "b.png"
    noise(28, 28, 1).save(other)
    cases = {
        "same prompt, other images": ([{"input": "<image>Q", "images": [str(image)]}, {"input": "<image>Q", "images": [str(other)]}],
                                      "row 1: the same prompt as row 0"),
        "more places than images": ([{"input": "<image><image>Q", "images": [str(image)]}], "row 0: 2 image places"),
        "a missing file": ([{"input": "<image>Q", "images": [str(tmp_path / "gone.png")]}], "row 0: no image file"),
        "a remote image": ([{"input": "<image>Q", "images": ["https://example.com/a.png"]}], "row 0: the server never fetches"),
    }
    for name, (rows, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        with pytest.raises(ValueError, match=message) as raised:
            PromptImages(str(path), "input", "images")
        assert str(path) in str(raised.value), name
    same = tmp_path / "same.jsonl"  # a prompt repeated with the same image is no ambiguity
    same.write_text(json.dumps({"input": "<image>Q", "images": [str(image)]}) + "\n" + json.dumps({"input": "<image>Q", "images": [str(image)]}) + "\n")
    assert PromptImages(str(same), "input", "images").by_prompt


def test_batches_stay_within_max_batch_tokens():
    """Rows queued together are batched up to the token cap, never past it; a row larger than the cap goes alone."""
    batches = []

    def score(items):
        batches.append([item["tokens"] for item in items])
        return [float(item["tokens"]) for item in items]

    async def run():
        batcher = DynamicBatcher(score, max_rows=64, max_tokens=100, wait_s=0.05, metrics=Metrics())
        task = asyncio.create_task(batcher.run())
        sizes = [40, 40, 40, 30, 30, 150, 10]
        futures = [batcher.submit({"tokens": n}, n) for n in sizes]
        results = await asyncio.gather(*futures)
        task.cancel()
        return sizes, results

    sizes, results = asyncio.run(run())
    assert results == [float(n) for n in sizes]
    assert [n for batch in batches for n in batch] == sizes
    assert batches == [[40, 40], [40, 30, 30], [150], [10]]


def test_metrics_are_prometheus_text(vl_model, scorer):
    with ServerThread(build_app(scorer, ServerArguments(model_name_or_path=str(vl_model)))) as server:
        row = {"images": [image_data_url(noise(56, 56, 3))], "prompt": "Colour?", "response": "red"}
        httpx.post(server.url + "/score", json={"rows": [row, row]}, timeout=60)
        httpx.post(server.url + "/score", json={"rows": "nope"}, timeout=60)
        response = httpx.get(server.url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}
    assert samples["reward_server_requests_total", (("endpoint", "/score"), ("status", "200"))] == 1
    assert samples["reward_server_requests_total", (("endpoint", "/score"), ("status", "422"))] == 1
    assert samples["reward_server_rows_total", ()] == 2
    assert samples["reward_server_batch_rows_sum", ()] == 2
    assert samples["reward_server_request_seconds_count", (("endpoint", "/score"),)] == 2
