"""The data pipeline of recipes/data/build_mixture.py: adapters on fixture rows in each source's real schema, the stage 1
checks and duplicate detection, the stage 2 refinement against a local fake OpenAI-compatible server, and the stage
recipes training a step on the sets it writes."""

import importlib.util
import io
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage
from transformers import AutoProcessor
from trl import ModelConfig, RewardConfig, TrlParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipes.data import build_mixture  # noqa: E402

from collators import ConversationRenderer, PreferenceDataArguments  # noqa: E402
from recipes.data.adapters import (  # noqa: E402
    DropRow,
    llava_critic,
    load_adapter_input,
    parse_critic_verdict,
    skywork_preference,
)
from recipes.data.cleaning import (  # noqa: E402
    ImageStore,
    ingest,
    minilm_encoder,
    near_duplicates,
    pair_lengths,
    similar_earlier,
)
from recipes.data.regeneration import ChatClient, RegenerationError  # noqa: E402
from heads import RewardModelArguments, ValueHeadRewardModel  # noqa: E402

MAX_LENGTH = 400  # tokens of the tiny tokenizer; the fixture's normal pairs need ~100-200


@pytest.fixture(autouse=True)
def no_endpoint_from_the_environment(monkeypatch):
    for name in ("OPENAI_BASE_URL", "OPENAI_MODEL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def png(colour: str, size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, rows: list[dict], image_column: str | None = None) -> Path:
    dataset = Dataset.from_list(rows)
    if image_column:
        dataset = dataset.cast_column(image_column, Image())
    dataset.to_parquet(path)
    return path


# --- fixture rows in the sources' real schemas ----------------------------------------------------------------------

CRITIC_PREAMBLE = ("Given an image and a corresponding question, please serve as an unbiased and fair judge to "
                   "evaluate the quality of the answers provided by a Large Multimodal Model (LMM). Determine which "
                   "answer is better and explain your reasoning with specific details. Your task is provided as "
                   "follows:\n")


def critic_human(question: str, first: str, second: str, layout: str = "critic") -> str:
    if layout == "critic":
        return (f"<image>\n{CRITIC_PREAMBLE}Question: [{question}]\nThe first response: [{first}]\n"
                f"The second response: [{second}]\nASSISTANT:\n")
    if layout == "arena":
        return (f"<image>\n<|User Prompt|>\n{question}\n\n<|The Start of Assistant A's Answer|>\n{first}\n"
                f"<|The End of Assistant A's Answer|>\n\n<|The Start of Assistant B's Answer|>\n{second}\n"
                "<|The End of Assistant B's Answer|>")
    return (f"<image>\n[Question]\n{question}\n\n[Assistant 1]\n{first}\n\n[End of Assistant 1]\n\n[Assistant 2]\n"
            f"{second}\n\n[End of Assistant 2]\n\n[System]\nPlease rate the two answers from 1 to 10.")


def critic_row(index: int, question: str, first: str, second: str, verdict: str, layout: str = "critic",
               image: bytes | None = None) -> dict:
    return {"id": f"critic-{index}", "source": "VLFeedback",
            "conversations": [{"from": "human", "value": critic_human(question, first, second, layout)},
                              {"from": "gpt", "value": verdict}],
            "image": {"bytes": image or png("red"), "path": None}}


def skywork_row(question: str, chosen: str, rejected: str, history=()) -> dict:
    turns = [{"role": role, "content": text} for role, text in history] + [{"role": "user", "content": question}]
    return {"chosen": turns + [{"role": "assistant", "content": chosen}],
            "rejected": [dict(t) for t in turns] + [{"role": "assistant", "content": rejected}],
            "source": "magpie_ultra"}


def rlaif_row(index: int, question: str, chosen: str, rejected: str, image: bytes) -> dict:
    return {"ds_name": "RLAIF-V", "image": {"bytes": image, "path": None}, "question": question, "chosen": chosen,
            "rejected": rejected, "origin_dataset": "VQAv2", "origin_split": "train", "idx": index,
            "image_path": f"VQAv2/{index}.jpg"}


# --- LLaVA-Critic verdicts --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("judgement, better", [
    ("The first response names the fruit correctly.\nThe better response: [The first response]", "a"),
    ("Both are fluent, but only one is right.\n\nThe better response: [The second response]", "b"),
    ("The better response: [first]", "a"),
    ("Two responses are equally detailed, but the second is correct. The better response: [The second response]", "b"),
    ("Assistant A is accurate.\n\nMy final verdict is: [[A>B]]", "a"),
    ("Assistant B is much better.\n\nMy final verdict is: [[B>>A]]", "b"),
    ("8 6\nAssistant 1 describes the image precisely; Assistant 2 misses the cat.", "a"),
    ("4 9\nAssistant 2 is more complete.", "b"),
])
def test_critic_verdicts(judgement, better):
    assert parse_critic_verdict(judgement) == better


