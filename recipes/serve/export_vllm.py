"""Export a reward model (release layout: base checkpoint + value_head.safetensors) for vLLM's pooling runner.

vLLM serves a scalar reward model as a sequence classifier with one label: the family's *ForSequenceClassification
architecture, last-token pooling, and the head as a Linear named `score` on the text model. The export is the
source directory with a new config.json, the value head renamed into its own shard, and the base shards hard-linked
(copied where a link is impossible), so a 7B export costs no disk. Symlinked files (the hub cache's snapshots link
to its blobs) are resolved: the export holds the files themselves. Every shard the source's index names must exist,
open and hold its tensors (a file cut short by a kill or a partial download is an error naming it).

    python recipes/serve/export_vllm.py outputs/qwen2.5-vl-7b-reward/stage2 outputs/qwen2.5-vl-7b-reward/vllm
    vllm serve outputs/qwen2.5-vl-7b-reward/vllm --runner pooling --max-model-len 8192

`problem_type: regression` in the config makes vLLM return the raw reward; requests may also say
`"use_activation": false` (the other problem types make vLLM return sigmoid(reward)).
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

from safetensors import safe_open
from safetensors.torch import save_file

from heads.value_head import (
    LEGACY_VALUE_HEAD_FILE,
    SAFETENSORS_INDEX as INDEX_FILE,
    SINGLE_SAFETENSORS as SINGLE_FILE,
    VALUE_HEAD_FILE,
    find_value_head_file,
    load_value_head_state,
    unreadable_weight_files,
)

SCORE_FILE = "score.safetensors"
# A single-file base checkpoint is linked under a shard name: beside a model.safetensors, loaders (transformers)
# would read that file alone and miss the score shard the index lists.
SINGLE_SHARD = "model-00001-of-00001.safetensors"
# Where vLLM's sequence-classification adapter puts the score layer: on the inner text model of these VLMs.
VL_SCORE_PREFIX = {
    "qwen2_vl": "language_model.score",
    "qwen2_5_vl": "language_model.score",
    "qwen3_vl": "language_model.score",
}
GENERATIVE_SUFFIXES = ("ForConditionalGeneration", "ForCausalLM")


class ExportError(ValueError):
    """The source cannot be exported; the message says why."""


def score_prefix(config: dict) -> str:
    """`score` for text LMs, the text model's prefix for the VLM families vLLM classifies."""
    if "vision_config" not in config:
        return "score"
    model_type = config.get("model_type")
    if model_type not in VL_SCORE_PREFIX:
        raise ExportError(
            f"model_type {model_type!r} is a vision-language model whose score-layer name in vLLM is not known here; "
            f"supported: {', '.join(sorted(VL_SCORE_PREFIX))} and text-only causal LMs"
        )
    return VL_SCORE_PREFIX[model_type]


def classification_config(config: dict) -> dict:
    """The source config as a one-label sequence classifier returning the raw score."""
    architectures = config.get("architectures") or []
    if len(architectures) != 1 or not architectures[0].endswith(GENERATIVE_SUFFIXES):
        raise ExportError(
            f"architectures {architectures} is not one *ForConditionalGeneration / *ForCausalLM model; "
            "export the base model's own checkpoint (the release layout), not an already converted one"
        )
    name = architectures[0]
    for suffix in GENERATIVE_SUFFIXES:
        name = name.removesuffix(suffix)
    labels = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "problem_type": "regression"}
    exported = dict(config, architectures=[name + "ForSequenceClassification"], **labels)
    if isinstance(config.get("text_config"), dict):  # vLLM reads the label count of VLMs from the text config
        exported["text_config"] = dict(config["text_config"], **labels)
    return exported


def weight_map(src: Path) -> dict[str, str]:
    """tensor name -> shard file of the base checkpoint, whose every shard exists, opens and holds its tensors."""
    index, single = src / INDEX_FILE, src / SINGLE_FILE
    if not index.is_file() and not single.is_file():
        raise ExportError(f"{src} has neither {INDEX_FILE} nor {SINGLE_FILE} (vLLM loads safetensors only)")
    problems = unreadable_weight_files(src)
    if problems:
        raise ExportError("; ".join(problems))
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    with safe_open(str(single), framework="pt") as f:
        return {key: single.name for key in f.keys()}


def link_or_copy(src: Path, dst: Path):
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def export_vllm(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        from huggingface_hub import snapshot_download

        src = Path(snapshot_download(str(src)))
    dangling = [path for path in sorted(src.iterdir()) if path.is_symlink() and not path.exists()]
    if dangling:
        raise ExportError(f"{dangling[0]} is a link to {os.readlink(dangling[0])}, which does not exist: download or "
                          "copy the model again")
    head_file = find_value_head_file(src)
    if head_file is None:
        raise ExportError(f"{src} has no {VALUE_HEAD_FILE}: it is a base model, not a reward model")
    config = json.loads((src / "config.json").read_text())
    prefix = score_prefix(config)
    exported_config = classification_config(config)
    shards = weight_map(src)
    clash = sorted(key for key in shards if key.startswith(prefix + "."))
    if clash:
        raise ExportError(f"{src} already holds {clash[:3]}: a second `{prefix}` head would be ambiguous")
    try:  # exactly the two keys, shaped for this model's hidden size
        head = load_value_head_state(head_file, (config.get("text_config") or config)["hidden_size"])
    except ValueError as error:
        raise ExportError(str(error)) from None

    if dst.exists() and any(dst.iterdir()):
        raise ExportError(f"{dst} exists and is not empty")
    dst.mkdir(parents=True, exist_ok=True)
    skip = {"config.json", INDEX_FILE, VALUE_HEAD_FILE, LEGACY_VALUE_HEAD_FILE, SCORE_FILE}
    shard_names = set(shards.values())
    for path in sorted(src.iterdir()):
        target = path.resolve()  # the file itself, not a (relative) link that would dangle from dst
        if target.is_file() and path.name in shard_names:
            link_or_copy(target, dst / (SINGLE_SHARD if path.name == SINGLE_FILE else path.name))
        elif target.is_file() and path.name not in skip:  # tokenizer, processor (pixel budget), generation config
            shutil.copy2(target, dst / path.name)
    score = {f"{prefix}.weight": head["summary.weight"].contiguous(), f"{prefix}.bias": head["summary.bias"].contiguous()}
    save_file(score, str(dst / SCORE_FILE), metadata={"format": "pt"})
    shards = {key: SINGLE_SHARD if name == SINGLE_FILE else name for key, name in shards.items()}
    index = {"metadata": {}, "weight_map": dict(shards, **{key: SCORE_FILE for key in score})}
    (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (dst / "config.json").write_text(json.dumps(exported_config, indent=2) + "\n")
    return dst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="reward model directory (or hub id) in the release layout")
    parser.add_argument("dst", help="new directory for vLLM")
    args = parser.parse_args(argv)
    try:
        dst = export_vllm(args.src, args.dst)
    except ExportError as error:
        sys.exit(f"export_vllm: {error}")
    print(f"wrote {dst}; serve it with: vllm serve {dst} --runner pooling")


if __name__ == "__main__":
    main()
