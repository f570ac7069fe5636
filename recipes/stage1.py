"""Stage 1 of Skywork-VL Reward (paper §3.4): learn preferences on multimodal pairs.

Qwen2.5-VL-7B-Instruct gets a value head (a Linear on the final hidden state at the last token) and is
trained with -log sigmoid(r(x, y+) - r(x, y-)). The vision encoder is frozen; the projector (merger), the
language model and the head train. AdamW, lr 1e-5, 2 epochs, batch size 1.

    accelerate launch --config_file recipes/accelerate_configs/zero2.yaml \
        recipes/stage1.py --config recipes/qwen2_5_vl_7b/stage1.yaml

Another base model is one flag: --model_name_or_path Qwen/Qwen2-VL-7B-Instruct (or any Qwen-VL / causal LM).
LoRA on one GPU (saved with the adapters merged, and the adapter alone in adapter/; TRL's example flags):

    python recipes/stage1.py --config recipes/qwen2_5_vl_7b/stage1.yaml \
        --use_peft true --lora_r 32 --lora_alpha 16 --learning_rate 1e-4
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # heads/ and collators/ sit beside recipes/

from transformers import AutoProcessor, set_seed
from trl import ModelConfig, RewardConfig, TrlParser, get_peft_config

from collators import (
    PreferenceDataArguments, load_training_data, pair_collator_for, set_pixel_budget, set_video_budget,
    write_data_report,
)
from heads import (
    RewardModelArguments, ValueHeadRewardModel, VLRewardTrainer, apply_freezing, apply_lora, check_model_config,
    resume_checkpoint,
)


def main(data_args, model_args, training_args, model_config):
    check_model_config(model_config)  # an option this recipe does not implement is an error, never ignored
    set_seed(training_args.seed)  # before the value head is built: same arguments, same weights
    processor = AutoProcessor.from_pretrained(model_config.model_name_or_path, revision=model_config.model_revision)
    set_pixel_budget(processor, data_args.min_pixels, data_args.max_pixels)  # saved with the checkpoint
    set_video_budget(processor, data_args)  # fps, frames and pixels per frame: saved with the checkpoint too
    if training_args.max_length:  # saved with the checkpoint too: the reward server's default row limit
        getattr(processor, "tokenizer", processor).model_max_length = training_args.max_length

    # Model: the VLM plus a fresh value head; the vision tower is frozen.
    model = ValueHeadRewardModel.from_pretrained(
        model_config.model_name_or_path,
        new_value_head=model_args.new_value_head,
        revision=model_config.model_revision,
        dtype=model_config.dtype,
        attn_implementation=model_config.attn_implementation,
    )
    apply_freezing(model, model_args)
    if model_config.use_peft:  # LoRA on the LLM; head and projector in full; saved merged, plus adapter/
        apply_lora(model, get_peft_config(model_config), model_args)

    # Data: multimodal preference pairs, checked once (bad and over-long pairs counted, never cut).
    train_dataset, eval_dataset, report = load_training_data(data_args, processor, training_args)

    trainer = VLRewardTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=pair_collator_for(model, processor, data_args.pack_pairs, data_args.min_pixels, data_args.max_pixels),
    )
    trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        write_data_report(report, training_args.output_dir)  # data_report.json, dropped_rows.jsonl
    if training_args.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = TrlParser((PreferenceDataArguments, RewardModelArguments, RewardConfig, ModelConfig))
    main(*parser.parse_args_and_config())
