"""TRL's RewardTrainer, taught three things: a value-head model, multimodal rows, and our checkpoint layout.

Everything else is TRL's: the loss -log sigmoid(r+ - r- [- margin]) (+ center_rewards_coefficient), the
logged accuracy / margin / min-mean-max reward / num_tokens, and the Trainer features (bf16, gradient
checkpointing and accumulation, report_to, push_to_hub, resume_from_checkpoint). On top, it stops rather than
train otherwise than asked: a launch that did not set up FSDP / DeepSpeed as configured (heads/sharding.py), a
non-finite loss, a checkpoint to resume from that is cut short or damaged.
"""

import logging
import os
import re
import time
from pathlib import Path

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from trl import RewardConfig, RewardTrainer

from collators import PairCollator
from collators.preference_data import MEDIA_COLUMNS

from .lora import ADAPTER_DIR
from .sharding import check_launch
from .value_head import VALUE_HEAD_FILE, unreadable_weight_files

logger = logging.getLogger(__name__)

# The columns the collators read (the Trainer drops the others before collation).
SCHEMA_COLUMNS = [*MEDIA_COLUMNS, "prompt", "chosen", "rejected", "margin"]
# The Trainer writes trainer_state.json last, and value_head.safetensors is the last file of our model save: a
# checkpoint holding both was saved to the end.
COMPLETE_CHECKPOINT_FILES = (VALUE_HEAD_FILE, TRAINER_STATE_NAME)


def checkpoint_problems(checkpoint: str | os.PathLike) -> list[str]:
    """Why a checkpoint cannot be resumed from (empty when it can): a file its save writes last is missing, or a
    weight file is absent, cut short or lacks tensors its index names."""
    missing = [f"no {name}" for name in COMPLETE_CHECKPOINT_FILES if not (Path(checkpoint) / name).is_file()]
    adapter = (f"{ADAPTER_DIR}/adapter_model.safetensors",) if (Path(checkpoint) / ADAPTER_DIR).is_dir() else ()
    return missing or unreadable_weight_files(checkpoint, extra=(VALUE_HEAD_FILE, *adapter))


def resume_checkpoint(args) -> str | None:
    """The checkpoint `--resume_from_checkpoint` asks for: `true` is the latest complete checkpoint-N in output_dir
    (one cut short by a kill during its save, or with a damaged weight file, is skipped with a warning), a path must
    be a complete checkpoint."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "no", ""):
        return None
    if str(value).lower() not in ("true", "yes", "1"):
        if not Path(value).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such directory")
        problems = checkpoint_problems(value)
        if problems:
            raise ValueError(f"--resume_from_checkpoint {value} is incomplete or damaged ({'; '.join(problems)}): "
                             "resume from an earlier checkpoint, or --resume_from_checkpoint true")
        return str(value)
    numbered = [(int(m.group(1)), path) for path in Path(args.output_dir).glob("checkpoint-*")
                if path.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", path.name))]
    for _, path in sorted(numbered, reverse=True):
        problems = checkpoint_problems(path)
        if not problems:
            logger.info("Resuming from %s", path)
            return str(path)
        logger.warning("Skipping %s: incomplete or damaged (%s)", path, "; ".join(problems))
    raise FileNotFoundError(f"--resume_from_checkpoint true: no complete checkpoint-N in {args.output_dir}")


class VLRewardTrainer(RewardTrainer):
    def __init__(self, model, args: RewardConfig, train_dataset, processing_class, data_collator=None, **kwargs):
        # TRL's checks read pad/eos tokens from a tokenizer; the whole processor is kept for collating and saving.
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            data_collator=data_collator or PairCollator(processing_class),
            **kwargs,
        )
        self.processing_class = processing_class
        self._throughput = {"pairs": 0, "tokens": 0, "start": None}
        check_launch(self.accelerator.state)  # FSDP or DeepSpeed asked for and not set up: stop, never train otherwise
        if self.is_deepspeed_enabled:
            # DeepSpeed flattens (ZeRO-3: partitions) the parameters into buffers of one dtype: the head is stored
            # as the backbone is, while its fp32 master copy lives in the optimizer and the reward is still fp32.
            model.v_head.to(model.pretrained_model.dtype)
        embeddings = model.backbone.get_input_embeddings()
        if self.accelerator.num_processes > 1 and not embeddings.weight.requires_grad:
            # Frozen embeddings (LoRA): on a text-only rank the first decoder layer's input would not require grad,
            # and FSDP2 / ZeRO-3 would reduce that layer's gradients at another point of the backward than a rank
            # with images (whose trained projector's output flows into it): mismatched collectives, a hang. Only the
            # language model's embeddings: transformers' enable_input_require_grads would also send gradients back
            # through the frozen vision tower.
            embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
        fsdp_plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        if fsdp_plugin is not None and fsdp_plugin.fsdp_version == 2 and (args.bf16 or args.fp16):
            # accelerate's policy casts every module's output to 16 bits, the rewards too, and reduces gradients in
            # 16 bits: compute in 16 bits, but keep the rewards (so the loss) and the gradient reduction in fp32.
            fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16 if args.bf16 else torch.float16, reduce_dtype=torch.float32)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Rows were checked and measured by collators.load_preference_mixture; PairCollator renders them.
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = SCHEMA_COLUMNS

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            if self._throughput["start"] is None:
                self._throughput["start"] = time.perf_counter()
            # A packed batch has one row per pair, the plain one two; attention_mask marks the real tokens in both.
            self._throughput["pairs"] += inputs["input_ids"].shape[0] // (1 if "segment_ids" in inputs else 2)
            self._throughput["tokens"] += int(inputs["attention_mask"].sum())
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        # The Trainer leaves a nan / inf loss out of its logs (logging_nan_inf_filter) and steps on: stop instead.
        # Every process checks every process's loss (one gather, as TRL's metrics do), so all stop together.
        loss = result[0] if return_outputs else result
        losses = self.accelerator.gather(loss.detach().float().reshape(1))
        if not torch.isfinite(losses).all():
            raise FloatingPointError(
                f"The loss is {losses.tolist()} at step {self.state.global_step}: training stops rather than go on "
                "from a non-finite loss. Margins are bounded by --max_abs_margin; otherwise lower the learning rate "
                "or train in fp32 / bf16 rather than fp16."
            )
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # pairs/s and non-pad tokens/s on this process since the last log.
        seen = self._throughput
        if self.model.training and seen["start"] is not None and seen["pairs"]:
            elapsed = time.perf_counter() - seen["start"]
            logs["pairs_per_second"] = round(seen["pairs"] / elapsed, 3)
            logs["tokens_per_second"] = round(seen["tokens"] / elapsed, 1)
            self._throughput = {"pairs": 0, "tokens": 0, "start": time.perf_counter()}
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict=None):
        """Every save (checkpoints, final, best) writes the release layout: base model + value_head.safetensors."""
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, state_dict=state_dict)
        self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        (model or self.model).load_checkpoint(resume_from_checkpoint)

    def _load_best_model(self):
        self.accelerator.unwrap_model(self.model).load_checkpoint(self.state.best_model_checkpoint)
