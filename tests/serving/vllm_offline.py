"""Runs in the vLLM venv (.venv-vllm): score rendered conversations with vLLM's offline pooling runner.

    .venv-vllm/bin/python tests/serving/vllm_offline.py EXPORT_DIR rows.json scores.json
rows.json: [{"text": chat-templated conversation, "images": [png paths]}]; scores.json: one raw reward per row.
"""

import json
import sys

from PIL import Image
from vllm import LLM


def main(model: str, rows_path: str, out_path: str):
    rows = json.load(open(rows_path))
    llm = LLM(model=model, runner="pooling", dtype="float32", max_model_len=2048, limit_mm_per_prompt={"image": 2})
    prompts = [{"prompt": row["text"], "multi_modal_data": {"image": [Image.open(p).convert("RGB") for p in row["images"]]}}
               if row["images"] else {"prompt": row["text"]} for row in rows]
    outputs = llm.classify(prompts)
    json.dump([output.outputs.probs[0] for output in outputs], open(out_path, "w"))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    main(*sys.argv[1:4])
