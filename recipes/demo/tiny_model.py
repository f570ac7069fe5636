"""Tiny, randomly initialised Qwen-family checkpoints built offline, for the CPU demo and the tests.

Each builder writes a directory that loads with the ordinary `from_pretrained` calls, exactly like a hub
checkpoint: a model of the real architecture (a few layers, small widths) plus its processor, with a
byte-level BPE tokenizer trained here on a small corpus and the real Qwen special tokens and chat template.

    python recipes/demo/tiny_model.py --family qwen2_5_vl --output_dir outputs/tiny-qwen2_5_vl
"""

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen2")

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The chat template of Qwen2-VL / Qwen2.5-VL (image and video placeholders, default system turn).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Enough English for the demo's prompts and answers to become whole-word tokens.
DEFAULT_CORPUS = [
    "You are a helpful assistant. What colour is the shape in the image? Answer with one word.",
    "red green blue yellow purple orange white black cyan magenta pink brown grey gray",
    "Where is the dot? left right top bottom centre center upper lower corner",
    "Which bar is taller, the left one or the right one? The left bar. The right bar.",
    "How many shapes are there? one two three four five six seven eight nine ten",
    "circle square triangle star dot bar chart picture image photo question answer",
    "Which number is larger? 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "Is the number even or odd? even odd yes no true false The answer is",
    "Sure, here is a short and polite answer. I cannot help with that. Thank you!",
]


def build_tokenizer(corpus=DEFAULT_CORPUS, vocab_size=512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with Qwen's special tokens and chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
    )


def _token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _text_config(tokenizer, hidden_size, num_layers, **extra) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_tiny_model(family: str, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """Returns (model, processing_class) for a tiny random-init model of the given family."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    head_dim = hidden_size // 4
    # mRoPE splits each head's rotary half (head_dim / 2 frequencies) into temporal, height and width parts.
    mrope_section = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section}

    if family == "qwen2":
        config = Qwen2Config(**_text_config(tokenizer, hidden_size, num_layers), tie_word_embeddings=False)
        return Qwen2ForCausalLM(config).eval(), tokenizer

    image_processor_kwargs = dict(min_pixels=56 * 56, max_pixels=224 * 224)
    video_size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}  # per frame: a few tokens each
    if family == "qwen2_5_vl":
        config = Qwen2_5_VLConfig(
            text_config=_text_config(tokenizer, hidden_size, num_layers, rope_parameters=rope),
            vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                window_size=56, fullatt_block_indexes=[1],
            ),
            **_token_ids(tokenizer),
        )
        model = Qwen2_5_VLForConditionalGeneration(config)
        processor_cls, video_processor = Qwen2_5_VLProcessor, Qwen2VLVideoProcessor(size=video_size)
    elif family == "qwen2_vl":
        config = Qwen2VLConfig(
            text_config=_text_config(tokenizer, hidden_size, num_layers, rope_parameters=rope),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden_size, num_heads=2, mlp_ratio=2),
            **_token_ids(tokenizer),
        )
        model = Qwen2VLForConditionalGeneration(config)
        processor_cls, video_processor = Qwen2VLProcessor, Qwen2VLVideoProcessor(size=video_size)
    elif family == "qwen3_vl":
        config = Qwen3VLConfig(
            text_config=_text_config(tokenizer, hidden_size, num_layers, head_dim=head_dim, rope_parameters=rope),
            vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                num_position_embeddings=64, deepstack_visual_indexes=[0],
            ),
            **_token_ids(tokenizer),
        )
        model = Qwen3VLForConditionalGeneration(config)
        image_processor_kwargs.update(patch_size=16, min_pixels=64 * 64, max_pixels=256 * 256)
        processor_cls = Qwen3VLProcessor
        video_processor = Qwen3VLVideoProcessor(size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128})
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(**image_processor_kwargs),
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    return model.eval(), processor


def save_tiny_model(family: str, output_dir: str | Path, **kwargs) -> Path:
    model, processing_class = build_tiny_model(family, **kwargs)
    model.save_pretrained(output_dir)
    processing_class.save_pretrained(output_dir)
    return Path(output_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    args = parser.parse_args()
    print(save_tiny_model(args.family, args.output_dir, hidden_size=args.hidden_size, num_layers=args.num_layers))
