"""Shared-prefix attention without a dense mask (heads/attention.py): the FlexAttention BlockMask and the flash-attn
varlen layout give the dense-mask reference's attention, and packed batches under them give plain rows' rewards,
loss and gradients for every packed family, with and without images, N = 2 and 5."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.nn.attention.flex_attention import flex_attention
from transformers import AutoProcessor

from collators import ConversationRenderer, PairCollator
from collators.packed_pair_collator import PAD, PROMPT, PackedPairCollator, pack_conversations
from heads import ValueHeadRewardModel
from heads.attention import (
    BLOCK_SIZE,
    block_sparse_attention,
    load_attention,
    shared_prefix_block_mask,
    shared_prefix_varlen_attention,
    varlen_attention_reference,
    varlen_layout,
)
from heads.packing import shared_prompt_mask

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen2")
IMPLEMENTATIONS = ("flex_attention", "shared_prefix_varlen")  # the varlen path runs the torch reference kernel on CPU
TOLERANCE = dict(atol=1e-4, rtol=0)
# Gradients reach hundreds (a head of std 1), and an embedding row sums over every position of its token: float32
# summation order alone moves them by up to ~1e-5 relative (the dense mask against rows as much as flex or varlen).
GRAD_TOLERANCE = dict(atol=1e-4, rtol=1e-5)
CUDA_FLASH = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def segments(*rows):
    """Rows of (segment id, run length), right padded with PAD to one length."""
    ids = [[segment for segment, n in row for _ in range(n)] for row in rows]
    length = max(map(len, ids))
    return torch.tensor([row + [PAD] * (length - len(row)) for row in ids])


# Several blocks of 128 tokens, a prompt longer than a block, branches straddling block edges, left padding (a plain
# row) and a row whose prompt is empty.
LONG = segments([(PROMPT, 300), (1, 90), (2, 200), (3, 5), (4, 100)],
                [(PROMPT, 40), (1, 300), (2, 12)],
                [(PAD, 150), (PROMPT, 500)],
                [(1, 20), (2, 30)])


def dense_attention(query, key, value, segment_ids):
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=shared_prompt_mask(segment_ids), enable_gqa=True)


def random_qkv(segment_ids, heads=4, kv_heads=2, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch, length = segment_ids.shape
    shape = lambda h: (batch, h, length, dim)  # noqa: E731
    return [torch.randn(shape(h), generator=generator, requires_grad=True) for h in (heads, kv_heads, kv_heads)]


def real(output, segment_ids):
    """[B, H, L, D] outputs at real tokens only (padding queries are never read)."""
    return output.transpose(1, 2)[segment_ids != PAD]


def test_varlen_layout_puts_the_prompt_once_in_queries_and_before_each_branch_in_keys():
    layout = varlen_layout(segments([(PROMPT, 2), (1, 2), (2, 1), (3, 2)], [(PROMPT, 3), (1, 1)]))
    length = 7
    assert layout.query_index.tolist() == [0, 1, 2, 3, 4, 5, 6, length + 0, length + 1, length + 2, length + 3]
    assert layout.key_index.tolist() == [0, 1, 2, 3, 0, 1, 4, 0, 1, 5, 6, length + 0, length + 1, length + 2, length + 3]
    assert layout.cu_seqlens_q.tolist() == [0, 4, 5, 7, 11]
    assert layout.cu_seqlens_k.tolist() == [0, 4, 7, 11, 15]
    assert layout.cu_seqlens_q.dtype == torch.int32 and (layout.max_seqlen_q, layout.max_seqlen_k) == (4, 4)


def test_reference_varlen_is_bottom_right_causal_with_gqa():
    generator = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 4, 8, generator=generator), torch.randn(5, 2, 8, generator=generator), \
        torch.randn(5, 2, 8, generator=generator)
    out = varlen_attention_reference(q, k, v, torch.tensor([0, 3], dtype=torch.int32),
                                     torch.tensor([0, 5], dtype=torch.int32), 3, 5, causal=True)
    for i in range(3):  # query i sees keys 0 .. 2 + i
        keys, values = k[:3 + i].repeat_interleave(2, dim=1), v[:3 + i].repeat_interleave(2, dim=1)
        weights = torch.einsum("hd,khd->hk", q[i], keys).div(8 ** 0.5).softmax(-1)
        torch.testing.assert_close(out[i], torch.einsum("hk,khd->hd", weights, values))


@pytest.mark.skipif(not CUDA_FLASH, reason="flash-attn's kernel runs on a GPU with flash-attn installed")
def test_flash_attn_varlen_func_matches_the_reference_on_the_layout():
    """The real flash_attn_varlen_func, whenever it imports, computes what the reference does on our layout."""
    from flash_attn import flash_attn_varlen_func

    layout = varlen_layout(LONG.cuda())
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(len(layout.query_index), 4, 64, generator=generator)
    k, v = (torch.randn(len(layout.key_index), 2, 64, generator=generator) for _ in range(2))
    lengths = (layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_seqlen_q, layout.max_seqlen_k)
    out = flash_attn_varlen_func(q.cuda().bfloat16(), k.cuda().bfloat16(), v.cuda().bfloat16(), *lengths, causal=True)
    expected = varlen_attention_reference(q, k, v, *(t.cpu() if torch.is_tensor(t) else t for t in lengths), causal=True)
    torch.testing.assert_close(out.float().cpu(), expected, atol=2e-2, rtol=0)


def test_varlen_glue_equals_the_dense_mask_forward_and_backward():
    q, k, v = random_qkv(LONG)
    out, _ = shared_prefix_varlen_attention(None, q, k, v, None, shared_prefix_layout=varlen_layout(LONG))
    expected = dense_attention(q, k, v, LONG).transpose(1, 2)
    real_tokens = LONG != PAD
    torch.testing.assert_close(out[real_tokens], expected[real_tokens], atol=1e-5, rtol=0)
    assert out[~real_tokens].abs().sum() == 0
    grads = torch.autograd.grad(out[real_tokens].sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected[real_tokens].sum(), (q, k, v))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-4, rtol=0)


def test_block_mask_classifies_every_block_as_the_dense_mask_does():
    block_mask = shared_prefix_block_mask(LONG)
    dense = shared_prompt_mask(LONG)[:, 0]
    length = LONG.shape[1]
    for b in range(LONG.shape[0]):
        for q_block in range(block_mask.kv_num_blocks.shape[-1]):
            rows = dense[b, q_block * BLOCK_SIZE:(q_block + 1) * BLOCK_SIZE]
            partial = block_mask.kv_indices[b, 0, q_block, :block_mask.kv_num_blocks[b, 0, q_block]].tolist()
            full = block_mask.full_kv_indices[b, 0, q_block, :block_mask.full_kv_num_blocks[b, 0, q_block]].tolist()
            assert not set(partial) & set(full)
            for k_block in range(-(-length // BLOCK_SIZE)):
                block = rows[:, k_block * BLOCK_SIZE:(k_block + 1) * BLOCK_SIZE]
                if k_block in full:
                    assert block.all(), (b, q_block, k_block)
                elif k_block not in partial:
                    assert not block.any(), (b, q_block, k_block)
    assert block_mask.full_kv_num_blocks.sum() > 0  # the long prompt has whole blocks below the diagonal
    # The mask's own storage: block indices, not an L x L tensor.
    assert block_mask.kv_indices.numel() == LONG.shape[0] * (-(-length // BLOCK_SIZE)) ** 2


def test_block_mask_through_torch_flex_attention_and_the_cpu_loop_equals_the_dense_mask():
    q, k, v = random_qkv(LONG)
    block_mask = shared_prefix_block_mask(LONG)
    expected = dense_attention(q, k, v, LONG)
    with torch.no_grad():  # torch's FlexAttention runs forward only on CPU
        flex = flex_attention(q.detach(), k.detach(), v.detach(), block_mask=block_mask, enable_gqa=True)
        torch.testing.assert_close(real(flex, LONG),
                                   real(expected, LONG), atol=1e-5, rtol=0)
    out = block_sparse_attention(q, k, v, block_mask)
    torch.testing.assert_close(real(out, LONG), real(expected, LONG), atol=1e-5, rtol=0)
    grads = torch.autograd.grad(real(out, LONG).sum(), (q, k, v))
    expected_grads = torch.autograd.grad(real(expected, LONG).sum(), (q, k, v))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-4, rtol=0)


def pairs(with_images):
    red, blue = Image.new("RGB", (112, 112), (200, 20, 20)), Image.new("RGB", (140, 84), (20, 20, 200))
    rows = [
        {"images": [red], "prompt": "What colour is the shape in the image?", "chosen": "The shape is red.",
         "rejected": "The shape is blue, I think, or maybe green."},
        {"images": [], "prompt": "Which number is larger, 3 or 14? " * 12, "chosen": "14 is larger.", "rejected": "3"},
        {"images": [blue], "prompt": "Where is the dot?", "chosen": "top", "rejected": "The dot is at the bottom left."},
    ]
    return rows if with_images else [dict(row, images=[]) for row in rows]


def groups(with_images):
    """N = 5 and N = 2, one prompt long enough to cross FlexAttention's 128-token blocks."""
    image = [Image.new("RGB", (112, 84), (200, 20, 20))] if with_images else []
    return [
        (image, "What colour is the shape in the image? Answer with one word. " * 10,
         ["red", "The shape is red.", "blue", "It is green, or maybe blue, I cannot tell from here." * 3, "red red"]),
        ([], "Where is the dot?", ["top", "The dot is at the bottom left."]),
    ]


