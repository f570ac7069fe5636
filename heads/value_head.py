"""A reward model: any HF vision-language model (or text-only causal LM) plus a scalar value head.

The reward of a sequence is `v_head(h_last)`, where `h_last` is the final hidden state at the last real
(non-pad) token, whatever the padding side. The vocabulary logits are never computed: the forward pass runs
the backbone (`model.model`) and skips `lm_head`, whose weights stay untouched so the saved directory is still
a complete *ForConditionalGeneration checkpoint.

Checkpoint layout (the Skywork-VL-Reward-7B release, LLaMA-Factory reward models, TRL's former
`AutoModelForCausalLMWithValueHead`):

    config.json, model*.safetensors, processor files    <- base_model.save_pretrained / processor.save_pretrained
    value_head.safetensors                              <- v_head.summary.weight [1, hidden], v_head.summary.bias [1]
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.modeling_outputs import ModelOutput
from transformers.utils import cached_file

from .attention import load_attention
from .lora import ADAPTER_DIR, is_lora, merged_base_state, unwrap_lora
from .packing import shared_prompt_rewards
from .positions import use_qwen_vision_positions
from .sharding import vision_tower_before_language_model, vision_tower_must_run

VALUE_HEAD_FILE = "value_head.safetensors"
LEGACY_VALUE_HEAD_FILE = "value_head.bin"  # older LLaMA-Factory / TRL saves
SAFETENSORS_INDEX, SINGLE_SAFETENSORS = "model.safetensors.index.json", "model.safetensors"


class Float32Linear(nn.Linear):
    """A Linear that computes in fp32, autocast or not, whatever dtype its input and its stored weights have."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        with torch.autocast(input.device.type, enabled=False):
            return F.linear(input.float(), self.weight.float(), self.bias.float())


class ValueHead(nn.Module):
    """Linear(hidden, 1), kept under the name `summary` for the checkpoint layout. The reward is computed in fp32;
    the weights are stored in fp32 too, unless an engine needs every parameter in the backbone's dtype
    (DeepSpeed, see VLRewardTrainer), which then keeps the fp32 master copy in its optimizer."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = Float32Linear(hidden_size, 1, dtype=torch.float32)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden_states).squeeze(-1)


@dataclass
class RewardOutput(ModelOutput):
    """`logits` are the rewards, shaped [batch, 1] like a sequence-classification model with num_labels=1."""

    logits: torch.Tensor | None = None


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left, right or no padding."""
    length = attention_mask.shape[-1]
    return length - 1 - attention_mask.flip(-1).int().argmax(-1)


def _hidden_size(config) -> int:
    return config.get_text_config().hidden_size  # Qwen2.5-VL keeps it in text_config


def auto_class(config):
    """Vision-language checkpoints load as image-text-to-text models, the rest as causal LMs."""
    if type(config) in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def find_value_head_file(path: str | os.PathLike, **hub_kwargs) -> str | None:
    for filename in (VALUE_HEAD_FILE, LEGACY_VALUE_HEAD_FILE):
        if os.path.isdir(path):
            candidate = os.path.join(path, filename)
            if os.path.isfile(candidate):
                return candidate
            continue
        resolved = cached_file(
            str(path), filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs
        )
        if resolved is not None:
            return resolved
    return None


def load_value_head_state(file: str, hidden_size: int | None = None) -> dict[str, torch.Tensor]:
    """The head's two tensors, checked: exactly the two keys, shaped as a head on `hidden_size` (when given)."""
    try:
        state = load_file(file) if file.endswith(".safetensors") else torch.load(file, map_location="cpu")
    except Exception as error:  # SafetensorError, pickle and zip errors: a file cut short or not a head at all
        raise ValueError(f"{file} cannot be read ({error}): it is cut short or corrupt; save or copy it again") from error
    weight = state.get("v_head.summary.weight")
    hidden_size = hidden_size or (weight.shape[-1] if weight is not None else 0)
    expected = {"v_head.summary.weight": (1, hidden_size), "v_head.summary.bias": (1,)}
    if set(state) != set(expected):
        raise ValueError(f"{file}: expected exactly the keys {sorted(expected)}, found {sorted(state)}; "
                         "this is not a value head of this repository's layout")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{file}: {key} has shape {list(state[key].shape)}, expected {list(shape)} "
                             f"(the model's hidden size is {hidden_size}): the head belongs to another model")
    return {key.removeprefix("v_head."): state[key] for key in expected}


