"""recipes/serve/server.py on a real uvicorn on 127.0.0.1, through a real HTTP client: the scores are RewardScorer's,
every bad input gets its 4xx naming the row and the field, and concurrent clients each get their own scores."""

import base64
import concurrent.futures
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serving_helpers import ServerThread, data_url, free_port, write_reward_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heads import RewardScorer  # noqa: E402
from recipes.serve.server import ServerArguments, build_app, chatml_messages  # noqa: E402

COLOURS = ["red", "blue", "green", "yellow"]


@pytest.fixture(scope="module")
def vl_model(tiny_checkpoints, tmp_path_factory) -> Path:
    return write_reward_model(tiny_checkpoints("qwen2_5_vl"), tmp_path_factory.mktemp("vl_rm"))


@pytest.fixture(scope="module")
def scorer(vl_model) -> RewardScorer:
    return RewardScorer.from_pretrained(str(vl_model), device="cpu")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("allowed")
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (60 + 8 * i, 50), colour).save(root / f"{colour}.png")
    return root


@pytest.fixture(scope="module")
def server(scorer, vl_model, image_root):
    args = ServerArguments(model_name_or_path=str(vl_model), allowed_image_root=str(image_root), max_body_bytes=2**20,
                           max_images_per_row=2, max_image_pixels=300 * 300, batch_wait_ms=20)
    with ServerThread(build_app(scorer, args)) as running:
        yield running


def image(colour: str, i: int = 0) -> Image.Image:
    return Image.new("RGB", (60 + 8 * i, 50), colour)


def test_score_rows_equal_the_in_process_scorer(server, scorer, image_root):
    items = [{"images": [image(c, i)], "prompt": "What colour is the shape?", "response": r}
             for i, c in enumerate(COLOURS) for r in (c, "purple")]
    items.append({"images": [], "prompt": "Is 4 even?", "response": "yes"})
    expected = scorer.score(items)
    rows = [dict(item, images=[data_url(im) for im in item["images"]]) for item in items]
    rows[0]["images"] = ["red.png"]  # a path under the allowed root is the same image
    rewards = httpx.post(server.url + "/score", json={"rows": rows}, timeout=60).json()["rewards"]
    assert rewards == pytest.approx(expected, abs=1e-5)
    assert len(set(round(r, 4) for r in rewards)) > 4  # the rows really differ

    chat = [{"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": row["images"][0] if i else data_url(image("red"))}},
                                     {"type": "text", "text": row["prompt"]}]},
        {"role": "assistant", "content": row["response"]}]} for i, row in enumerate(rows[:-1])]
    rewards = httpx.post(server.url + "/score", json={"rows": chat}, timeout=60).json()["rewards"]
    assert rewards == pytest.approx(expected[:-1], abs=1e-5)


def test_get_reward_speaks_openrlhf_with_images(server, scorer):
    prompt = "What colour is the shape?"
    items = [{"images": [image(c)], "prompt": prompt, "response": r} for c in ("red", "blue") for r in ("red", "blue")]
    expected = scorer.score(items)
    tokenizer = scorer.renderer.tokenizer
    queries = [tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
         {"role": "assistant", "content": [{"type": "text", "text": item["response"]}]}], tokenize=False) for item in items]
    body = {"query": queries, "prompts": [prompt] * 4, "labels": [""] * 4,
            "images": [[data_url(item["images"][0])] for item in items]}
    answer = httpx.post(server.url + "/get_reward", json=body, timeout=60).json()
    assert answer["rewards"] == pytest.approx(expected, abs=1e-5)
    assert answer["scores"] == answer["rewards"] and "extra_logs" in answer

    text_items = [{"images": [], "prompt": "Is 4 even? ", "response": r} for r in ("yes", "no")]
    body = {"query": [item["prompt"] + item["response"] for item in text_items], "prompts": ["Is 4 even? "] * 2}
    answer = httpx.post(server.url + "/get_reward", json=body, timeout=60).json()
    assert answer["rewards"] == pytest.approx(scorer.score(text_items), abs=1e-5)


def test_chatml_queries_become_messages():
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|>"
            "<|vision_end|>Colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n")
    assert chatml_messages(text) == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]