def load(tiny_checkpoints, family, attn_implementation="sdpa", like=None):
    path = tiny_checkpoints(family)
    model = ValueHeadRewardModel.from_pretrained(path, new_value_head=True, dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    if like is None:
        torch.nn.init.normal_(model.v_head.summary.weight, std=1.0)  # a head that tells responses apart
    else:
        model.load_state_dict(like.state_dict())
    return model, AutoProcessor.from_pretrained(path)


def rewards_loss_grads(model, batch, weights):
    model.zero_grad()
    rewards = model(**batch).logits
    loss = (rewards.squeeze(-1) * weights).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return rewards.detach(), loss.detach(), grads


def assert_same(result, expected):
    (rewards, loss, grads), (expected_rewards, expected_loss, expected_grads) = result, expected
    torch.testing.assert_close(rewards, expected_rewards, **TOLERANCE)
    torch.testing.assert_close(loss, expected_loss, **TOLERANCE)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **GRAD_TOLERANCE, msg=lambda m: f"{name}: {m}")


CASES = [(family, images, n) for family in FAMILIES for images in (True, False) for n in (2, 5)
         if not (family == "qwen2" and images)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family,with_images,n", CASES)
def test_packed_equals_plain_rows(tiny_checkpoints, family, with_images, n, implementation):
    reference, processor = load(tiny_checkpoints, family)
    model, _ = load(tiny_checkpoints, family, implementation, like=reference)
    assert model.config.get_text_config()._attn_implementation.startswith("shared_prefix_")
    if n == 2:  # preference pairs, as training packs them
        examples = pairs(with_images)
        plain, packed = PairCollator(processor)(examples), PackedPairCollator(processor)(examples)
    else:  # N-way scoring groups
        renderer = ConversationRenderer(processor)
        packed = pack_conversations(renderer, [[{"images": images, "prompt": prompt, "response": response}
                                                  for response in responses] for images, prompt, responses in groups(with_images)])
        plain = renderer([{"images": images, "prompt": prompt, "response": response}
                          for images, prompt, responses in groups(with_images) for response in responses])
    assert "segment_ids" in packed and (packed["segment_ids"] > PROMPT).sum(-1).max() > 0
    weights = torch.randn(plain["input_ids"].shape[0], generator=torch.Generator().manual_seed(0))
    expected = rewards_loss_grads(reference, plain, weights)
    assert expected[0].std() > 1e-3  # the rewards differ, so a mixed-up branch would show
    assert_same(rewards_loss_grads(model, packed, weights), expected)
    assert_same(rewards_loss_grads(model, plain, weights), expected)  # plain rows through the same functions


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))
def test_image_inside_an_answer_packs_in_its_branch(tiny_checkpoints, family, implementation):
    """An answer's own image sits in its branch: flex and varlen give the dense-mask reference's packed results
    (which tests/test_nway.py holds to plain rows)."""
    reference, processor = load(tiny_checkpoints, family)
    model, _ = load(tiny_checkpoints, family, implementation, like=reference)
    examples = pairs(True)
    examples[0]["chosen"] = [{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "Like this."}]}]
    examples[0]["images"] = examples[0]["images"] + [Image.new("RGB", (84, 56), (0, 0, 255))]
    packed = PackedPairCollator(processor)(examples)
    assert "segment_ids" in packed and packed["image_grid_thw"].shape[0] == 4  # 3 prompt images + the answer's
    weights = torch.randn(2 * len(examples), generator=torch.Generator().manual_seed(0))
    assert_same(rewards_loss_grads(model, packed, weights), rewards_loss_grads(reference, packed, weights))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_reward_scorer_packs_n_responses_under_each_implementation(tiny_checkpoints, implementation):
    from collators.packed_pair_collator import supports_packing
    from heads import RewardScorer

    reference, processor = load(tiny_checkpoints, "qwen2_5_vl")
    model, _ = load(tiny_checkpoints, "qwen2_5_vl", implementation, like=reference)
    assert supports_packing(model)
    items = [{"images": images, "prompt": prompt, "response": response}
             for images, prompt, responses in groups(True) for response in responses]
    packed = RewardScorer(model, processor).score(items)
    rows = RewardScorer(reference, processor, shared_prompt=False).score(items)
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(rows), **TOLERANCE)