def keep_used_weight_conversions(model: nn.Module) -> None:
    """A save writes the key names of the checkpoint it was loaded from, by reverting the renamings that loading
    applied. transformers 5.23's ZeRO-3 loading records every renaming of the family, applied or not, and its save
    then reverts renamings that never happened (`model.language_model.layers.*` saved as `model.model.layers.*`).
    Keep only those that applied, as the one-process loading does."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [conversion for conversion in conversions if conversion.was_used()]


def weight_shards(directory: str | os.PathLike) -> dict[str, list[str]]:
    """The base model's safetensors files in a saved directory and the tensors each should hold: those its index
    names, or model.safetensors (tensors unknown: [])."""
    index = Path(directory) / SAFETENSORS_INDEX
    if not index.is_file():
        return {SINGLE_SAFETENSORS: []}
    shards = {}
    for key, shard in json.loads(index.read_text())["weight_map"].items():
        shards.setdefault(shard, []).append(key)
    return shards


def unreadable_weight_files(directory: str | os.PathLike, extra: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with a saved model's weights (empty when nothing): each shard (and each `extra` file) must
    exist, open as safetensors (a file cut short by a kill or a partial copy does not) and hold what the index says."""
    problems = []
    for name, keys in [*weight_shards(directory).items(), *((name, []) for name in extra)]:
        path = Path(directory) / name
        if not path.is_file():
            problems.append(f"{path} does not exist" + (" (a dangling link)" if path.is_symlink() else ""))
            continue
        try:
            with safe_open(str(path), framework="pt") as file:
                absent = sorted(set(keys) - set(file.keys()))
        except Exception as error:  # SafetensorError for a cut header or body
            problems.append(f"{path} cannot be read ({error}): it is cut short or corrupt")
            continue
        if absent:
            problems.append(f"{path} lacks {len(absent)} tensor(s) its index names, e.g. {absent[0]}")
    return problems


def check_model_path(path: str | os.PathLike) -> None:
    """A clear error for a local path that is not a model, before transformers calls it a bad repo id."""
    text = str(path)
    if os.path.isdir(text):
        if not os.path.isfile(os.path.join(text, "config.json")):
            raise FileNotFoundError(f"{text} is not a model directory: it has no config.json "
                                    "(a reward model directory holds the base checkpoint and value_head.safetensors)")
        return
    if os.path.exists(text):
        raise NotADirectoryError(f"{text} is a file; give the model's directory")
    looks_local = text.startswith((".", "/", "~")) or text.count("/") != 1 or os.sep != "/" and os.sep in text
    if looks_local:
        raise FileNotFoundError(f"{text}: no such directory (and not a hub id of the form owner/name)")


