"""recipes/serve/server.py on a real uvicorn on 127.0.0.1, through a real HTTP client: the scores are RewardScorer's,
every bad input gets its 4xx naming the row and the field, and concurrent clients each get their own scores."""

import base64
import concurrent.futures
import contextlib
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image
from serving_helpers import ServerThread, free_port, write_reward_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heads import RewardScorer  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from recipes.serve.rl_rewards import image_data_url  # noqa: E402
from recipes.serve.server import ServerArguments, build_app, chatml_messages  # noqa: E402

COLOURS = ["red", "blue", "green", "yellow"]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("allowed")
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (60 + 8 * i, 50), colour).save(root / f"{colour}.png")
    outside = root.parent / "outside.png"
    image("red").save(outside)
    (root / "link_out.png").symlink_to(outside)
    (root / "link_in.png").symlink_to(root / "red.png")
    os.mkfifo(root / "fifo.png")  # opening it for reading would wait for a writer
    return root


@pytest.fixture(scope="module")
def server(scorer, vl_model, image_root):
    args = ServerArguments(model_name_or_path=str(vl_model), allowed_image_root=str(image_root), max_body_bytes=2**20,
                           max_images_per_row=2, max_image_pixels=300 * 300, max_request_pixels=180_000,
                           max_body_values=10_000, max_row_tokens=300, max_rows_per_request=64, batch_wait_ms=20)
    with ServerThread(build_app(scorer, args), args) as running:
        yield running


def image(colour: str, i: int = 0) -> Image.Image:
    return Image.new("RGB", (60 + 8 * i, 50), colour)