def test_attention_functions_are_the_ones_that_run(tiny_checkpoints, monkeypatch):
    """The shared-prefix functions are really called (packed and plain), and no L x L mask is built."""
    import heads.attention as attention
    import heads.packing as packing

    calls = []
    for name in ("block_sparse_attention", "varlen_attention_reference"):
        original = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    monkeypatch.setattr(packing, "shared_prompt_mask", lambda *a: pytest.fail("dense mask built"))
    reference, processor = load(tiny_checkpoints, "qwen2_5_vl")
    examples = pairs(True)
    for implementation, expected_call in zip(IMPLEMENTATIONS, ("block_sparse_attention", "varlen_attention_reference")):
        model, _ = load(tiny_checkpoints, "qwen2_5_vl", implementation, like=reference)
        for collator in (PackedPairCollator(processor), PairCollator(processor)):
            calls.clear()
            with torch.no_grad():
                model(**collator(examples))
            assert calls and set(calls) == {expected_call}


def test_load_attention_maps_user_choices_and_refuses_what_cannot_run(tiny_checkpoints):
    from transformers import AutoConfig

    vl, text = AutoConfig.from_pretrained(tiny_checkpoints("qwen2_5_vl")), AutoConfig.from_pretrained(tiny_checkpoints("qwen2"))
    assert load_attention("sdpa", vl) == "sdpa" and load_attention("eager", vl) == "eager"
    assert load_attention("flex_attention", vl) == {"": "shared_prefix_flex", "text_config": "shared_prefix_flex",
                                                    "vision_config": "sdpa"}
    assert load_attention("flex_attention", text) == "shared_prefix_flex"
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="pip install flash-attn"):
            load_attention("flash_attention_2", vl)
    else:
        assert load_attention("flash_attention_2", vl)["vision_config"] == "flash_attention_2"


