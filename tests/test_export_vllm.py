"""recipes/serve/export_vllm.py: the layout vLLM's pooling runner reads (the real vLLM check is tests/serving)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from serving_helpers import write_reward_model
from transformers import AutoModelForSequenceClassification

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heads import RewardScorer  # noqa: E402
from recipes.serve.export_vllm import ExportError, export_vllm  # noqa: E402
from recipes.serve.export_vllm import main as export_main  # noqa: E402


def test_vl_export_names_the_head_on_the_text_model(vl_model, tmp_path):
    out = export_vllm(vl_model, tmp_path / "vllm")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForSequenceClassification"]
    assert config["id2label"] == {"0": "LABEL_0"} and config["problem_type"] == "regression"
    assert config["text_config"]["id2label"] == {"0": "LABEL_0"}

    head = load_file(str(vl_model / "value_head.safetensors"))
    score = load_file(str(out / "score.safetensors"))
    assert set(score) == {"language_model.score.weight", "language_model.score.bias"}
    assert torch.equal(score["language_model.score.weight"], head["v_head.summary.weight"])
    assert torch.equal(score["language_model.score.bias"], head["v_head.summary.bias"])

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["language_model.score.weight"] == "score.safetensors"
    base_keys = set(load_file(str(vl_model / "model.safetensors")))
    shard = "model-00001-of-00001.safetensors"  # the single base file, under a shard name the index lists
    assert {k for k, v in index.items() if v == shard} == base_keys and not (out / "model.safetensors").exists()
    assert os.path.samefile(out / shard, vl_model / "model.safetensors")  # a hard link, no copy
    assert not (out / "value_head.safetensors").exists()
    # processor, tokenizer and chat template come along unchanged: the pixel budget travels with them
    processor_files = {p.name for p in vl_model.iterdir()} - {"config.json", "model.safetensors", "value_head.safetensors"}
    assert "processor_config.json" in processor_files and "tokenizer.json" in processor_files
    for name in processor_files:
        assert (out / name).read_bytes() == (vl_model / name).read_bytes(), name


def test_text_export_loads_as_a_sequence_classifier_with_our_rewards(tiny_checkpoints, tmp_path):
    """transformers' Qwen2ForSequenceClassification reads the same `score.weight` (its Linear has no bias, so the
    bias is added back here): the export's last-token logit is our reward."""
    model_dir = write_reward_model(tiny_checkpoints("qwen2"), tmp_path / "text_rm")
    out = export_vllm(model_dir, tmp_path / "vllm")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForSequenceClassification"]
    assert set(load_file(str(out / "score.safetensors"))) == {"score.weight", "score.bias"}

    scorer = RewardScorer.from_pretrained(str(model_dir), device="cpu")
    items = [{"images": [], "prompt": "Is 4 even?", "response": r} for r in ("yes", "no, it is odd")]
    classifier = AutoModelForSequenceClassification.from_pretrained(out).eval()
    bias = load_file(str(out / "score.safetensors"))["score.bias"]
    logits = []
    for item in items:
        batch = scorer.renderer([item])
        with torch.no_grad():
            logits.append(classifier(input_ids=batch["input_ids"]).logits[0, 0].item() + bias.item())
    assert logits == pytest.approx(scorer.score(items), abs=1e-5)


def test_refuses_what_it_cannot_convert(vl_model, tiny_checkpoints, tmp_path):
    with pytest.raises(ExportError, match="no value_head.safetensors"):
        export_vllm(tiny_checkpoints("qwen2_5_vl"), tmp_path / "a")

    exported = export_vllm(vl_model, tmp_path / "b")
    shutil.copy(vl_model / "value_head.safetensors", exported)
    with pytest.raises(ExportError, match="already converted"):
        export_vllm(exported, tmp_path / "c")

    other = tmp_path / "llava"
    shutil.copytree(vl_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, model_type="llava", architectures=["LlavaForConditionalGeneration"])))
    with pytest.raises(ExportError, match="llava"):
        export_vllm(other, tmp_path / "d")

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x").write_text("")
    with pytest.raises(ExportError, match="not empty"):
        export_vllm(vl_model, tmp_path / "e")

    result = subprocess.run([sys.executable, str(ROOT / "recipes/serve/export_vllm.py"), str(tiny_checkpoints("qwen2")),
                             str(tmp_path / "f")], capture_output=True, text=True)
    assert result.returncode != 0 and "not a reward model" in result.stderr


def hub_cache_snapshot(model: Path, cache: Path) -> Path:
    """The model as the hub cache lays it out: files in blobs/, the snapshot a folder of relative links to them."""
    (cache / "blobs").mkdir(parents=True)
    snapshot = cache / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for number, file in enumerate(sorted(model.iterdir())):
        shutil.copy(file, cache / "blobs" / f"blob{number}")
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"blob{number}"))
    return snapshot


def test_symlinked_shards_are_exported_as_files(vl_model, tmp_path):
    snapshot = hub_cache_snapshot(vl_model, tmp_path / "cache")
    out = export_vllm(snapshot, tmp_path / "vllm")
    direct = export_vllm(vl_model, tmp_path / "direct")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in direct.iterdir())
    for path in out.iterdir():
        assert not path.is_symlink() and path.read_bytes() == (direct / path.name).read_bytes(), path.name
    shard = "model-00001-of-00001.safetensors"
    assert os.path.samefile(out / shard, (snapshot / "model.safetensors").resolve())  # the blob, hard-linked


def cut(path: Path):
    """Cut short, as a kill during a save or a partial download leaves it."""
    path.resolve().write_bytes(path.resolve().read_bytes()[:-64])


def index_naming_a_missing_shard(model: Path):
    keys = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **{key: "model.safetensors" for key in keys}, "extra.weight": "model-00002-of-00002.safetensors"}}))


# damage done to the source -> the error, which names the file; each was exported with exit 0 or a raw SafetensorError
DAMAGED_SOURCES = {
    "a dangling shard link": (lambda model: (model / "model.safetensors").resolve().unlink(),
                              r"model\.safetensors is a link to \.\./\.\./blobs/blob\d+, which does not exist"),
    "a dangling head link": (lambda model: (model / "value_head.safetensors").resolve().unlink(),
                             r"value_head\.safetensors is a link to .*, which does not exist"),
    "a shard cut short": (lambda model: cut(model / "model.safetensors"),
                          r"snapshots/0123abc/model\.safetensors cannot be read .*: it is cut short or corrupt"),
    "a value head cut short": (lambda model: cut(model / "value_head.safetensors"),
                               r"value_head\.safetensors cannot be read .*: it is cut short or corrupt"),
    "an index naming a missing shard": (index_naming_a_missing_shard,
                                        r"model-00002-of-00002\.safetensors does not exist"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_SOURCES))
def test_damaged_sources_are_refused_naming_the_file(vl_model, tmp_path, damage):
    snapshot = hub_cache_snapshot(vl_model, tmp_path / "cache")
    harm, error = DAMAGED_SOURCES[damage]
    harm(snapshot)
    with pytest.raises(ExportError, match=error):
        export_vllm(snapshot, tmp_path / "vllm")


def test_command_line_names_the_damaged_file(vl_model, tmp_path):
    snapshot = hub_cache_snapshot(vl_model, tmp_path / "cache")
    cut(snapshot / "value_head.safetensors")
    with pytest.raises(SystemExit, match=r"^export_vllm: .*value_head\.safetensors cannot be read .*cut short"):
        export_main([str(snapshot), str(tmp_path / "vllm")])