@pytest.mark.parametrize("judgement, reason", [
    ("Both describe the apple well. Two responses are equally good.", "tie"),
    ("The better response: [Both responses are equally good]", "tie"),
    ("Neither is wrong; they are equally good.", "tie"),
    ("Both are fine.\n\nMy final verdict is: [[A=B]]", "tie"),
    ("7 7\nBoth assistants are equally helpful.", "tie"),
    ("I cannot decide without more context.", "unparsable"),
])
def test_critic_ties_and_unparsable_verdicts(judgement, reason):
    with pytest.raises(DropRow) as drop:
        parse_critic_verdict(judgement)
    assert drop.value.reason == reason


@pytest.mark.parametrize("layout, verdict", [
    ("critic", "The better response: [The second response]"),
    ("arena", "Assistant B is right.\nMy final verdict is: [[B>A]]"),
    ("llava_bench", "3 8\nAssistant 2 is right."),
])
def test_critic_layouts_give_question_and_ordered_responses(layout, verdict):
    pair = llava_critic(critic_row(0, "What fruit is shown?", "A pear.", "A red apple.", verdict, layout))
    assert pair["prompt"] == [{"role": "user", "content": "What fruit is shown?"}]
    assert (pair["chosen"], pair["rejected"]) == ("A red apple.", "A pear.")
    assert pair["images"][0]["bytes"] == png("red")


def test_critic_row_without_responses_is_unparsable():
    row = critic_row(0, "q", "a", "b", "The better response: [The first response]")
    row["conversations"][0]["value"] = "<image>\nFrom 0 to 100, how good is this caption? Text Caption: a cat"
    with pytest.raises(DropRow, match="no question") as drop:
        llava_critic(row)
    assert drop.value.reason == "unparsable"


def test_skywork_conversations_split_into_prompt_and_last_turn():
    row = skywork_row("And in French?", "Bonjour.", "Hello.", history=[("user", "Say hello."), ("assistant", "Hello.")])
    pair = skywork_preference(row)
    assert [m["content"] for m in pair["prompt"]] == ["Say hello.", "Hello.", "And in French?"]
    assert (pair["chosen"], pair["rejected"], pair["images"]) == ("Bonjour.", "Hello.", [])
    row["rejected"][0]["content"] = "Say goodbye."
    with pytest.raises(DropRow, match="differ before their last turn"):
        skywork_preference(row)


def test_mmpr_meta_json_resolves_annotations_and_image_roots(tmp_path):
    root = tmp_path / "MMPR"
    (root / "images" / "scienceqa").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "images" / "scienceqa" / "q1.png").write_bytes(png("green"))
    rows = [{"image": "q1.png", "question": "<image>\nWhich colour dominates?", "chosen": "Green.", "rejected": "Red."},
            {"question": "What is 2 + 2?", "chosen": "4", "rejected": "5"}]
    (root / "annotations" / "scienceqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"scienceqa": {"root": "images/scienceqa", "annotation": "annotations/scienceqa.jsonl",
                          "data_augment": False, "repeat_time": 1, "length": 2}}
    (root / "meta.json").write_text(json.dumps(meta))
    pairs = ingest(str(root), "mmpr", ImageStore(tmp_path / "out"))
    assert [p["prompt"][0]["content"] for p in pairs] == ["Which colour dominates?", "What is 2 + 2?"]
    assert len(pairs[0]["images"]) == 1 and (tmp_path / "out" / pairs[0]["images"][0]).exists()
    assert pairs[1]["images"] == []


