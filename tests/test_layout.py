"""The repository's layout keeps its promises: a recipe copied with heads/ and collators/ runs on its own, the glue
imports nothing of the pipelines, and every YAML parses into the dataclasses that read it."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from PIL import Image
from trl import ModelConfig, RewardConfig, TrlParser

from collators import PreferenceDataArguments
from heads import RewardModelArguments

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipes.data.build_mixture import BuildMixtureArguments  # noqa: E402
from recipes.mpo.mpo import MPOArguments, MPOConfig  # noqa: E402

GLUE = ("heads", "collators")
PIPELINE_ONLY = ("recipes", "matplotlib", "sentence_transformers", "requests", "httpx", "urllib.request", "http.client")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("file", sorted(p.relative_to(ROOT).as_posix() for g in GLUE for p in (ROOT / g).glob("*.py")))
def test_glue_imports_nothing_of_the_pipelines(file):
    imports = imported_modules(ROOT / file)
    assert not {name for name in imports for banned in PIPELINE_ONLY if name == banned or name.startswith(banned + ".")}


def test_copied_recipe_trains_in_an_empty_project(tiny_checkpoints, tmp_path):
    """recipes/stage1.py + heads/ + collators/, nothing else, run from the new project's own directory."""
    project = tmp_path / "project"
    (project / "recipes").mkdir(parents=True)
    shutil.copy(ROOT / "recipes" / "stage1.py", project / "recipes" / "stage1.py")
    for folder in GLUE:
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (project / "img").mkdir()
    rows = []
    for i, (colour, other) in enumerate([("red", "blue"), ("green", "red")]):
        Image.new("RGB", (56, 56), colour).save(project / "img" / f"{i}.png")
        rows.append({"images": [f"img/{i}.png"], "prompt": "What colour?", "chosen": colour, "rejected": other})
    (project / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, "recipes/stage1.py", "--model_name_or_path", str(tiny_checkpoints("qwen2_5_vl")),
               "--new_value_head", "true", "--dataset_mixture", "pairs.jsonl", "--output_dir", "out",
               "--per_device_train_batch_size", "2", "--max_steps", "1", "--bf16", "false", "--use_cpu", "true",
               "--report_to", "none", "--save_strategy", "no", "--max_length", "256", "--disable_tqdm", "true"]
    result = subprocess.run(command, cwd=project, env=dict(env, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (project / "out" / "value_head.safetensors").is_file()
    assert json.loads((project / "out" / "data_report.json").read_text())["pairs.jsonl"]["kept"] == 2


STAGE_PARSER = TrlParser((PreferenceDataArguments, RewardModelArguments, RewardConfig, ModelConfig))
YAMLS = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("recipes/**/*.yaml"))


@pytest.mark.parametrize("config", YAMLS)
def test_every_yaml_parses_into_its_dataclasses(config):
    path = ROOT / config
    if path.parent.name == "accelerate_configs":
        assert load_config_from_file(str(path)).num_processes >= 1
    elif path.name == "data.yaml":
        (args,) = TrlParser((BuildMixtureArguments,)).parse_args_and_config(["--config", str(path)])
        assert args.sources and args.processor and args.max_pixels
    elif path.name == "mpo.yaml":
        mpo_args, training_args, model_config = TrlParser((MPOArguments, MPOConfig, ModelConfig)).parse_args_and_config(
            ["--config", str(path), "--use_cpu", "true"])
        assert mpo_args.dataset and model_config.model_name_or_path and training_args.output_dir
        assert training_args.loss_type == ["sigmoid", "bco_pair", "sft"] and training_args.loss_weights == [0.8, 0.2, 1.0]
    else:
        data_args, _, training_args, model_config = STAGE_PARSER.parse_args_and_config(
            ["--config", str(path), "--use_cpu", "true"])
        assert model_config.model_name_or_path and isinstance(data_args.dataset_mixture, dict)
        assert training_args.output_dir
