"""Imported by every Python process that tests/sharded/ launches (this folder is put on their PYTHONPATH by
the tests only, never by a user's run). Test-only additions to the real `accelerate launch` of recipes/stage1.py:

1. FSDP on CPU (SHARDING_TEST_FSDP_ON_CPU=1). accelerate turns an FSDP config into FSDP only for GPU-like
   distributed types (`AcceleratorState.__init__`); 2 CPU processes are MULTI_CPU and its FSDP plugin is dropped, so
   without this patch the FSDP config could not be tested on a CPU machine at all (the recipe itself refuses that
   state, heads/sharding.py `check_launch`). The patch sets the FSDP distributed type and plugin where accelerate
   would have set them on GPUs, and in `PartialState._shared_state` too, which accelerate copies back into its state.
   Everything after it (fully_shard, the FSDP2 state dict, the saves) is accelerate's and torch's own code.
2. ZeRO-3 partitions every tensor (SHARDING_TEST_ZERO3_PARTITION_ALL=1). DeepSpeed keeps tensors under
   `stage3_param_persistence_threshold` (1e5 elements) whole on every rank; every tensor of the tiny test model is
   under it, so nothing would be partitioned. The threshold is set to 0, as if the tensors were a 7B model's.
3. A probe (SHARDING_TEST_PROBE=<prefix>) that records, inside each rank of the recipe's run, what the test must
   see from there: the world size, the distributed type, how the parameters are held (DTensor shards, ZeRO-3
   partitions, ZeRO-2 optimizer partitions), which steps had images or videos, the logged losses and the rewards
   of fixed rows computed by the trained (still sharded) model at the start and at the end. It writes
   <prefix>.rank<N>.json. With SHARDING_TEST_SKIP_VISION_SYNC=1 it also turns off the vision-tower call on
   text-only batches (the control).
"""

import json
import os
import sys
from pathlib import Path


def _run_fsdp_on_cpu():
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    accelerate_init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        accelerate_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__


def _zero3_partition_all():
    from accelerate.utils import DeepSpeedPlugin

    plugin_post_init = DeepSpeedPlugin.__post_init__

    def __post_init__(self):
        plugin_post_init(self)
        self.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0

    DeepSpeedPlugin.__post_init__ = __post_init__


def _held_parameters(trainer) -> dict:
    """How this rank holds the parameters: whole tensors, DTensor shards or ZeRO partitions."""
    from torch.distributed.tensor import DTensor

    parameters = list(trainer.model.parameters())
    held = {"parameters": len(parameters),
            "dtensor": sum(isinstance(p, DTensor) for p in parameters),
            "zero3_partitioned": sum(hasattr(p, "ds_tensor") and p.numel() == 0 for p in parameters),
            "wrapper": type(trainer.model_wrapped).__name__}
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper, then the engine's
    partitions = getattr(optimizer, "single_partition_of_fp32_groups", None)  # ZeRO-1/2: this rank's slice of the master weights
    if partitions is not None:
        held["zero2_partition_numel"] = sum(p.numel() for p in partitions)
        held["trained_numel"] = sum(p.numel() for p in parameters if p.requires_grad)
    return held


def _probe(prefix: str):
    import torch
    import torch.distributed as dist
    from transformers import Trainer, TrainerCallback

    rank = int(os.environ.get("RANK", "0"))
    record = {"steps_with_media": [], "steps": 0}

    class Probe(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                record["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
                record["distributed_type"] = self.trainer.accelerator.state.distributed_type.name
                record["held"] = _held_parameters(self.trainer)

        def rewards(self) -> list[float]:
            """Rewards of the test's rows from the model as the engine holds it (every rank runs the forward)."""
            model = self.trainer.model_wrapped
            training = model.training
            model.eval()
            batch = self.trainer.data_collator(json.loads(os.environ["SHARDING_TEST_ROWS"]))
            batch = {k: v.to(self.trainer.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.no_grad():
                rewards = model(**batch).logits.float().flatten().tolist()
            model.train(training)
            return rewards

        def on_train_begin(self, args, state, control, **kwargs):
            record["rewards_before"] = self.rewards()

        def on_train_end(self, args, state, control, **kwargs):
            record["losses"] = [entry["loss"] for entry in state.log_history if "loss" in entry]
            record["rewards"] = self.rewards()
            Path(f"{prefix}.rank{rank}.json").write_text(json.dumps(record))

    trainer_init = Trainer.__init__

    def __init__(self, *args, **kwargs):
        trainer_init(self, *args, **kwargs)
        self.add_callback(Probe(self))
        if os.environ.get("SHARDING_TEST_SKIP_VISION_SYNC") == "1":
            self.model.run_vision_tower_always = False
        compute_loss = self.compute_loss

        def recorded_compute_loss(model, inputs, *args, **kwargs):
            if model.training:
                record["steps"] += 1
                if inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None:
                    record["steps_with_media"].append(record["steps"])
            return compute_loss(model, inputs, *args, **kwargs)

        self.compute_loss = recorded_compute_loss

    Trainer.__init__ = __init__


# Only the recipe's own processes (recipes/*.py), not the `accelerate` command that launches them.
if Path(sys.argv[0]).parent.name == "recipes":
    if os.environ.get("SHARDING_TEST_FSDP_ON_CPU") == "1":
        _run_fsdp_on_cpu()
    if os.environ.get("SHARDING_TEST_ZERO3_PARTITION_ALL") == "1":
        _zero3_partition_all()
    if os.environ.get("SHARDING_TEST_PROBE"):
        _probe(os.environ["SHARDING_TEST_PROBE"])