def test_wrong_adapter_names_the_source_and_row(tmp_path):
    path = write_parquet(tmp_path / "rlaif.parquet", [rlaif_row(0, "q", "a", "b", png("red"))], "image")
    with pytest.raises(ValueError, match=r"rlaif.parquet: row 0: KeyError.*'conversations'.*adapter"):
        ingest(str(path), "llava_critic", ImageStore(tmp_path / "out"))


def test_unknown_adapter_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown adapter 'llava'"):
        load_adapter_input("x.jsonl", "llava")


# --- stage 1 checks -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vl(tiny_checkpoints) -> Path:
    return tiny_checkpoints("qwen2_5_vl")


def test_pair_lengths_equal_the_collators(tiny_vl, tmp_path):
    """The length check counts image tokens from the image size; the collator's renderer decodes and resizes."""
    renderer = ConversationRenderer(AutoProcessor.from_pretrained(tiny_vl), max_pixels=160 * 160)
    sizes = [(40, 30), (300, 200), (1000, 60), (64, 64)]
    paths = []
    for k, size in enumerate(sizes):
        paths.append(tmp_path / f"{k}.png")
        PILImage.new("RGB", size, "blue").save(paths[-1])
    prompt = [{"role": "user", "content": "Compare the pictures."}, {"role": "assistant", "content": "Which ones?"},
              {"role": "user", "content": "All of them."}]
    rows = [{"images": [str(paths[0]), str(paths[1])], "image_sizes": [sizes[0], sizes[1]], "prompt": prompt,
             "chosen": "Both are blue.", "rejected": "The first is red and much, much larger."},
            {"images": [str(paths[2])], "image_sizes": [sizes[2]], "prompt": prompt[:1], "chosen": "Blue.",
             "rejected": "Red."},
            {"images": [str(paths[3])] * 3, "image_sizes": [sizes[3]] * 3, "prompt": prompt[:1], "chosen": "x",
             "rejected": "y"},
            {"images": [], "image_sizes": [], "prompt": prompt, "chosen": "None.", "rejected": "Three."}]
    expected = [int(renderer([{"images": row["images"], "prompt": row["prompt"], "response": row[side]}
                              for side in ("chosen", "rejected")])["attention_mask"].sum(-1).max()) for row in rows]
    assert pair_lengths(renderer, rows) == expected


def test_blocked_similarity_equals_the_full_matrix():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(50, 8)).astype(np.float32)
    for copy, original in ((7, 2), (23, 3), (41, 7)):  # near copies of earlier rows (41 of a copy)
        embeddings[copy] = embeddings[original] + 0.01
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    texts = [f"text {i}" for i in range(50)]
    lookup = {t: e for t, e in zip(texts, embeddings)}
    encode = lambda batch: np.stack([lookup[t] for t in batch])  # noqa: E731
    full = embeddings @ embeddings.T
    expected = [None] + [(int(full[i, :i].argmax()), float(full[i, :i].max())) if full[i, :i].max() >= 0.99 else None
                         for i in range(1, 50)]
    for block_size in (3, 16, 4096):
        found = similar_earlier(texts, ["same"] * 50, encode, 0.99, block_size)
        assert [m and m[0] for m in found] == [m and m[0] for m in expected]
    assert [i for i, m in enumerate(expected) if m] == [7, 23, 41]


def test_identical_prompts_need_no_embedding_and_groups_are_separate():
    def encode(batch):
        raise AssertionError(f"nothing to embed, got {batch}")

    texts, groups = ["a", "a", "b", "a"], ["img1", "img1", "img2", "img3"]
    assert similar_earlier(texts, groups, encode, 0.95) == [None, (0, 1.0), None, None]
    assert similar_earlier(texts, groups, encode, 1.01) == [None] * 4  # above 1: the check is off


@pytest.fixture(scope="module")
def minilm():
    return minilm_encoder(device="cpu")