class ValueHeadRewardModel(nn.Module):
    """`pretrained_model` (the base VLM / LM) + `v_head`. Forward returns one reward per row."""

    # Whether a batch without images runs the vision tower on a dummy image (its output adds exactly 0), so that
    # sharded parameters' collectives match on every rank. None: whenever torch.distributed has several processes.
    run_vision_tower_always: bool | None = None

    def __init__(self, pretrained_model: nn.Module):
        super().__init__()
        use_qwen_vision_positions(pretrained_model)  # the text after a video where Qwen and vLLM put it
        self.pretrained_model = pretrained_model
        self.config = pretrained_model.config
        self.config.num_labels = 1  # one scalar per sequence, as TRL's RewardTrainer checks
        self.v_head = ValueHead(_hidden_size(self.config))

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, new_value_head: bool = False, revision: str | None = None, **model_kwargs
    ) -> "ValueHeadRewardModel":
        """Loads a reward model directory or hub id.

        A directory without `value_head.safetensors` is a base model, not a reward model: loading it is an
        error unless `new_value_head=True` (the start of training), so a head is never silently random.
        """
        check_model_path(path)
        head_file = find_value_head_file(path, revision=revision)
        if head_file is None and not new_value_head:
            raise FileNotFoundError(
                f"{path} has no {VALUE_HEAD_FILE}: it is a base model, not a trained reward model. "
                "To start training from it, ask for a fresh head (--new_value_head true)."
            )
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=model_kwargs.get("trust_remote_code", False))
        if model_kwargs.get("attn_implementation"):  # flex / flash-attn: shared-prefix functions (heads/attention.py)
            model_kwargs["attn_implementation"] = load_attention(model_kwargs["attn_implementation"], config)
        base = auto_class(config).from_pretrained(path, revision=revision, **model_kwargs)
        keep_used_weight_conversions(base)
        model = cls(base)
        if head_file is not None:
            model.v_head.load_state_dict(load_value_head_state(head_file, _hidden_size(config)))
        model.value_head_source = head_file or "new (random init)"
        return model

    @property
    def backbone(self) -> nn.Module:
        """The model without its lm_head: last_hidden_state out, no vocabulary logits."""
        return unwrap_lora(self.pretrained_model).base_model

    def forward(self, input_ids=None, attention_mask=None, margin=None, use_cache=False, **model_inputs) -> RewardOutput:
        # `margin` belongs to the loss; TRL's RewardTrainer.compute_loss passes the whole batch here.
        text_only = model_inputs.get("pixel_values") is None and model_inputs.get("pixel_values_videos") is None
        needs_tower = (text_only and getattr(self.config, "vision_config", None) is not None
                       and vision_tower_must_run(self.run_vision_tower_always))
        # Under sharding every rank runs the vision tower, on a dummy image if need be (heads/sharding.py).
        with vision_tower_before_language_model(self.backbone, input_ids.device, needs_tower) as zeros:
            if "segment_ids" in model_inputs:  # a packed batch: one sequence per pair (or per prompt + N answers)
                rewards = shared_prompt_rewards(self.backbone, self.v_head, input_ids, use_cache=use_cache, **model_inputs)
            else:
                outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **model_inputs)
                hidden = outputs.last_hidden_state
                rows = torch.arange(hidden.shape[0], device=hidden.device)
                last_hidden = hidden[rows, last_token_index(attention_mask).to(hidden.device)]
                rewards = self.v_head(last_hidden).unsqueeze(-1)
        return RewardOutput(logits=rewards + sum(zeros) if zeros else rewards)

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None, **kwargs):
        """Writes the base checkpoint (lm_head included) and value_head.safetensors beside it."""
        state_dict = state_dict if state_dict is not None else self.state_dict()
        base_state = {k.removeprefix("pretrained_model."): v for k, v in state_dict.items() if k.startswith("pretrained_model.")}
        head_state = {k: v.detach().float().cpu().contiguous() for k, v in state_dict.items() if k.startswith("v_head.")}
        base_model = self.pretrained_model
        if is_lora(base_model):  # the release layout gets the adapters merged in; adapter/ keeps them apart
            adapter_dir = Path(save_directory) / ADAPTER_DIR
            base_model.save_pretrained(adapter_dir, state_dict=base_state)
            save_file(head_state, str(adapter_dir / VALUE_HEAD_FILE), metadata={"format": "pt"})
            base_state, base_model = merged_base_state(base_model, base_state), base_model.get_base_model()
        base_model.save_pretrained(save_directory, state_dict=base_state, **kwargs)
        # Written last and atomically: a directory with the head file holds a complete model.
        head_file = Path(save_directory) / VALUE_HEAD_FILE
        save_file(head_state, str(head_file.with_suffix(".tmp")), metadata={"format": "pt"})
        os.replace(head_file.with_suffix(".tmp"), head_file)

    def load_checkpoint(self, checkpoint_dir: str | os.PathLike):
        """Restores weights saved by `save_pretrained` into this (already built) model, e.g. to resume."""
        if is_lora(self.pretrained_model):  # LoRA leaves the base weights as they were: restore the adapter
            adapter_file = Path(checkpoint_dir) / ADAPTER_DIR / "adapter_model.safetensors"
            set_peft_model_state_dict(self.pretrained_model, load_file(str(adapter_file)))
        else:
            # Through from_pretrained, not the raw shards: some families save legacy key names (Qwen2.5-VL's
            # `visual.*`) that only transformers' loading maps back onto the module's own names.
            base = type(self.pretrained_model).from_pretrained(checkpoint_dir, dtype=self.pretrained_model.dtype)
            self.pretrained_model.load_state_dict(base.state_dict())
        self.v_head.load_state_dict(load_value_head_state(str(Path(checkpoint_dir) / VALUE_HEAD_FILE), _hidden_size(self.config)))

    # Delegates the Trainer relies on.
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        self.pretrained_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs, every_n_layers=every_n_layers, offload=offload
        )

    def activation_checkpointing_disable(self):
        self.pretrained_model.activation_checkpointing_disable()

    def enable_input_require_grads(self):
        self.pretrained_model.enable_input_require_grads()

    def add_model_tags(self, tags):
        self.pretrained_model.add_model_tags(tags)

    @property
    def _no_split_modules(self):
        """The blocks FSDP's auto-wrap policy shards one by one (decoder layers, vision blocks)."""
        return unwrap_lora(self.pretrained_model)._no_split_modules

    @property
    def dtype(self) -> torch.dtype:
        return self.pretrained_model.dtype

    @property
    def device(self) -> torch.device:
        return self.pretrained_model.device
