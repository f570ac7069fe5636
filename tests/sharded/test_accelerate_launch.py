"""Sharded training as users launch it: `accelerate launch --config_file recipes/accelerate_configs/<config>.yaml
--num_processes 2 recipes/stage1.py --config recipes/demo/stage1.yaml ...` on 2 CPU processes (gloo), for every
shipped config (ddp, zero2, zero3, fsdp2) in fp32 and bf16, with rank 1's batches text-only at every step.

Inside each run (launcher/sitecustomize.py, on the launched processes' PYTHONPATH only) a probe records the world
size, how the parameters are held, which steps had images or videos, the losses and the rewards of fixed rows computed by the
trained, still sharded model. The test compares them with a one-process run of the same recipe on the same data
(batch 4 = the two ranks' batches of 2), and the saved checkpoint with the one-process checkpoint: same keys and
shapes (the release layout), and the same scores. FSDP on CPU needs a test-only patch of accelerate's state
(accelerate enables FSDP for GPUs only); see launcher/sitecustomize.py for it and for why ZeRO-3's persistence
threshold is lowered on this tiny model.

    make test-sharded
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from collators import PackedPairCollator  # noqa: E402
from heads import ValueHeadRewardModel  # noqa: E402
from recipes.serve.export_vllm import export_vllm  # noqa: E402
from serving_helpers import free_port  # noqa: E402

LAUNCHER_SITE = Path(__file__).parent / "launcher"
STEPS = 2
PRECISIONS = {"fp32": ["--dtype", "float32", "--bf16", "false"], "bf16": ["--dtype", "bfloat16", "--bf16", "true"]}
# Losses against the one-process run: fp32 differs only in the order of the gradient sum. In bf16 the first step's
# loss is the same computation in 16 bits; after an update, ZeRO and FSDP2 keep fp32 master weights while one
# process (and DDP) updates the bf16 weights themselves, so the second loss moves by about 1e-3.
LOSS_TOLERANCE = {"fp32": dict(rtol=1e-5, atol=1e-5), "bf16": dict(rtol=0, atol=5e-3)}
# The saved checkpoint, reloaded on one process, against the trained model inside the run. fp32: the same numbers.
# bf16: the same bf16 weights, but the engines compute in 16 bits with other kernels (ZeRO-3 its own linear
# function, FSDP2 its cast parameters), whose roundings differ from the reloaded model's by up to ~5e-3 here.
SCORE_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}
COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def workspace(tiny_checkpoints, tmp_path_factory):
    """Pairs in the order the sequential sampler deals them: rows 0-1 to rank 0, 2-3 to rank 1, 4-5 to rank 0...
    so rank 0 gets image pairs (video pairs, frame lists, at the second step: the vision tower runs on video frames
    while rank 1 runs it on the dummy image) and rank 1 text-only pairs at every step. `rows`: one image and one text
    pair, scored by the trained model inside the run and by every saved checkpoint."""
    root = tmp_path_factory.mktemp("sharded")
    (root / "img").mkdir()
    pairs = []
    for i in range(2 * 2 * STEPS):
        colour, other = COLOURS[i % 4], COLOURS[(i + 1) % 4]
        if (i // 2) % 2 == 0 and i < 4:
            Image.new("RGB", (56, 56), colour).save(root / "img" / f"{i}.png")
            pairs.append({"images": [f"img/{i}.png"], "prompt": "What colour?", "chosen": colour, "rejected": other})
        elif (i // 2) % 2 == 0:  # a shape changing colour
            frames = []
            for t in range(4):
                Image.new("RGB", (56, 56), COLOURS[(i + t) % 4]).save(root / "img" / f"{i}_{t}.png")
                frames.append(f"img/{i}_{t}.png")
            pairs.append({"videos": [frames], "prompt": "Which colour comes first?", "chosen": colour, "rejected": other})
        else:
            even = i % 2 == 0
            pairs.append({"images": [], "prompt": f"Is {i} even?", "chosen": "yes" if even else "no",
                          "rejected": "no" if even else "yes"})
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rows = [{"images": [str(root / "img" / "0.png")], "prompt": "What colour?", "chosen": "red", "rejected": "blue",
             "margin": None},
            {"images": [], "prompt": "Is 3 even?", "chosen": "no", "rejected": "yes", "margin": None}]
    return SimpleNamespace(model=tiny_checkpoints("qwen2_5_vl"), data=data, rows=rows, root=root)


# `--adam_epsilon 1e-6`: at Adam's 1e-8, gradient elements at rounding-noise level (~1e-9, whose sign depends on the
# order in which the ranks' gradients are summed) become full steps of size lr, and fp32 runs that agree to 1e-7
# before the first step end ~1e-4 apart after two; at 1e-6 they stay at noise level (1e-6 apart after two steps).
def recipe_args(ws, output_dir: Path, precision: str, batch_size: int, *extra) -> list[str]:
    return ["recipes/stage1.py", "--config", "recipes/demo/stage1.yaml", "--model_name_or_path", str(ws.model),
            "--dataset_mixture", str(ws.data), "--output_dir", str(output_dir), "--max_steps", str(STEPS),
            "--per_device_train_batch_size", str(batch_size), "--train_sampling_strategy", "sequential",
            "--logging_steps", "1", "--learning_rate", "1e-4", "--adam_epsilon", "1e-6", "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--disable_tqdm", "true",
            *PRECISIONS[precision], *extra]


def run(command: list[str], ws, probe: Path, timeout: float, **env) -> SimpleNamespace:
    """Runs a command from the repository root with the probe; returncode None on timeout (its processes killed)."""
    env = dict(os.environ, PYTHONPATH=str(LAUNCHER_SITE), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", SHARDING_TEST_PROBE=str(probe), SHARDING_TEST_ROWS=json.dumps(ws.rows), **env)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, returncode = process.communicate()[0], None
    records = [json.loads(path.read_text()) for path in sorted(probe.parent.glob(f"{probe.name}.rank*.json"))]
    return SimpleNamespace(returncode=returncode, output=output, records=records)


def launch(ws, config: str, output_dir: Path, precision: str, *extra, timeout: float = 240, **env) -> SimpleNamespace:
    command = [str(ROOT / ".venv" / "bin" / "accelerate"), "launch", "--config_file",
               f"recipes/accelerate_configs/{config}.yaml", "--num_processes", "2", "--main_process_port",
               str(free_port()), *recipe_args(ws, output_dir, precision, 2, *extra)]
    env = {"SHARDING_TEST_FSDP_ON_CPU": "1", "SHARDING_TEST_ZERO3_PARTITION_ALL": "1", **env}
    return run(command, ws, output_dir.with_suffix(".probe"), timeout, **env)


@pytest.fixture(scope="module")
def one_process(workspace):
    """precision -> the one-process run of the same recipe (batch 4: both ranks' pairs), run once."""
    runs = {}

    def get(precision: str) -> SimpleNamespace:
        if precision not in runs:
            output_dir = workspace.root / f"one_process_{precision}"
            result = run([sys.executable, *recipe_args(workspace, output_dir, precision, 4)], workspace,
                         output_dir.with_suffix(".probe"), 240)
            assert result.returncode == 0, result.output[-4000:]
            runs[precision] = SimpleNamespace(dir=output_dir, **result.records[0])
        return runs[precision]

    return get


def checkpoint_layout(directory: Path) -> dict[str, tuple]:
    """tensor name -> shape, for the base checkpoint and the value head."""
    layout = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            layout.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return layout


def checkpoint_rewards(directory: Path, rows: list[dict], precision: str) -> list[float]:
    """The saved checkpoint, loaded on one process as a user would, scores the probe's rows (same collator)."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = ValueHeadRewardModel.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa").eval()
    batch = PackedPairCollator(AutoProcessor.from_pretrained(directory))(rows)
    with torch.no_grad():
        return model(**batch).logits.float().flatten().tolist()


def model_card_rewards(directory: Path, rows: list[dict]) -> tuple[list[float], list[float]]:
    """The release's model-card snippet (transformers' own class + value_head.safetensors read with safe_open, the
    value at attention_mask.sum() - 1 of a right-padded chat), next to our reward model on the same inputs."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(directory)
    with safe_open(str(directory / "value_head.safetensors"), framework="pt", device="cpu") as f:
        head = {key: f.get_tensor(key) for key in f.keys()}
    ours = ValueHeadRewardModel.from_pretrained(directory, dtype=torch.float32).eval()
    card, reference = [], []
    for row in rows:
        for response in (row["chosen"], row["rejected"]):
            content = [{"type": "image", "image": path} for path in row["images"]] + [{"type": "text", "text": row["prompt"]}]
            messages = [{"role": "user", "content": content}, {"role": "assistant", "content": response}]
            text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            images = [Image.open(path).convert("RGB") for path in row["images"]] or None
            inputs = processor(text=[text], images=images, padding=True, padding_side="right", return_tensors="pt")
            with torch.no_grad():
                hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1]
                values = hidden.float() @ head["v_head.summary.weight"].float().T + head["v_head.summary.bias"].float()
                card.append(values[0, inputs["attention_mask"].sum() - 1, 0].item())
                reference.append(ours(**inputs).logits.item())
    return card, reference