def test_near_duplicates_need_the_same_images(minilm):
    def row(index, prompt, images):
        return {"source": "s", "row": index, "images": images, "prompt": [{"role": "user", "content": prompt}]}

    rows = [row(0, "What colour is the car in the picture?", ["images/aa/h1.png"]),
            row(1, "What color is the car in this image?", ["images/aa/h1.png"]),  # paraphrase, same image
            row(2, "What color is the car in this image?", ["images/bb/h2.png"]),  # paraphrase, other image
            row(3, "How many people are crossing the street?", ["images/aa/h1.png"]),  # other question
            row(4, "Describe the image in detail.", []),
            row(5, "Describe this image in detail.", []),  # paraphrase, both text-only
            row(6, "Write a haiku about autumn leaves.", [])]
    problems = near_duplicates(rows, minilm, 0.9)
    assert [p is not None for p in problems] == [False, True, False, False, False, True, False]
    assert problems[1][0] == "near_duplicate" and "s row 0 (the same images)" in problems[1][1]
    assert "s row 4 (no image either)" in problems[5][1]
    assert near_duplicates(rows, minilm, 0.999) == [None] * 7


def test_threshold_is_a_value_or_a_quantile():
    values = np.arange(101, dtype=float)
    assert build_mixture.threshold("q0.05", values) == 5.0
    assert build_mixture.threshold("-1.5", values) == -1.5
    assert not (values < build_mixture.threshold("-inf", values)).any()


# --- a fake OpenAI-compatible endpoint --------------------------------------------------------------------------------

REGENERATED = "A careful, correct answer."


