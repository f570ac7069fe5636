#!/usr/bin/env bash
# The venv of `make test-rl-clients`: OpenRLHF and verl, pinned, beside (not inside) the main .venv, whose
# transformers they pin otherwise (openrlhf 0.11.2: ==5.15.0, verl 0.9.1: <5.11) and whose GPU stacks (ray[default],
# deepspeed, flash-attn, vllm) a CPU test does not need. Both go in without their dependencies; only what the code
# under test imports follows: OpenRLHF's reward call (openrlhf/utils/agent.py, openrlhf/datasets) and verl's reward
# managers and reward-loop worker (verl/workers/reward_manager, verl/experimental/reward_loop).
set -euo pipefail
VENV=${1:-.venv-rl}
PYTHON=${PYTHON:-python3}
rm -rf "$VENV"
$PYTHON -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
# torch and torchvision as the main .venv pins them (their wheels lie on this machine's disk); our own code under
# test (recipes/serve/rl_rewards.py) imports collators/, hence datasets, pillow and httpx at the main .venv's pins.
$PIP install -q torch==2.14.1 torchvision==0.29.1 transformers==5.23.0 datasets==5.2.0 pillow==13.0.0 httpx==0.28.1
$PIP install -q --no-deps openrlhf==0.11.2 verl==0.9.1
# openrlhf.utils imports sympy and pylatexenc (math grading) at package import; agent.py posts with aiohttp.
# verl.protocol imports ray and tensordict at module level; its configs are omegaconf; the reward loop times with codetiming.
$PIP install -q aiohttp==3.14.5 sympy==1.14.0 pylatexenc==2.11 ray==2.55.0 tensordict==0.10.0 omegaconf==2.4.0 \
    codetiming==1.4.0
$VENV/bin/python -c "
from openrlhf.utils.agent import SingleTurnAgentExecutor
from verl.workers.reward_manager import BatchRewardManager, NaiveRewardManager
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
import openrlhf, verl; print('openrlhf', __import__('importlib.metadata').metadata.version('openrlhf'), 'verl', verl.__version__)"