def bytes_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A black 1-bit PNG: a few KB that decode to width x height bytes (three times that in RGB)."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def lying_ico(png: bytes) -> bytes:
    """An ICO whose directory says 16x16 and whose one frame is `png`, of any size."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png


def test_score_rows_equal_the_in_process_scorer(server, scorer, image_root):
    items = [{"images": [image(c, i)], "prompt": "What colour is the shape?", "response": r}
             for i, c in enumerate(COLOURS) for r in (c, "purple")]
    items.append({"images": [], "prompt": "Is 4 even?", "response": "yes"})
    expected = scorer.score(items)
    rows = [dict(item, images=[image_data_url(im) for im in item["images"]]) for item in items]
    rows[0]["images"], rows[1]["images"] = ["red.png"], ["link_in.png"]  # paths under the allowed root (a link too)
    rewards = httpx.post(server.url + "/score", json={"rows": rows}, timeout=60).json()["rewards"]
    assert rewards == pytest.approx(expected, abs=1e-5)
    assert len(set(round(r, 4) for r in rewards)) > 4  # the rows really differ

    chat = [{"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": row["images"][0] if i else image_data_url(image("red"))}},
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
            "images": [[image_data_url(item["images"][0])] for item in items]}
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
    red = image_data_url(image("red"))
    ok = {"prompt": "Colour?", "response": "red", "images": [red]}
    big = image_data_url(Image.new("RGB", (400, 400), "red"))
    budget = image_data_url(Image.new("RGB", (300, 250), "red"))  # 75,000 pixels: two fit the request's budget, not three
    outside = image_root.parent / "outside.png"
    chat = lambda text: {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "red"}]}  # noqa: E731
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
        ("body of too many JSON values", "/score", {"rows": [0] * 20_000}, 413, None, "body"),
        ("too many rows", "/score", {"rows": [{"prompt": "a", "response": "b"}] * 65}, 413, None, "rows"),
        ("too many queries", "/get_reward", {"query": ["ab"] * 65, "prompts": ["a"] * 65}, 413, None, "query"),
        ("query not a string", "/get_reward", {"query": ["a", 5], "prompts": ["a", "b"]}, 422, 1, "query"),
        ("query without its prompt", "/get_reward", {"query": ["hello"], "prompts": ["bye"]}, 422, 0, "prompts"),
        ("plain query, no prompts", "/get_reward", {"query": ["hello"]}, 422, 0, "prompts"),
        ("prompts of another length", "/get_reward", {"query": ["ab", "cd"], "prompts": ["a"]}, 422, None, "prompts"),
        ("JSON nested 100,000 deep", "/score", b'{"rows": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, "body"),
        ("not UTF-8", "/score", b'{"rows": [{"prompt": "\xff", "response": "x"}]}', 400, None, "body"),
        ("lone surrogate", "/score", b'{"rows": [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": "\\ud800"}]}',
         422, 1, "response"),
        ("NUL byte in an image path", "/score", {"rows": [dict(ok, images=["red\x00.png"])]}, 422, 0, "images[0]"),
        ("symlink out of the root", "/score", {"rows": [dict(ok, images=["link_out.png"])]}, 422, 0, "images[0]"),
        ("FIFO under the root", "/score", {"rows": [dict(ok, images=["fifo.png"])]}, 422, 0, "images[0]"),
        ("missing file", "/score", {"rows": [dict(ok, images=["missing.png"])]}, 422, 0, "images[0]"),
        ("PNG bomb", "/score", {"rows": [dict(ok, images=[bytes_url(bomb_png(12000, 12000))])]}, 422, 0, "images[0]"),
        ("ICO whose header lies", "/score",
         {"rows": [dict(ok, images=[bytes_url(lying_ico(bomb_png(12000, 12000)), "x-icon")])]}, 422, 0, "images[0]"),
        ("ICO a little past the limit", "/score",
         {"rows": [dict(ok, images=[red, bytes_url(lying_ico(bomb_png(301, 300)), "x-icon")])]}, 422, 0, "images[1]"),
        ("image of 60000x1 pixels", "/score", {"rows": [ok, dict(ok, images=[bytes_url(bomb_png(60000, 1))])]}, 422, 1, "images[0]"),
        ("EPS (Pillow would run Ghostscript)", "/score",
         {"rows": [dict(ok, images=[bytes_url(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "eps")])]},
         422, 0, "images[0]"),
        ("request past its pixel budget", "/score", {"rows": [dict(ok, images=[budget] * 2), dict(ok, images=[budget])]},
         413, 1, "images[0]"),
        ("row past its token limit", "/score", {"rows": [ok, dict(ok, response="red " * 25_000)]}, 413, 1, "response"),
        ("image token typed in a response", "/score", {"rows": [ok, dict(ok, response="<|image_pad|> red")]}, 422, 1, "response"),
        ("vision start typed in a prompt", "/score", {"rows": [dict(ok, prompt="<|vision_start|>Colour?")]}, 422, 0, "prompt"),
        ("video token in a chat message", "/score", {"rows": [chat("<|video_pad|> Colour?")]}, 422, 0, "messages"),
        ("video span in a ChatML query", "/get_reward", {"query": [
            "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"]},
         422, 0, "query"),
        ("image token in a plain query", "/get_reward", {"query": ["Colour? <|image_pad|>red"], "prompts": ["Colour? "]},
         422, 0, "query"),
    ]


# The limit some refusals must name.
MESSAGES = {"oversized image": "--max_image_pixels", "PNG bomb": "--max_image_pixels", "ICO whose header lies": "--max_image_pixels",
            "request past its pixel budget": "--max_request_pixels", "row past its token limit": "--max_row_tokens",
            "EPS (Pillow would run Ghostscript)": "UnidentifiedImageError"}  # not even opened


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
            assert error["message"] and str(image_root) not in response.text and str(ROOT) not in response.text, name
            assert MESSAGES.get(name, "") in error["message"], (name, error)
        assert client.get("/health").json()["status"] == "ok"
        good = client.post("/score", json={"rows": [{"prompt": "Colour?", "response": "red", "images": [image_data_url(image("red"))]}]})
        assert good.status_code == 200 and len(good.json()["rewards"]) == 1
        metrics = client.get("/metrics").text
    assert 'reward_server_requests_total{endpoint="/score",status="422"}' in metrics
    assert "reward_server_batch_rows_count" in metrics and "reward_server_request_seconds_bucket" in metrics


def test_text_only_model_refuses_images_and_api_key_is_enforced(tiny_checkpoints, tmp_path):
    model = write_reward_model(tiny_checkpoints("qwen2"), tmp_path / "text_rm")
    text_scorer = RewardScorer.from_pretrained(str(model), device="cpu")
    args = ServerArguments(model_name_or_path=str(model), api_key="secret")
    row = {"prompt": "Is 4 even?", "response": "yes"}
    with ServerThread(build_app(text_scorer, args), args) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        assert client.post("/score", json={"rows": [row]}).status_code == 401
        assert client.get("/health").json() == {"status": "ok"}  # liveness only: nothing about the model
        assert client.get("/metrics").status_code == 401
        assert all(client.get(path).status_code == 404 for path in ("/openapi.json", "/docs", "/redoc"))
        auth = {"authorization": "Bearer secret"}
        assert client.get("/health", headers=auth).json()["model"] == str(model)
        refused = client.post("/score", json={"rows": [row, dict(row, images=[image_data_url(image("red"))])]}, headers=auth)
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
    encoded = [dict(item, images=[image_data_url(item["images"][0])]) for item in catalogue]
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


@contextlib.contextmanager
def command_line_server(model: Path, log: Path, *flags: str):
    """recipes/serve/server.py as a user starts it, in its own process; yields (process, url) once /health answers."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "recipes/serve/server.py"), "--model_name_or_path", str(model),
                                    "--port", str(port), *flags], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.25)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def stop_mid_scoring(process, url: str, stop: signal.Signals):
    """Sends `stop` while the scorer is busy with a request of tens of seconds: the server exits within seconds and the
    request is never answered as if scored."""
    text = " ".join(f"word{j}" for j in range(600))  # ~3,000 tokens
    rows = [{"prompt": f"Question {i}?", "response": text} for i in range(1024)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(httpx.post, url + "/score", json={"rows": rows}, timeout=300)
        wait_for(lambda: metrics_value(url, "reward_server_queued_rows") == 1024, "the long request in the queue", 60)
        time.sleep(2)  # its rows validated and in the scorer
        process.send_signal(stop)
        start = time.time()
        process.wait(timeout=30)
        assert time.time() - start < 20, f"{stop!r} took {time.time() - start:.1f} s"
        with pytest.raises(httpx.HTTPError):
            long.result().raise_for_status()


LONG_REQUESTS = ["--max_batch_rows", "1024", "--max_batch_tokens", str(10**8), "--max_row_tokens", "4096", "--batch_size", "64"]


def test_command_line_serves_a_model_directory_and_ctrl_c_stops_it_mid_scoring(vl_model, scorer, tmp_path):
    with command_line_server(vl_model, tmp_path / "server.log", *LONG_REQUESTS) as (process, url):
        item = {"images": [], "prompt": "Is 4 even?", "response": "yes"}
        rewards = httpx.post(url + "/score", json={"rows": [item]}, timeout=60).json()["rewards"]
        assert rewards == pytest.approx(scorer.score([item]), abs=1e-5)
        stop_mid_scoring(process, url, signal.SIGINT)  # the scorer's thread must not hold up the exit


def test_a_request_past_its_timeout_gets_504_and_the_server_goes_on(scorer, vl_model):
    args = ServerArguments(model_name_or_path=str(vl_model), request_timeout_s=1e-4)
    row = {"prompt": "Is 4 even?", "response": "yes"}
    with ServerThread(build_app(scorer, args), args) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        late = client.post("/score", json={"rows": [row] * 16})
        assert late.status_code == 504 and late.json()["error"]["field"] == "request"
        assert client.get("/health").json()["status"] == "ok"


class FailingScorer:
    """The real scorer, except that a batch holding the response "boom" raises (a row no check could foresee); counts
    its calls."""

    def __init__(self, scorer):
        self.scorer, self.renderer, self.model = scorer, scorer.renderer, scorer.model
        self.calls = 0

    def score(self, items):
        self.calls += 1
        if any(item["response"] == "boom" for item in items):
            raise RuntimeError(f"boom in {ROOT}")
        return self.scorer.score(items)


def test_a_row_the_model_fails_on_fails_alone_and_its_batch_is_bisected(scorer, vl_model):
    """16 one-row requests in one batch, one of which the model fails on: the other 15 get their scores, the failing
    one a 500 naming its row (and no server path), in about 2 log2(16) scorer calls instead of 16 one-row retries."""
    args = ServerArguments(model_name_or_path=str(vl_model), batch_wait_ms=500)
    failing = FailingScorer(scorer)
    rows = [{"prompt": "Is 4 even?", "response": f"yes {i}"} for i in range(15)]
    rows.insert(9, {"prompt": "Is 4 even?", "response": "boom"})
    with ServerThread(build_app(failing, args), args) as running:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda row: httpx.post(running.url + "/score", json={"rows": [row]}, timeout=60), rows))
    expected = scorer.score([dict(row, images=[]) for row in rows if row["response"] != "boom"])
    assert [a.json()["rewards"][0] for a in answers if a.status_code == 200] == pytest.approx(expected, abs=1e-5)
    failed = answers[9]
    assert failed.status_code == 500 and (failed.json()["error"]["row"], failed.json()["error"]["field"]) == (0, "request")
    assert str(ROOT) not in failed.text
    assert failing.calls <= 2 * math.ceil(math.log2(16)) + 2, failing.calls  # row by row would take 17


