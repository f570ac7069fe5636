"""Mixed Preference Optimization of the policy on reward-model pairs (paper §6; MPO: Wang et al., 2024).

TRL's DPOTrainer with MPO's loss, a weighted sum of three: DPO's sigmoid preference loss (0.8), BCO's pairwise
quality loss (0.2) and the SFT loss on the chosen answer (1.0), i.e. `loss_type=["sigmoid", "bco_pair", "sft"]`,
`loss_weights=[0.8, 0.2, 1.0]` (the defaults of MPOConfig). The vision tower is frozen (--freeze_vision_tower,
on by default, found as the reward model's freezing finds it); the projector and the language model train.
The data is what recipes/mpo/build_mpo_data.py writes (pairs.parquet: images, prompt, chosen, rejected).

    accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/mpo/mpo.py \
        --config recipes/qwen2_5_vl_7b/mpo.yaml
    python recipes/mpo/mpo.py --config recipes/demo/mpo.yaml      # the CPU demo's tiny preset
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

from datasets import load_dataset
from transformers import AutoConfig, AutoProcessor, set_seed
from trl import DPOConfig, DPOTrainer, ModelConfig, TrlParser, get_peft_config, get_quantization_config

from heads import find_vision_tower
from heads.freezing import count_parameters, find_projectors
from heads.value_head import auto_class

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ["images", "prompt", "chosen", "rejected"]


@dataclass
class MPOConfig(DPOConfig):
    """DPOConfig with MPO's loss as the default."""

    loss_type: list[str] = field(default_factory=lambda: ["sigmoid", "bco_pair", "sft"],
                                 metadata={"help": "MPO: preference (sigmoid), quality (bco_pair), generation (sft)."})
    loss_weights: list[float] = field(default_factory=lambda: [0.8, 0.2, 1.0],
                                      metadata={"help": "MPO's weights of the three losses."})


@dataclass
class MPOArguments:
    dataset: str | None = field(default=None, metadata={"help": "Pairs: build_mpo_data's pairs.parquet, a file or hub id."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Hold out this fraction of the pairs for evaluation."})
    freeze_vision_tower: bool = field(default=True, metadata={"help": "Freeze the vision encoder (ViT)."})
    freeze_projector: bool = field(default=False, metadata={"help": "Also freeze the vision-language projector."})


def load_policy(model_config: ModelConfig):
    auto = auto_class(AutoConfig.from_pretrained(model_config.model_name_or_path, revision=model_config.model_revision))
    quantization = get_quantization_config(model_config)  # --load_in_4bit / 8bit (QLoRA), as TRL's scripts
    return auto.from_pretrained(model_config.model_name_or_path, revision=model_config.model_revision,
                                dtype=model_config.dtype, attn_implementation=model_config.attn_implementation,
                                quantization_config=quantization)


def freeze_vision(policy, args: MPOArguments) -> dict[str, int]:
    """The vision tower (and, if asked, the projector) frozen, as in the reward model's training."""
    tower = find_vision_tower(policy)
    if tower is not None:
        tower.requires_grad_(not args.freeze_vision_tower)
        for projector in find_projectors(policy):
            projector.requires_grad_(not args.freeze_projector)
    trainable, frozen = count_parameters(policy)
    logger.info("Parameters: %s trainable, %s frozen (vision tower %s)", f"{trainable:,}", f"{frozen:,}",
                "none" if tower is None else "frozen" if args.freeze_vision_tower else "trained")
    return {"trainable": trainable, "frozen": frozen}


def load_pairs(args: MPOArguments, policy, seed: int):
    path = Path(args.dataset)
    if path.suffix in (".parquet", ".jsonl", ".json"):
        dataset = load_dataset("parquet" if path.suffix == ".parquet" else "json", data_files=str(path), split="train")
    else:
        dataset = load_dataset(args.dataset, split="train")
    missing = [column for column in ("prompt", "chosen", "rejected") if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{args.dataset}: columns {missing} are missing; expected images, prompt, chosen, rejected "
                         "(what recipes/mpo/build_mpo_data.py writes)")
    dataset = dataset.select_columns([c for c in PAIR_COLUMNS if c in dataset.column_names])
    if "images" in dataset.column_names and find_vision_tower(policy) is None:
        with_images = [i for i, images in enumerate(dataset["images"]) if images]
        if with_images:
            raise ValueError(f"{args.dataset}: row {with_images[0]} has images but the policy is a text-only model")
        dataset = dataset.remove_columns("images")  # DPOTrainer takes an `images` column as a vision dataset
    if not args.eval_fraction:
        return dataset, None
    split = dataset.train_test_split(test_size=args.eval_fraction, seed=seed)
    return split["train"], split["test"]


def main(mpo_args: MPOArguments, training_args: MPOConfig, model_config: ModelConfig):
    set_seed(training_args.seed)
    processor = AutoProcessor.from_pretrained(model_config.model_name_or_path, revision=model_config.model_revision)
    policy = load_policy(model_config)
    freeze_vision(policy, mpo_args)
    train_dataset, eval_dataset = load_pairs(mpo_args, policy, training_args.seed)
    # --use_peft and the lora_* flags: TRL wraps the policy in LoRA adapters (its reference is the frozen base).
    trainer = DPOTrainer(model=policy, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processor, peft_config=get_peft_config(model_config))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return trainer


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = TrlParser((MPOArguments, MPOConfig, ModelConfig))
    main(*parser.parse_args_and_config())