class FakeChatHandler(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: 503 on the very first request (a retry must follow), 400 when the conversation
    says FAIL, else REGENERATED. Counts requests and the most in flight at once."""

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append(body)
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            first = len(server.requests) == 1
        time.sleep(0.02)  # overlap concurrent requests
        with server.lock:
            server.in_flight -= 1
        if self.path != "/v1/chat/completions" or self.headers.get("Authorization") != "Bearer test-key":
            return self.send_json(404, {"error": "unknown path or key"})
        if first:
            return self.send_json(503, {"error": "overloaded"})
        if "FAIL" in json.dumps(body["messages"]):
            return self.send_json(400, {"error": "content policy"})
        self.send_json(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": REGENERATED}}]})

    def send_json(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeChatHandler)
    server.requests, server.in_flight, server.max_in_flight, server.lock = [], 0, 0, threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_chat_client_retries_caps_concurrency_and_never_pays_twice(fake_endpoint, tmp_path):
    server, base_url = fake_endpoint
    client = ChatClient(base_url, "gpt-4o", "test-key", tmp_path / "cache", concurrency=2, retries=2, timeout=10,
                        backoff=0.01)
    conversations = [[{"role": "user", "content": f"Question {i}"}] for i in range(6)]
    conversations.append([{"role": "user", "content": "FAIL please"}])
    answers = client.complete_all(conversations)
    assert answers[:6] == [REGENERATED] * 6
    assert isinstance(answers[6], RegenerationError) and "HTTP 400" in str(answers[6])
    assert len(server.requests) == 8  # 7 conversations + the retry after the first 503
    assert server.max_in_flight <= 2
    assert server.requests[0]["model"] == "gpt-4o" and server.requests[0]["temperature"] == 0.0

    again = ChatClient(base_url, "gpt-4o", "test-key", tmp_path / "cache", retries=0)
    assert again.complete_all(conversations[:6]) == [REGENERATED] * 6
    assert len(server.requests) == 8  # all from the cache

    unreachable = ChatClient("http://127.0.0.1:9/v1", "m", None, tmp_path / "other", retries=1, timeout=2, backoff=0.01)
    assert isinstance(unreachable.complete_all(conversations[:1])[0], RegenerationError)


# --- the pipeline end to end ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """One file per source in its real schema; the expected drop of every crafted row is in the comment."""
    root = tmp_path_factory.mktemp("sources")
    red, blue, green, tiny = png("red"), png("blue"), png("green"), png("white", (10, 10))
    critic = [
        critic_row(0, "What fruit is on the table?", "A red apple.", "A green pear.",
                   "The first response is right.\nThe better response: [The first response]", image=red),
        critic_row(1, "How many apples are there?", "Two.", "One.", "My final verdict is: [[B>A]]", "arena", red),
        critic_row(2, "What colour is the sky?", "Blue.", "Grey.", "9 4\nAssistant 1 is right.", "llava_bench", blue),
        critic_row(3, "Is it daytime?", "Yes.", "It is day.", "Two responses are equally good.", image=blue),  # tie
        critic_row(4, "Is it raining?", "No.", "Maybe.", "Both are fine.\nMy final verdict is: [[A=B]]", "arena",
                   blue),  # tie
        critic_row(5, "Where is the cup?", "Left.", "Right.", "I am not sure.", image=green),  # unparsable
    ]
    rlaif = [
        rlaif_row(0, "what fruit is on the  table?", "A red apple.", "A green pear.", red),  # exact dup of critic 0
        rlaif_row(1, "Which object is on the table?", "An apple.", "A banana.", green),
        rlaif_row(2, "Which thing lies on the table?", "A red fruit.", "Nothing.", green),  # near dup of rlaif 1
        rlaif_row(3, "Which object is on the table?", "An apple.", "A banana.", blue),  # other image: kept
        rlaif_row(4, "Describe the picture.", "", "A cat.", blue),  # empty_response
        rlaif_row(5, "Describe the picture.", "A cat.", "A dog.", b"not an image at all"),  # corrupt_image
        rlaif_row(6, "Describe the picture.", "A cat.", "A dog.", tiny),  # tiny_image
    ]
    skywork = [
        skywork_row("Write a haiku about autumn leaves.", "Red leaves drift and fall / ...", "Autumn is a season."),
        skywork_row("Compose a haiku on the topic of autumn leaves.", "Leaves fall.", "No."),  # near dup of sky 0
        skywork_row("And in French?", "Bonjour.", "Hello.", history=[("user", "Say hello."), ("assistant", "Hello.")]),
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Yo"}],
         "source": "x"},  # unparsable: two prompts
        skywork_row("Name a prime number.", "7 is prime.", "8 is prime."),
        skywork_row("Explain the term FAIL-safe.", "A design that fails safely.", "A kind of cake."),
        skywork_row("Give me an encouraging word.", "You can do it!", REGENERATED),
    ]
    (root / "inhouse_images").mkdir()
    (root / "inhouse_images" / "chart.png").write_bytes(png("purple", (120, 90)))
    inhouse = [
        {"images": ["inhouse_images/chart.png"], "prompt": "Which bar is the tallest?", "chosen": "The left one.",
         "rejected": "The right one.", "source": "reasoning"},
        {"images": ["inhouse_images/chart.png"], "prompt": "Which bar is highest?", "chosen": "Left.",
         "rejected": "Right."},  # near dup of inhouse 0
        {"images": ["inhouse_images/missing.png"], "prompt": "What is shown?", "chosen": "A chart.",
         "rejected": "A cat."},  # missing_image
        {"images": [], "prompt": "", "chosen": "Yes.", "rejected": "No."},  # empty_prompt
        {"images": [], "prompt": "Say yes.", "chosen": "Yes.", "rejected": "  yes. "},  # identical_responses
        {"images": ["inhouse_images/chart.png"], "prompt": "Describe the chart in full detail.",
         "chosen": "The chart has bars. " * 100, "rejected": "A chart."},  # overlong
        {"images": [], "prompt": [{"role": "user", "content": "What is 12 * 12?"}],
         "chosen": [{"role": "assistant", "content": "144"}], "rejected": "124"},
    ]
    with (root / "inhouse.jsonl").open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in inhouse)
    return {
        str(write_parquet(root / "critic.parquet", critic, "image")): "llava_critic",
        str(write_parquet(root / "rlaif.parquet", rlaif, "image")): "rlaif_v",
        str(write_parquet(root / "skywork.parquet", skywork)): "skywork_preference",
        str(root / "inhouse.jsonl"): "preference",
    }


def build(sources: dict, tiny_vl: Path, output_dir: Path, **overrides) -> dict:
    argv = ["--sources", json.dumps(sources), "--output_dir", str(output_dir), "--processor", str(tiny_vl),
            "--max_length", str(MAX_LENGTH), "--near_duplicate_threshold", "0.8", "--embedding_device", "cpu"]
    for key, value in overrides.items():
        argv.append(f"--{key}={value}")  # '=' keeps argparse from reading -inf as a flag
    (args,) = TrlParser((build_mixture.BuildMixtureArguments,)).parse_args_and_config(argv)
    return build_mixture.main(args)


@pytest.fixture(scope="module")
def stage1_build(sources, tiny_vl, tmp_path_factory) -> tuple[Path, dict]:
    output_dir = tmp_path_factory.mktemp("mixture")
    return output_dir, build(sources, tiny_vl, output_dir)


def dropped(report: dict, step: str) -> dict:
    counts = {}
    for source in report["steps"][step]["sources"].values():
        for reason, n in source["dropped"].items():
            counts[reason] = counts.get(reason, 0) + n
    return counts


def test_stage1_drops_every_reason_and_counts_per_source(stage1_build, sources):
    output_dir, report = stage1_build
    assert dropped(report, "adapt") == {"tie": 2, "unparsable": 2}
    assert dropped(report, "check") == {"missing_image": 1, "corrupt_image": 1, "tiny_image": 1, "empty_prompt": 1,
                                        "empty_response": 1, "identical_responses": 1, "overlong": 1}
    assert dropped(report, "exact_duplicate") == {"exact_duplicate": 1}
    assert dropped(report, "near_duplicate") == {"near_duplicate": 3}
    critic, rlaif, skywork, inhouse = sources
    assert report["steps"]["adapt"]["sources"][critic] == {"in": 6, "out": 3, "dropped": {"tie": 2, "unparsable": 1}}
    assert report["steps"]["exact_duplicate"]["sources"][rlaif]["dropped"] == {"exact_duplicate": 1}
    examples = report["steps"]["exact_duplicate"]["examples"]["exact_duplicate"]
    assert examples == [f"{rlaif} row 0: the same pair as {critic} row 0"]
    assert "Two responses are equally good" in report["steps"]["adapt"]["examples"]["tie"][0]
    assert f"{critic} row 5: no verdict found" in report["steps"]["adapt"]["examples"]["unparsable"][0]
    saved = json.loads((output_dir / "report.json").read_text())
    assert saved["steps"] == report["steps"] and "regeneration_api_key" not in saved["arguments"]


def test_stage_sets_are_parquet_with_images_beside_them(stage1_build):
    output_dir, report = stage1_build
    stage1, stage2 = (pd.read_parquet(output_dir / f"{stage}.parquet") for stage in ("stage1", "stage2"))
    assert len(stage1) == 6 and all(len(images) == 1 for images in stage1["images"])  # 3 critic, 2 rlaif, 1 inhouse
    assert len(stage2) == 6 + 6  # plus the text pairs: skywork 0, 2, 4, 5, 6 and in-house 6
    assert (len(stage2) - len(stage1)) == sum(len(images) == 0 for images in stage2["images"])
    used = {path for images in stage2["images"] for path in images}
    assert all(not Path(path).is_absolute() and (output_dir / path).is_file() for path in used)
    assert {p.relative_to(output_dir).as_posix() for p in (output_dir / "images").glob("*/*")} == used
    assert json.loads((output_dir / "stage1_mixture.json").read_text()) == {str(output_dir / "stage1.parquet"): 1.0}
    assert report["outputs"]["stage2"]["pairs"] == len(stage2)
    multi_turn = next(prompt for prompt in stage2["prompt"] if len(prompt) == 3)
    assert [m["role"] for m in multi_turn] == ["user", "assistant", "user"]


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_one_step(recipe: str, model: Path, mixture_file: Path, output_dir: Path, *extra: str) -> Path:
    argv = ["--model_name_or_path", str(model), "--dataset_mixture", mixture_file.read_text(),
            "--output_dir", str(output_dir), "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none", "--save_strategy", "no",
            "--use_cpu", "true", "--max_length", str(MAX_LENGTH), *extra]
    parser = TrlParser((PreferenceDataArguments, RewardModelArguments, RewardConfig, ModelConfig))
    load_recipe(recipe).main(*parser.parse_args_and_config(argv))
    return output_dir


@pytest.fixture(scope="module")
def stage1_model(stage1_build, tiny_vl, tmp_path_factory) -> Path:
    """The stage 1 recipe, one step on the built stage 1 set; also the surrogate of the refinement tests."""
    output_dir, _ = stage1_build
    return train_one_step("stage1", tiny_vl, output_dir / "stage1_mixture.json", tmp_path_factory.mktemp("stage1"),
                          "--new_value_head", "true")


def test_stage_recipes_train_a_step_on_the_built_sets(stage1_build, stage1_model, tmp_path):
    output_dir, _ = stage1_build
    report = json.loads((stage1_model / "data_report.json").read_text())
    assert report[str(output_dir / "stage1.parquet")]["kept"] == 6  # the recipe's own checks drop nothing more
    stage2 = train_one_step("stage2", stage1_model, output_dir / "stage2_mixture.json", tmp_path / "stage2")
    report = json.loads((stage2 / "data_report.json").read_text())
    assert report[str(output_dir / "stage2.parquet")]["kept"] == 12
    assert (stage2 / "value_head.safetensors").exists()


def test_refine_without_endpoint_sends_flagged_pairs_to_review(sources, tiny_vl, stage1_model, tmp_path):
    report = build(sources, tiny_vl, tmp_path, surrogate_model=stage1_model, low_chosen_reward="-inf",
                   small_margin="q0.5", near_duplicate_threshold=2)
    refine = report["steps"]["refine"]
    review = [json.loads(line) for line in (tmp_path / "review.jsonl").read_text().splitlines()]
    into = sum(s["in"] for s in refine["sources"].values())
    assert refine["flagged"] == len(review) == dropped(report, "refine")["small_margin"] == into // 2
    assert all(r["chosen_reward"] - r["rejected_reward"] < refine["thresholds"]["small_margin"] for r in review)
    assert all(r["regenerated_chosen"] is None and (tmp_path / p).is_file() for r in review for p in r["images"])
    assert report["outputs"]["stage2"]["pairs"] == into - len(review)

    report = build(sources, tiny_vl, tmp_path, surrogate_model=stage1_model, low_chosen_reward="inf",
                   near_duplicate_threshold=2)
    assert dropped(report, "refine") == {"low_chosen_reward": into}  # every chosen reward is below inf


def test_refine_regenerates_flagged_answers_once(sources, tiny_vl, stage1_model, fake_endpoint, tmp_path):
    server, base_url = fake_endpoint
    endpoint = dict(surrogate_model=stage1_model, low_chosen_reward="inf", small_margin="-inf",
                    near_duplicate_threshold=2, regeneration_base_url=base_url, regeneration_api_key="test-key",
                    regeneration_model="judge-model", regeneration_concurrency=3, regeneration_backoff=0.01)
    report = build(sources, tiny_vl, tmp_path, **endpoint)
    refine = report["steps"]["refine"]
    into = sum(s["in"] for s in refine["sources"].values())
    assert refine["flagged"] == into
    # FAIL-safe: the endpoint refuses; the encouraging word: the new answer equals the rejected one.
    assert dropped(report, "refine") == {"regeneration_failed": 1, "identical_responses": 1}
    assert refine["regenerated"] == into - 2
    stage2 = pd.read_parquet(tmp_path / "stage2.parquet")
    assert set(stage2["chosen"]) == {REGENERATED}
    image_request = next(r for r in server.requests if isinstance(r["messages"][0]["content"], list))
    assert image_request["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert image_request["model"] == "judge-model"
    review = [json.loads(line) for line in (tmp_path / "review.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in review) == ["identical_responses", "regeneration_failed"]

    sent = len(server.requests)
    assert sent == into + 1  # one retry after the first 503
    build(sources, tiny_vl, tmp_path, **endpoint)
    assert len(server.requests) == sent + 1  # only the refused request is asked again: the rest is cached