class GatedScorer:
    """The real scorer, holding each batch until `gate` is set; records the responses it is given."""

    def __init__(self, scorer):
        self.scorer, self.renderer, self.model = scorer, scorer.renderer, scorer.model
        self.gate, self.seen = threading.Event(), []

    def score(self, items):
        self.seen += [item["response"] for item in items]
        assert self.gate.wait(60)
        return self.scorer.score(items)


def wait_for(condition, what: str, timeout: float = 20):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_full_queue_answers_503_and_a_client_that_hangs_up_leaves_the_queue(scorer, vl_model):
    args = ServerArguments(model_name_or_path=str(vl_model), max_queued_rows=4, batch_wait_ms=1)
    gated = GatedScorer(scorer)
    rows = [{"prompt": "Is 4 even?", "response": r} for r in ("yes", "no", "maybe")]
    with ServerThread(build_app(gated, args), args) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        queued = lambda: metrics_value(running.url, "reward_server_queued_rows")  # noqa: E731
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/score", json={"rows": rows})
            wait_for(lambda: len(gated.seen) == 3, "the first request in the scorer")
            full = client.post("/score", json={"rows": rows[:2]})  # 3 + 2 rows > 4
            assert full.status_code == 503 and full.json()["error"]["field"] == "request"

            with pytest.raises(httpx.ReadTimeout):  # this client gives up and hangs up while its row waits
                httpx.post(running.url + "/score", json={"rows": [{"prompt": "Is 4 even?", "response": "gone"}]}, timeout=1)
            wait_for(lambda: queued() == 3, "the abandoned row to leave the queue")
            gated.gate.set()
            assert first.result().json()["rewards"] == pytest.approx(scorer.score([dict(r, images=[]) for r in rows]), abs=1e-5)
        wait_for(lambda: queued() == 0, "an empty queue")
        assert client.post("/score", json={"rows": rows[:1]}).status_code == 200
    assert "gone" not in gated.seen