def bad_requests(image_root: Path) -> list:
    """(name, endpoint, body as bytes or JSON, expected status, expected row, expected field)."""
    red = data_url(image("red"))
    ok = {"prompt": "Colour?", "response": "red", "images": [red]}
    big = data_url(Image.new("RGB", (400, 400), "red"))
    outside = image_root.parent / "outside.png"
    image("red").save(outside)
    return [
        ("malformed JSON", "/score", b'{"rows": [', 400, None, "body"),
        ("not an object", "/score", [1, 2], 422, None, "body"),
        ("missing rows", "/score", {"row": []}, 422, None, "rows"),
        ("rows not a list", "/score", {"rows": "x"}, 422, None, "rows"),
        ("missing response", "/score", {"rows": [ok, {"prompt": "Colour?", "images": []}]}, 422, 1, "response"),
        ("prompt of a wrong type", "/score", {"rows": [ok, ok, {"prompt": 3, "response": "x"}]}, 422, 2, "prompt"),
        ("images not a list", "/score", {"rows": [dict(ok, images="red.png")]}, 422, 0, "images"),
        ("undecodable image", "/score", {"rows": [ok, dict(ok, images=["data:image/png;base64," + base64.b64encode(b"nope").decode()])]},
         422, 1, "images[0]"),
        ("invalid base64", "/score", {"rows": [dict(ok, images=["data:image/png;base64,@@@"])]}, 422, 0, "images[0]"),
        ("oversized image", "/score", {"rows": [ok, dict(ok, images=[big])]}, 422, 1, "images[0]"),
        ("too many images", "/score", {"rows": [dict(ok, images=[red] * 3)]}, 422, 0, "images"),
        ("path outside the root", "/score", {"rows": [dict(ok, images=[str(outside)])]}, 422, 0, "images[0]"),
        ("path escaping the root", "/score", {"rows": [dict(ok, images=["../outside.png"])]}, 422, 0, "images[0]"),
        ("remote URL", "/score", {"rows": [dict(ok, images=["https://example.com/a.png"])]}, 422, 0, "images[0]"),
        ("placeholder without image", "/score", {"rows": [{"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "red"}]}]}, 422, 0, "images"),
        ("chat without response", "/score", {"rows": [{"messages": [{"role": "user", "content": "hi"}]}]}, 422, 0, "messages"),
        ("bad message part", "/score", {"rows": [{"messages": [{"role": "user", "content": [{"type": "audio"}]},
                                                               {"role": "assistant", "content": "x"}]}]},
         422, 0, "messages[0].content[0]"),
        ("body too large", "/score", {"rows": [dict(ok, response="x" * 2**20)]}, 413, None, "body"),
        ("query not a string", "/get_reward", {"query": ["a", 5], "prompts": ["a", "b"]}, 422, 1, "query"),
        ("query without its prompt", "/get_reward", {"query": ["hello"], "prompts": ["bye"]}, 422, 0, "prompts"),
        ("plain query, no prompts", "/get_reward", {"query": ["hello"]}, 422, 0, "prompts"),
        ("prompts of another length", "/get_reward", {"query": ["ab", "cd"], "prompts": ["a"]}, 422, None, "prompts"),
    ]


def test_bad_inputs_get_a_4xx_naming_row_and_field_and_the_server_keeps_serving(server, image_root):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for name, endpoint, body, status, row, field in bad_requests(image_root):
            if isinstance(body, bytes):
                response = client.post(endpoint, content=body, headers={"content-type": "application/json"})
            else:
                response = client.post(endpoint, json=body)
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert (error["row"], error["field"]) == (row, field), (name, error)
            assert error["message"]
        assert client.get("/health").json()["status"] == "ok"
        good = client.post("/score", json={"rows": [{"prompt": "Colour?", "response": "red", "images": [data_url(image("red"))]}]})
        assert good.status_code == 200 and len(good.json()["rewards"]) == 1
        metrics = client.get("/metrics").text
    assert 'reward_server_requests_total{endpoint="/score",status="422"}' in metrics
    assert "reward_server_batch_rows_count" in metrics and "reward_server_request_seconds_bucket" in metrics


def test_text_only_model_refuses_images_and_api_key_is_enforced(tiny_checkpoints, tmp_path):
    model = write_reward_model(tiny_checkpoints("qwen2"), tmp_path / "text_rm")
    text_scorer = RewardScorer.from_pretrained(str(model), device="cpu")
    args = ServerArguments(model_name_or_path=str(model), api_key="secret")
    row = {"prompt": "Is 4 even?", "response": "yes"}
    with ServerThread(build_app(text_scorer, args)) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        assert client.post("/score", json={"rows": [row]}).status_code == 401
        auth = {"authorization": "Bearer secret"}
        refused = client.post("/score", json={"rows": [row, dict(row, images=[data_url(image("red"))])]}, headers=auth)
        assert refused.status_code == 422
        assert (refused.json()["error"]["row"], refused.json()["error"]["field"]) == (1, "images")
        rewards = client.post("/score", json={"rows": [row]}, headers=auth).json()["rewards"]
    assert rewards == pytest.approx(text_scorer.score([dict(row, images=[])]), abs=1e-5)


def test_concurrent_clients_each_get_their_own_scores(server, scorer):
    """32 clients for a few seconds: no request is lost, each answer is the caller's, and requests share batches."""
    prompts = [f"How many shapes are there? {n}" for n in range(8)]
    responses = ["one", "two", "three", "four"]
    catalogue = [{"images": [image(COLOURS[p % 4], p)], "prompt": prompts[p], "response": r}
                 for p in range(len(prompts)) for r in responses]
    expected = scorer.score(catalogue)
    encoded = [dict(item, images=[data_url(item["images"][0])]) for item in catalogue]
    before = metrics_value(server.url, "reward_server_batch_rows_count")

    def client(c: int) -> int:
        done = 0
        with httpx.Client(base_url=server.url, timeout=120) as http:
            deadline = time.time() + 3
            while time.time() < deadline:
                picks = [(c * 7 + done * 3 + k) % len(catalogue) for k in range(1 + c % 3)]
                rewards = http.post("/score", json={"rows": [encoded[i] for i in picks]}).json()["rewards"]
                assert rewards == pytest.approx([expected[i] for i in picks], abs=1e-5)
                done += 1
        return done

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        counts = list(pool.map(client, range(32)))
    assert all(count >= 1 for count in counts)
    requests = sum(counts)
    batches = metrics_value(server.url, "reward_server_batch_rows_count") - before
    assert batches < requests  # concurrent requests were batched together


def metrics_value(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_command_line_serves_a_model_directory(vl_model, scorer):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "recipes/serve/server.py"), "--model_name_or_path", str(vl_model),
                                "--port", str(port)], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.time() < deadline, process.stdout.read() if process.poll() is not None else "timeout"
            time.sleep(0.25)
        item = {"images": [], "prompt": "Is 4 even?", "response": "yes"}
        rewards = httpx.post(f"http://127.0.0.1:{port}/score", json={"rows": [item]}, timeout=60).json()["rewards"]
        assert rewards == pytest.approx(scorer.score([item]), abs=1e-5)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_request_past_its_timeout_gets_504_and_the_server_goes_on(scorer, vl_model):
    args = ServerArguments(model_name_or_path=str(vl_model), request_timeout_s=1e-4)
    row = {"prompt": "Is 4 even?", "response": "yes"}
    with ServerThread(build_app(scorer, args)) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        late = client.post("/score", json={"rows": [row] * 16})
        assert late.status_code == 504 and late.json()["error"]["field"] == "request"
        assert client.get("/health").json()["status"] == "ok"


class FailingScorer:
    """The real scorer, except that a batch holding the response "boom" raises (a row no check could foresee)."""

    def __init__(self, scorer):
        self.scorer, self.renderer = scorer, scorer.renderer

    def score(self, items):
        if any(item["response"] == "boom" for item in items):
            raise RuntimeError("boom")
        return self.scorer.score(items)


def test_a_row_the_model_fails_on_fails_only_its_own_request(scorer, vl_model):
    args = ServerArguments(model_name_or_path=str(vl_model), batch_wait_ms=200)  # both requests land in one batch
    good, bad = {"prompt": "Is 4 even?", "response": "yes"}, {"prompt": "Is 4 even?", "response": "boom"}
    with ServerThread(build_app(FailingScorer(scorer), args)) as running:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda row: httpx.post(running.url + "/score", json={"rows": [row]}, timeout=60),
                                    [good, bad]))
        assert answers[0].status_code == 200
        assert answers[0].json()["rewards"] == pytest.approx(scorer.score([dict(good, images=[])]), abs=1e-5)
        assert answers[1].status_code == 500 and "boom" in answers[1].json()["error"]["message"]
        assert metrics_value(running.url, "reward_server_batch_rows_count") >= 1