def check_run(result, config: str, expected_type: str, reference, precision: str, output_dir: Path, ws):
    assert result.returncode == 0, result.output[-6000:]
    rank0, rank1 = result.records
    for record in (rank0, rank1):
        assert record["world_size"] == 2 and record["distributed_type"] == expected_type
        assert record["steps"] == STEPS
    assert rank0["steps_with_media"] == list(range(1, STEPS + 1)) and rank1["steps_with_media"] == []
    held = rank0["held"]
    if config == "ddp":
        assert held["wrapper"] == "DistributedDataParallel"
    elif config == "zero2":  # this rank's fp32 master slice: half of the trained elements (plus alignment padding)
        assert held["trained_numel"] / 2 <= held["zero2_partition_numel"] < held["trained_numel"] / 2 + 64
    elif config == "zero3":  # every parameter partitioned: this rank holds none of them whole
        assert held["zero3_partitioned"] == held["parameters"] > 0
    elif config == "fsdp2":  # every parameter a DTensor shard
        assert held["dtensor"] == held["parameters"] > 0

    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(reference.losses), **LOSS_TOLERANCE[precision])
    assert checkpoint_layout(output_dir) == checkpoint_layout(reference.dir)
    saved = checkpoint_rewards(output_dir, ws.rows, precision)
    tolerance = SCORE_TOLERANCE[precision]
    # Training moved the rewards well past the tolerance, so a stale or partial save could not pass.
    assert (torch.tensor(rank0["rewards"]) - torch.tensor(rank0["rewards_before"])).abs().max() > 10 * tolerance
    torch.testing.assert_close(torch.tensor(saved), torch.tensor(rank0["rewards"]), rtol=0, atol=tolerance)
    if precision == "fp32":
        torch.testing.assert_close(torch.tensor(saved), torch.tensor(reference.rewards), rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor(saved), torch.tensor(checkpoint_rewards(reference.dir, ws.rows, precision)),
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("config,expected_type", [("ddp", "MULTI_CPU"), ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED"),
                                                  ("fsdp2", "FSDP")])
def test_launch_trains_sharded_like_one_process(config, expected_type, precision, workspace, one_process):
    output_dir = workspace.root / f"{config}_{precision}"
    result = launch(workspace, config, output_dir, precision)
    check_run(result, config, expected_type, one_process(precision), precision, output_dir, workspace)
    if (config, precision) == ("zero3", "bf16"):  # the release path: the model card's snippet and the vLLM export
        card, ours = model_card_rewards(output_dir, workspace.rows)
        torch.testing.assert_close(torch.tensor(card), torch.tensor(ours), rtol=0, atol=1e-5)
        exported = export_vllm(output_dir, workspace.root / "zero3_bf16_vllm")
        score = load_file(str(exported / "score.safetensors"))
        assert set(score) == {"language_model.score.weight", "language_model.score.bias"}
        index = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(index) - set(score) == set(checkpoint_layout(output_dir)) - {"v_head.summary.weight", "v_head.summary.bias"}


@pytest.mark.parametrize("config", ["zero3", "fsdp2"])
def test_lora_trains_sharded_and_saves_merged_release_layout_with_adapter(config, workspace, one_process):
    output_dir = workspace.root / f"{config}_lora"
    result = launch(workspace, config, output_dir, "fp32", "--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16")
    assert result.returncode == 0, result.output[-6000:]
    rank0 = result.records[0]
    held = rank0["held"]
    assert rank0["world_size"] == 2
    assert (held["zero3_partitioned"] if config == "zero3" else held["dtensor"]) == held["parameters"] > 0
    # The release layout with the adapters merged: the keys and shapes of a full fine-tuning's checkpoint.
    assert checkpoint_layout(output_dir) == checkpoint_layout(one_process("fp32").dir)
    adapter = output_dir / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert any(".lora_A." in key for key in load_file(str(adapter / "adapter_model.safetensors")))
    saved = checkpoint_rewards(output_dir, workspace.rows, "fp32")
    assert (torch.tensor(rank0["rewards"]) - torch.tensor(rank0["rewards_before"])).abs().max() > 1e-3
    torch.testing.assert_close(torch.tensor(saved), torch.tensor(rank0["rewards"]), rtol=0, atol=1e-4)


def test_text_only_rank_without_vision_call_never_completes_a_step(workspace):
    """The control: with the tower skipped on text-only batches, rank 0 gathers the vision tower while rank 1
    gathers a decoder layer. gloo notices the size mismatch and aborts; NCCL has no such check and waits forever.
    Either way no step completes, and the run never gets to its end."""
    output_dir = workspace.root / "control"
    result = launch(workspace, "fsdp2", output_dir, "fp32", timeout=120, SHARDING_TEST_SKIP_VISION_SYNC="1")
    assert result.returncode != 0 and result.records == [], result.output[-4000:]
    assert not (output_dir / "value_head.safetensors").exists()
    assert result.returncode is None or "collective mismatch" in result.output or "Connection reset" in result.output, \
        result.output[-4000:]


def test_fsdp_config_that_accelerate_turns_into_ddp_stops_the_run(workspace):
    """Without the test-only patch, accelerate sets up MULTI_CPU for the FSDP config: the recipe refuses to train."""
    output_dir = workspace.root / "fsdp_as_ddp"
    result = launch(workspace, "fsdp2", output_dir, "fp32", timeout=180, SHARDING_TEST_FSDP_ON_CPU="0")
    assert result.returncode != 0 and result.records == []
    assert "asks for FSDP" in result.output and "set up MULTI_CPU with 2 process(es)" in result.output
    assert "ddp.yaml" in result.output and not (output_dir / "value_head.safetensors").exists()


def test_processes_that_would_train_alone_stop_the_run(workspace):
    """`--use_cpu false` on a machine without GPUs: 2 processes launched, each of which accelerate sets up alone."""
    output_dir = workspace.root / "alone"
    result = launch(workspace, "ddp", output_dir, "fp32", "--use_cpu", "false", timeout=180)
    assert result.returncode != 0 and result.records == []
    assert "WORLD_SIZE=2" in result.output and "with 1 process(es)" in result.output, result.output[-4000:]
    assert not (output_dir / "value_head.safetensors").exists()