def test_the_row_token_limit_counts_text_and_image_tokens_and_defaults_to_the_training_max_length(
        scorer, vl_model, tiny_checkpoints, tmp_path):
    row = {"images": [image("red", 3)], "prompt": "What colour is the shape?", "response": "red"}
    length = scorer.renderer([row])["input_ids"].shape[1]  # what the model would be given
    body = {"rows": [dict(row, images=[image_data_url(row["images"][0])])]}
    for limit, status in ((length, 200), (length - 1, 413)):
        args = ServerArguments(model_name_or_path=str(vl_model), max_row_tokens=limit)
        with ServerThread(build_app(scorer, args), args) as running:
            answer = httpx.post(running.url + "/score", json=body, timeout=60)
        assert answer.status_code == status, (limit, answer.text)
        if status == 413:
            assert (answer.json()["error"]["row"], answer.json()["error"]["field"]) == (0, "images")

    # Without --max_row_tokens: the tokenizer's model_max_length, which the stage scripts set to the training max_length.
    model = write_reward_model(tiny_checkpoints("qwen2_5_vl"), tmp_path / "rm")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.model_max_length = length - 1
    tokenizer.save_pretrained(model)
    saved = RewardScorer.from_pretrained(str(model), device="cpu")
    args = ServerArguments(model_name_or_path=str(model))
    with ServerThread(build_app(saved, args), args) as running:
        assert httpx.post(running.url + "/score", json=body, timeout=60).status_code == 413
        body["rows"][0]["images"] = []
        assert httpx.post(running.url + "/score", json=body, timeout=60).status_code == 200


def http(port: int, data: bytes = b"", wait: float = 10) -> bytes:
    """Everything the server sends on a connection where the client sent `data` and nothing more (b"" if the server
    closed it without a word); raises TimeoutError if the server keeps the connection open for `wait` seconds."""
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(data)
        connection.settimeout(wait)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        return received


