"""Runs in the RL clients' venv (.venv-rl): OpenRLHF's own single-turn rollout step asks our reward server.

    .venv-rl/bin/python tests/rl_clients/openrlhf_client.py spec.json rewards.json

spec.json: {"url": ".../get_reward", "processor": dir, "dataset": OpenRLHF prompt dataset (.jsonl: input, images,
label), "responses": [one per row]}. Each row's prompt is rendered by OpenRLHF's `preprocess_data` with the chat
template, tokenized with its images by `SingleTurnAgentExecutor.execute`, "generated" by an engine that answers the
given response and its stop token (vLLM's place), and scored by the executor's own `_fetch_rewards_via_http`.
rewards.json: the reward OpenRLHF got per row (None where its request failed).
"""

import asyncio
import json
import sys
from types import SimpleNamespace

from openrlhf.datasets.prompts_dataset import preprocess_data
from openrlhf.utils.agent import SingleTurnAgentExecutor
from transformers import AutoProcessor


class ScriptedEngine:
    """Stands in for OpenRLHF's vLLM engine: the response's tokens, ending with the policy's stop token."""

    def __init__(self, processor, response: str):
        tokenizer = processor.tokenizer
        self.token_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        self.text = tokenizer.decode(self.token_ids, skip_special_tokens=True)

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        output = SimpleNamespace(token_ids=self.token_ids, text=self.text, finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[output])


async def main(spec_path: str, out_path: str):
    spec = json.load(open(spec_path))
    processor = AutoProcessor.from_pretrained(spec["processor"])
    executor = SingleTurnAgentExecutor(remote_rm_url=spec["url"])
    rows = [json.loads(line) for line in open(spec["dataset"])]
    rewards = []
    for row, response in zip(rows, spec["responses"], strict=True):
        prompt, label = preprocess_data(row, input_key="input", label_key="label",
                                        apply_chat_template=processor.apply_chat_template)
        output = await executor.execute(prompt, label, SimpleNamespace(max_tokens=64, logprobs=None), max_length=4096,
                                        hf_tokenizer=processor, llm_engine=ScriptedEngine(processor, response),
                                        images=row.get("images"))
        reward = output["reward"]  # the server's `rewards` for the request of this one query, or None
        rewards.append(reward if reward is None else reward[0])
    json.dump(rewards, open(out_path, "w"))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:3]))