def test_packing_refuses_other_attention_with_a_clear_message(tiny_checkpoints):
    model, processor = load(tiny_checkpoints, "qwen2_5_vl", "eager")
    with pytest.raises(ValueError, match="sdpa, flex_attention or flash_attention_2"):
        model(**PackedPairCollator(processor)(pairs(False)))


def test_demo_preset_trains_to_the_same_losses_with_every_attention(tiny_checkpoints, tmp_path, monkeypatch):
    """recipes/stage1.py with the demo preset (recipes/demo/stage1.yaml) on the demo's synthetic pairs: four steps
    of 16 pairs, packed under the dense mask, FlexAttention and varlen, and as two rows; the logged losses agree."""
    import stage1
    from synthetic_data import write_image_pairs
    from trl import ModelConfig, RewardConfig, TrlParser

    from collators import PreferenceDataArguments
    from heads import RewardModelArguments, VLRewardTrainer

    data = write_image_pairs(tmp_path / "stage1.jsonl", 64, seed=1)
    parser = TrlParser((PreferenceDataArguments, RewardModelArguments, RewardConfig, ModelConfig))
    logged = []
    log = VLRewardTrainer.log
    monkeypatch.setattr(VLRewardTrainer, "log", lambda self, logs, *a: (logged.append(logs), log(self, logs, *a)))
    losses = {}
    for run, extra in {"dense": ["--attn_implementation", "sdpa"], "flex": ["--attn_implementation", "flex_attention"],
                       "varlen": ["--attn_implementation", "shared_prefix_varlen"],
                       "two rows": ["--attn_implementation", "sdpa", "--pack_pairs", "false"]}.items():
        logged.clear()
        stage1.main(*parser.parse_args_and_config([
            "--config", str(ROOT / "recipes" / "demo" / "stage1.yaml"), "--model_name_or_path", str(tiny_checkpoints("qwen2_5_vl")),
            "--dataset_mixture", str(data), "--output_dir", str(tmp_path / run), "--max_steps", "4",
            "--logging_steps", "1", "--disable_tqdm", "true", *extra]))
        losses[run] = torch.tensor([entry["loss"] for entry in logged if "loss" in entry])
    assert len(losses["dense"]) == 4 and losses["dense"][0] != losses["dense"][-1]  # it trained
    for run in ("flex", "varlen", "two rows"):
        torch.testing.assert_close(losses[run], losses["dense"], atol=1e-4, rtol=0, msg=lambda m: f"{run}: {m}")


