"""Runs in the RL clients' venv (.venv-rl): verl's own reward managers call our `compute_score`, loaded from its file
as verl loads a custom reward function, with the reward_kwargs of its config.

    .venv-rl/bin/python tests/rl_clients/verl_client.py spec.json rewards.json

spec.json: {"url": reward server, "tokenizer": dir, "reward_function": path of rl_rewards.py, "rows": [{"prompt":
chat-templated prompt text, "response": str, "extra_info": {...}}]}. The rows become one DataProto as verl's rollout
leaves it (prompts left-padded, responses right-padded and ending with the stop token, one attention mask) and go
through `NaiveRewardManager`, `BatchRewardManager` (verl.workers.reward_manager) and the reward loop's
`RewardLoopWorker` (verl.experimental.reward_loop, run in this process instead of a Ray actor).
rewards.json: {"naive": [...], "batch": [...], "reward_loop": [...]}.
"""

import copy
import json
import sys

import numpy as np
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer
from verl import DataProto
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
from verl.trainer.ppo.reward import get_custom_reward_fn
from verl.workers.reward_manager import BatchRewardManager, NaiveRewardManager


def rollout_batch(tokenizer, rows: list[dict]) -> DataProto:
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] for row in rows]
    responses = [tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [stop] for row in rows]
    prompt_len, response_len = max(map(len, prompts)), max(map(len, responses))
    pad = tokenizer.pad_token_id
    prompt_ids = torch.tensor([[pad] * (prompt_len - len(p)) + p for p in prompts])
    response_ids = torch.tensor([r + [pad] * (response_len - len(r)) for r in responses])
    mask = torch.tensor([[0] * (prompt_len - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (response_len - len(r))
                         for p, r in zip(prompts, responses)])
    return DataProto.from_dict(
        tensors={"prompts": prompt_ids, "responses": response_ids, "attention_mask": mask,
                 "input_ids": torch.cat([prompt_ids, response_ids], dim=1)},
        non_tensors={"data_source": np.array(["vqa"] * len(rows), dtype=object),
                     "reward_model": np.array([{"ground_truth": None, "style": "model"} for _ in rows], dtype=object),
                     "extra_info": np.array([row["extra_info"] for row in rows], dtype=object)})


def main(spec_path: str, out_path: str):
    spec = json.load(open(spec_path))
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    config = OmegaConf.create({
        "actor_rollout_ref": {"model": {"path": spec["tokenizer"], "tokenizer_path": spec["tokenizer"]}},
        "reward": {"custom_reward_function": {"path": spec["reward_function"], "name": "compute_score",
                                              "reward_kwargs": {"reward_url": spec["url"]}},
                   "reward_manager": {"source": "register", "name": "naive"},
                   "reward_model": {"enable": False}}})
    compute_score = get_custom_reward_fn(config)  # verl's loader: the file, the name, reward_kwargs bound
    rewards = {}
    for name, manager in [("naive", NaiveRewardManager(tokenizer, num_examine=0, compute_score=compute_score)),
                          ("batch", BatchRewardManager(tokenizer, num_examine=0, compute_score=compute_score))]:
        data = rollout_batch(tokenizer, copy.deepcopy(spec["rows"]))
        rewards[name] = manager(data).sum(dim=-1).tolist()  # the reward sits on the last response token
    worker = RewardLoopWorker(config, reward_router_address=None)
    # on the worker's own event loop, as its Ray actor runs it
    outputs = worker.loop.run_until_complete(worker.compute_score_batch(rollout_batch(tokenizer, copy.deepcopy(spec["rows"]))))
    rewards["reward_loop"] = [output["reward_score"] for output in outputs]
    json.dump(rewards, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