def test_slow_idle_and_oversized_clients_are_cut_off(scorer, vl_model):
    args = ServerArguments(model_name_or_path=str(vl_model), header_timeout_s=1, body_timeout_s=2, limit_concurrency=8,
                           max_body_bytes=2**20, timeout_keep_alive=30)
    with ServerThread(build_app(scorer, args), args) as running:
        port = running.port
        assert http(port) == b""  # connected, sent nothing: closed
        assert http(port, b"POST /score HTTP/1.1\r\nHost: x\r\n") == b""  # headers never finished: closed
        # The same deadline after a first response on a kept-alive connection:
        answer = http(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nPOST /score HTTP/1.1\r\nHost: x\r\n")
        assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1
        # ... counted from that response, when the connection was busy as the first deadline passed:
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{")
            time.sleep(1.5)  # past the header deadline, in the middle of the body
            connection.sendall(b"}POST /score HTTP/1.1\r\nHost: x\r\n")
            connection.settimeout(10)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 422") and answer.count(b"HTTP/1.1") == 1
        # A body that trickles in: 408 once the body deadline passes.
        trickle = http(port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"rows\"")
        assert trickle.startswith(b"HTTP/1.1 408"), trickle
        # A declared body past the limit is refused before a byte of it is read.
        huge = http(port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n", wait=5)
        assert huge.startswith(b"HTTP/1.1 413"), huge

        # uvicorn's connection limit: with 8 connections open, a request gets 503; once the idle ones are cut off, 200.
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        try:
            assert httpx.get(running.url + "/health").status_code == 503
            wait_for(lambda: httpx.get(running.url + "/health").status_code == 200, "the idle connections to be closed", 10)
        finally:
            for connection in idle:
                connection.close()


SWAP = """
import os, sys
root = sys.argv[1]
while True:  # swap.png: a link to inside.png, then to link.png (outside the root), and so on, as fast as possible
    for source in ("link.png", "inside.png"):
        os.symlink(source, os.path.join(root, "next.png"))
        os.replace(os.path.join(root, "next.png"), os.path.join(root, "swap.png"))
"""


def test_a_symlink_swapped_in_under_the_root_never_reads_outside(scorer, vl_model, tmp_path):
    """Another process swaps a file under the root, over and over, with a symlink to a file outside: every answer is
    the inside image's score or a 422, never the outside image's (the file checked is the file opened)."""
    root, outside = tmp_path / "root", tmp_path / "outside.png"
    root.mkdir()
    image("red").save(root / "inside.png")
    image("blue").save(outside)
    (root / "link.png").symlink_to(outside)
    (root / "swap.png").symlink_to(root / "inside.png")
    row = {"prompt": "What colour is the shape?", "response": "red"}
    inside_score, outside_score = scorer.score([dict(row, images=[image("red")]), dict(row, images=[image("blue")])])
    assert abs(inside_score - outside_score) > 1e-3
    args = ServerArguments(model_name_or_path=str(vl_model), allowed_image_root=str(root), batch_wait_ms=1)
    with ServerThread(build_app(scorer, args), args) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        swapper = subprocess.Popen([sys.executable, "-c", SWAP, str(root)])
        try:
            answers = [client.post("/score", json={"rows": [dict(row, images=["swap.png"])] * 8}) for _ in range(40)]
        finally:
            swapper.kill()
            swapper.wait()
    scores = [r for answer in answers if answer.status_code == 200 for r in answer.json()["rewards"]]
    refused = sum(answer.status_code == 422 for answer in answers)
    assert scores and refused and refused + len(scores) // 8 == len(answers)
    assert scores == pytest.approx([inside_score] * len(scores), abs=1e-5)


PROBE = """
import json, select, sys, time, http.client, psutil
port, server = int(sys.argv[1]), psutil.Process(int(sys.argv[2]))
latencies, rss = [], []
connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0.05)[0]:  # every 50 ms until stdin closes
    start = time.perf_counter()
    connection.request("GET", "/health")
    response = connection.getresponse()
    response.read()
    assert response.status == 200, response.status
    latencies.append(time.perf_counter() - start)
    rss.append(server.memory_info().rss)
print(json.dumps({"latencies": latencies, "rss": rss}))
"""


def test_stress_good_clients_get_their_scores_amid_garbage_bombs_and_giant_rows(vl_model, scorer, tmp_path):
    """The command-line server under 64 good clients and garbage at once (slow and idle connections, malformed JSON,
    a body of 4 M values, a PNG bomb, an ICO whose header lies, giant rows, clients that hang up): every good client gets
    the in-process scores, the server's resident memory stays bounded, /health answers within a second throughout,
    and SIGTERM then stops it within seconds while it scores."""
    # The bombs fit Pillow's default limit (it only warns up to 179 M pixels) and the request's pixel budget: only
    # --max_image_pixels stands between them and 412 MiB of RGB each.
    flags = ["--max_image_pixels", str(2048 * 2048), "--max_request_pixels", str(2**30), "--header_timeout_s", "2",
             "--max_row_tokens", "4096", *LONG_REQUESTS[:4]]
    catalogue = [{"images": [image(COLOURS[i % 4], i)], "prompt": f"What colour is shape {i % 4}?", "response": r}
                 for i in range(8) for r in ("red", "blue")]
    expected = scorer.score(catalogue)
    encoded = [dict(item, images=[image_data_url(item["images"][0])]) for item in catalogue]
    frame = bomb_png(12000, 12000)  # 18 KB; 137 MiB decoded, 412 MiB in RGB
    bomb = {"rows": [dict(encoded[0], images=[bytes_url(frame)])]}
    ico = {"rows": [dict(encoded[0], images=[bytes_url(lying_ico(frame), "x-icon")])]}
    giant = {"rows": [encoded[0], dict(encoded[1], response="red " * 100_000)]}

    with command_line_server(vl_model, tmp_path / "server.log", *flags) as (process, url):
        port = int(url.rsplit(":", 1)[1])
        assert httpx.post(url + "/score", json={"rows": encoded}, timeout=60).json()["rewards"] == pytest.approx(expected, abs=1e-4)
        baseline = psutil.Process(process.pid).memory_info().rss
        def good(c: int) -> bool:
            with httpx.Client(base_url=url, timeout=120) as client:
                for n in range(2):
                    picks = [(c * 5 + n * 3 + k) % len(catalogue) for k in range(1 + (c + n) % 3)]
                    rewards = client.post("/score", json={"rows": [encoded[i] for i in picks]}).json()["rewards"]
                    assert rewards == pytest.approx([expected[i] for i in picks], abs=1e-4)
            return True

        def status_of(body) -> int:
            if isinstance(body, bytes):
                return httpx.post(url + "/score", content=body, timeout=60).status_code
            return httpx.post(url + "/score", json=body, timeout=60).status_code

        def hang_up() -> str:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/score", json={"rows": encoded * 16}, timeout=0.2)
            return "hung up"

        garbage = [
            (lambda: http(port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Le"), b""),  # slow headers: closed
            (lambda: http(port), b""),  # idle: closed
            (lambda: http(port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 900000000\r\n\r\n")[:12], b"HTTP/1.1 413"),
            (lambda: status_of(b'{"rows": ' + b"[" * 100_000), 400),
            (lambda: status_of(b'{"rows": [{"prompt": "\\ud800", "response": "x"}]}'), 422),
            (lambda: status_of(bomb), 422),
            (lambda: status_of(ico), 422),
            (lambda: status_of(giant), 413),
            (lambda: status_of(b'{"rows": [' + b"{}," * 4_000_000 + b"{}]}"), 413),  # 12 MB that would parse to 4 M dicts
            (hang_up, "hung up"),
        ]
        # /health and the server's memory are probed from a process of their own, so that the clients' work in this
        # one does not slow the probe down.
        probe = subprocess.Popen([sys.executable, "-c", PROBE, str(port), str(process.pid)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        assert probe.stdout.readline() == "ready\n"
        try:
            with concurrent.futures.ThreadPoolExecutor(64 + 2 * len(garbage)) as pool:
                bad = [(pool.submit(call), want) for call, want in garbage * 2]
                goods = [pool.submit(good, c) for c in range(64)]
                concurrent.futures.wait(goods + [future for future, _ in bad])
        finally:
            probed = json.loads(probe.communicate("", timeout=60)[0])
        latencies, memory = probed["latencies"], probed["rss"]
        print(f"/health: {len(latencies)} probes, slowest {max(latencies):.3f} s; "
              f"server RSS {baseline / 2**20:.0f} MiB, peak +{(max(memory) - baseline) / 2**20:.0f} MiB")
        assert len(latencies) > 20 and max(latencies) < 1.0
        # A bomb decoded would take 137 MiB, 412 MiB in RGB; the good load needs about 120 MiB.
        assert max(memory) - baseline < 200 * 2**20
        assert all(future.result() for future in goods)
        assert [future.result() for future, _ in bad] == [want for _, want in bad]
        stop_mid_scoring(process, url, signal.SIGTERM)