def test_gpu_benchmark_runs_its_code_path_tiny_on_cpu(tmp_path):
    """recipes/bench/gpu.py as typed, with --tiny --device cpu: every implementation and shape runs, and the packed
    implementations' rewards equal the rows' (fp32 here; the GPU run reports the bf16 differences)."""
    import subprocess

    output = tmp_path / "gpu.md"
    command = [sys.executable, str(ROOT / "recipes" / "bench" / "gpu.py"), "--tiny", "--device", "cpu", "--steps", "1",
               "--output", str(output)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    table = [line.strip(" |").split(" | ") for line in output.read_text().splitlines() if line.startswith("| ")]
    rows = [cells for cells in table if cells[1] in ("rows", "dense", "varlen", "flex")]
    assert len(rows) == 4 * 4 and {cells[1] for cells in rows} == {"rows", "dense", "varlen", "flex"}
    for cells in rows:
        assert float(cells[3]) > 0, cells  # pairs/s measured
        if cells[1] != "rows":
            assert float(cells[6]) < 1e-4, cells
    refused = subprocess.run([sys.executable, str(ROOT / "recipes" / "bench" / "gpu.py")], capture_output=True,
                             text=True, timeout=600)
    if not torch.cuda.is_available():
        assert refused.returncode == 2 and "--tiny --device cpu" in refused.stderr


def test_attention_benchmark_runs_a_short_length(tmp_path):
    """recipes/bench/attention.py (make bench runs it at 2k-32k) at one short length: all three paths run, and the
    mask column is the dense L x L booleans against a few kilobytes of block tables and indices."""
    import subprocess

    output = tmp_path / "attention.md"
    subprocess.run([sys.executable, str(ROOT / "recipes" / "bench" / "attention.py"), "--lengths", "512",
                    "--output", str(output)], check=True, capture_output=True, text=True, timeout=600)
    row = next(line for line in output.read_text().splitlines() if line.startswith("| 512 "))
    cells = row.strip(" |").split(" | ")
    assert "failed" not in cells and all(float(cell) > 0 for cell in cells[1:4])
    dense_mb, flex_mb, varlen_mb = map(float, cells[-3:])
    assert dense_mb == 512 * 512 / 2**20 and flex_mb < dense_mb / 10 and varlen_mb < dense_mb / 10
