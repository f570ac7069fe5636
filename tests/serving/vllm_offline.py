"""Runs in the vLLM venv (.venv-vllm): score rendered conversations with vLLM's offline pooling runner.

    .venv-vllm/bin/python tests/serving/vllm_offline.py EXPORT_DIR rows.json scores.json
rows.json: [{"text": chat-templated conversation, "images": [png paths], "videos": [{"frames": [png paths], "fps":
frames per second they were sampled at}]}]; scores.json: one raw reward per row.
"""

import json
import sys

import numpy as np
from PIL import Image
from vllm import LLM


def video(frames: list[str], fps: float) -> tuple[np.ndarray, dict]:
    """Frames already sampled, with the metadata vLLM's Qwen2.5-VL processor hands to the HF processor: no sampling,
    and the rate that spaces the temporal patches (sampled_fps = len(frames_indices) / total_num_frames * fps)."""
    array = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in frames])
    return array, {"fps": fps, "duration": len(frames) / fps, "total_num_frames": len(frames),
                   "frames_indices": list(range(len(frames))), "video_backend": "opencv", "do_sample_frames": False}


def main(model: str, rows_path: str, out_path: str):
    rows = json.load(open(rows_path))
    llm = LLM(model=model, runner="pooling", dtype="float32", max_model_len=2048,
              limit_mm_per_prompt={"image": 2, "video": 1})
    prompts = []
    for row in rows:
        media = {}
        if row.get("images"):
            media["image"] = [Image.open(p).convert("RGB") for p in row["images"]]
        if row.get("videos"):
            media["video"] = [video(v["frames"], v["fps"]) for v in row["videos"]]
        prompts.append({"prompt": row["text"], "multi_modal_data": media} if media else {"prompt": row["text"]})
    outputs = llm.classify(prompts)
    json.dump([output.outputs.probs[0] for output in outputs], open(out_path, "w"))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    main(*sys.argv[1:4])
