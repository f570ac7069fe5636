"""Build Mixed Preference Optimization data with the reward model (paper §6): N responses per prompt, scored, paired.

1. Candidates: each input row has `responses` (N candidate answers), or a policy generates N samples per prompt
   (`--policy_model_name_or_path`, transformers generation; `--use_vllm` when vLLM is installed).
2. Scoring: the reward model scores every response; the N responses of a prompt go through one packed forward
   (the image and the prompt are encoded once, see heads/scoring.py).
3. Pairs, one per prompt (the pair policy):
   - chosen = the response with the highest reward, rejected = the one with the lowest;
   - when the row has a ground-truth `answer` and --require_correct (the default, as MPO's data pipeline), chosen
     is the highest-reward *correct* response and rejected the lowest-reward *incorrect* one. A response is correct
     when its final answer (what follows the last "answer is" / "Answer:", or the last \\boxed{...}; else the whole
     response) contains the ground truth as a whole word, ignoring case;
   - a prompt is dropped, and counted per reason, when it has fewer than two distinct responses, no correct or no
     incorrect response (with an answer), or a reward margin (chosen - rejected) not above --min_margin.
Writes to --output_dir: pairs.parquet in TRL's preference format with images (`images`, `prompt`, `chosen`,
`rejected` as chat messages, the images embedded; plus `chosen_reward`, `rejected_reward`, `row`, `id`),
report.json (prompts in, pairs out, drops per reason, margins, agreement of the pairs with the ground truth),
margins.png, and scored.jsonl (one line per prompt: key, id, its responses and their rewards) with
scored.provenance.json (the reward model, a fingerprint of its weights, its settings, and what made the responses:
the policy or "input responses", and the generation settings).

A rerun resumes: prompts already in scored.jsonl are not generated or scored again. They are found by a hash of their
content (id, prompt, images by their bytes, input responses), never by line number, so an input edited, reordered or
grown since gets each prompt's own responses and rewards; a rerun with another reward model or other generation
settings stops and says so (--overwrite true discards the scores and starts afresh).
Under torchrun / accelerate launch the processes split the prompts still to score, each appends to its own part
file (scored.part-<rank>.jsonl, folded into scored.jsonl at the end, or by the rerun of an interrupted run), and
the main process builds the pairs (recipes/shared/resumable.py):

    python recipes/mpo/build_mpo_data.py --input prompts.jsonl --reward_model Skywork/Skywork-VL-Reward-7B \
        --output_dir data/mpo
    accelerate launch --num_processes 8 recipes/mpo/build_mpo_data.py --input prompts.jsonl \
        --policy_model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct --num_responses 8 \
        --reward_model Skywork/Skywork-VL-Reward-7B --output_dir data/mpo

Input: a jsonl file, one prompt per line: `prompt` (string or chat messages), `images` (paths relative to the file;
or `image`, one path or null), optional `id`, `responses` (list of strings) and `answer` (ground truth).
"""

import json
import logging
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: heads/, collators/, recipes/

import numpy as np
from accelerate import PartialState
from datasets import Dataset, Features, Image, Sequence, Value
from matplotlib.figure import Figure
from trl import TrlParser

from collators import PixelBudgetArguments, to_messages
from collators.conversation import conversation
from heads import RewardScorer
from heads.value_head import auto_class
from recipes.shared.images import image_digest, resolve_image
from recipes.shared.resumable import content_key, part_files, process_state, read_records, score_resumably

logger = logging.getLogger(__name__)

PAIRS_FILE, REPORT_FILE, MARGINS_PLOT, SCORED_FILE = "pairs.parquet", "report.json", "margins.png", "scored.jsonl"
DROP_REASONS = ("fewer_than_two_distinct_responses", "no_correct_response", "no_incorrect_response",
                "margin_not_above_min_margin")
MESSAGE = [{"role": Value("string"), "content": [{"type": Value("string"), "text": Value("string")}]}]
PAIR_FEATURES = Features({
    "images": Sequence(Image()), "prompt": MESSAGE, "chosen": MESSAGE, "rejected": MESSAGE,
    "chosen_reward": Value("float64"), "rejected_reward": Value("float64"), "row": Value("int64"), "id": Value("string"),
})


@dataclass
class BuildMPODataArguments(PixelBudgetArguments):
    input: str | None = field(default=None, metadata={"help": "Prompts (jsonl): prompt, images, optional id, responses, answer."})
    output_dir: str = field(default="data/mpo", metadata={"help": "Where pairs.parquet, the report and scored.jsonl go."})
    reward_model: str | None = field(default=None, metadata={"help": "The reward model (directory or hub id) that scores."})
    policy_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Generates the responses of rows without `responses`."})
    num_responses: int = field(default=8, metadata={"help": "Responses generated per prompt."})
    max_new_tokens: int = field(default=512, metadata={"help": "Generation length limit."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of generation."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of generation."})
    generation_batch_size: int = field(default=4, metadata={"help": "Prompts per generate call (transformers)."})
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (must be installed)."})
    batch_size: int = field(default=16, metadata={"help": "Responses per reward-model forward pass."})
    min_margin: float = field(default=0.0, metadata={"help": "Keep a pair only when r(chosen) - r(rejected) > this."})
    require_correct: bool = field(
        default=True, metadata={"help": "With a ground-truth `answer`: chosen must be correct, rejected incorrect."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    prompts_per_write: int = field(default=16, metadata={"help": "An interrupted run loses at most this many prompts."})
    dtype: str | None = field(default=None, metadata={"help": "bfloat16 on GPU and float32 on CPU unless set."})
    seed: int = field(default=42, metadata={"help": "Generation seed (per process: seed + process index)."})
    overwrite: bool = field(
        default=False, metadata={"help": "Discard scores in output_dir that another reward model or other generation "
                                 "settings produced (without it such a rerun stops and says so)."},
    )

    def __post_init__(self):
        if not self.input or not self.reward_model:
            raise ValueError("--input (a jsonl of prompts) and --reward_model are required")


def read_prompts(path: str | Path, max_samples: int | None = None) -> list[dict]:
    """The input rows, checked: a clear error names the file and the line."""
    path = Path(path)
    rows = []
    with path.open() as file:
        for number, line in enumerate(file, start=1):
            if max_samples is not None and len(rows) == max_samples:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not valid JSON ({error})") from error
            if not row.get("prompt"):
                raise ValueError(f"{path}: line {number} has no `prompt`")
            images = row.get("images")
            if images is None:
                images = [row["image"]] if row.get("image") is not None else []
            resolved = [resolve_image(image, str(path.parent), f"{path}: line {number}") for image in images]
            responses = row.get("responses")
            if responses is not None and (not isinstance(responses, list)
                                          or not all(isinstance(r, str) for r in responses)):
                raise ValueError(f"{path}: line {number}: `responses` must be a list of strings")
            key = content_key(id=row.get("id"), prompt=row["prompt"], responses=responses,
                              images=[image_digest(image) for image in resolved])
            rows.append({"row": len(rows), "key": key, "id": str(row.get("id", len(rows))), "prompt": row["prompt"],
                         "images": resolved, "responses": responses, "answer": row.get("answer")})
    return rows


def final_answer(response: str) -> str:
    boxed = response.rfind("\\boxed{")
    if boxed >= 0:
        end = response.find("}", boxed)
        return response[boxed + 7:end if end >= 0 else None]
    parts = re.split(r"answer is|answer:", response, flags=re.IGNORECASE)
    return parts[-1]


def is_correct(response: str, answer) -> bool:
    """The ground truth appears as a whole word (or phrase) in the response's final answer, ignoring case."""
    pattern = r"(?<!\w)" + re.escape(str(answer).strip().lower()) + r"(?!\w)"
    return re.search(pattern, final_answer(response).lower()) is not None


def choose_pair(responses: list[str], rewards: list[float], correct: list[bool] | None, min_margin: float,
                require_correct: bool) -> tuple[int, int] | str:
    """(chosen index, rejected index) by the pair policy of the module docstring, or the reason for a drop."""
    if len(set(responses)) < 2:
        return "fewer_than_two_distinct_responses"
    candidates_chosen = candidates_rejected = range(len(responses))
    if correct is not None and require_correct:
        candidates_chosen = [i for i in range(len(responses)) if correct[i]]
        candidates_rejected = [i for i in range(len(responses)) if not correct[i]]
        if not candidates_chosen:
            return "no_correct_response"
        if not candidates_rejected:
            return "no_incorrect_response"
    chosen = max(candidates_chosen, key=lambda i: rewards[i])
    rejected = min((i for i in candidates_rejected if responses[i] != responses[chosen]), key=lambda i: rewards[i])
    if not rewards[chosen] - rewards[rejected] > min_margin:
        return "margin_not_above_min_margin"
    return chosen, rejected


class Generator:
    """N sampled responses per prompt from the policy: transformers' generate, or vLLM when asked for."""

    def __init__(self, args: BuildMPODataArguments, device):
        import torch
        from transformers import AutoConfig, AutoProcessor

        self.args = args
        self.processor = AutoProcessor.from_pretrained(args.policy_model_name_or_path)
        if args.use_vllm:
            from vllm import LLM, SamplingParams  # optional: pip install vllm

            self.llm = LLM(args.policy_model_name_or_path, seed=args.seed)
            self.sampling = SamplingParams(n=args.num_responses, temperature=args.temperature, top_p=args.top_p,
                                           max_tokens=args.max_new_tokens)
            return
        auto = auto_class(AutoConfig.from_pretrained(args.policy_model_name_or_path))
        dtype = args.dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        self.model = auto.from_pretrained(args.policy_model_name_or_path, dtype=dtype).to(device).eval()

    def messages(self, row: dict) -> list[dict]:
        return conversation(to_messages(row["prompt"], "user"), [], len(row["images"]))

    def __call__(self, rows: list[dict]) -> list[list[str]]:
        import torch
        from PIL import Image as PILImage

        texts = [self.processor.apply_chat_template(self.messages(row), tokenize=False, add_generation_prompt=True)
                 for row in rows]
        images = [[PILImage.open(path).convert("RGB") for path in row["images"]] for row in rows]
        if self.args.use_vllm:
            requests = [{"prompt": text, "multi_modal_data": {"image": imgs}} if imgs else {"prompt": text}
                        for text, imgs in zip(texts, images)]
            return [[completion.text for completion in output.outputs] for output in self.llm.generate(requests, self.sampling)]
        flat_images = [image for imgs in images for image in imgs]
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        kwargs = dict(text=texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
        if flat_images:
            kwargs["images"] = flat_images
        inputs = self.processor(**kwargs).to(self.model.device)
        with torch.no_grad():
            output = self.model.generate(
                **inputs, do_sample=True, temperature=self.args.temperature, top_p=self.args.top_p,
                max_new_tokens=self.args.max_new_tokens, num_return_sequences=self.args.num_responses,
                pad_token_id=tokenizer.pad_token_id)
        decoded = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        n = self.args.num_responses
        return [[text.strip() for text in decoded[i * n:(i + 1) * n]] for i in range(len(rows))]


def candidates_provenance(args: BuildMPODataArguments, rows: list[dict]) -> dict:
    """What makes the responses that are scored: the input's own, or the policy and its generation settings."""
    if all(row["responses"] is not None for row in rows):
        return {"policy": "input responses"}
    return {"policy": args.policy_model_name_or_path, "num_responses": args.num_responses,
            "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed, "use_vllm": args.use_vllm}


def score_prompts(args: BuildMPODataArguments, rows: list[dict], state: PartialState) -> dict[int, dict]:
    """Generates (for rows without `responses`) and scores the prompts not yet in output_dir/scored.jsonl, shared
    out across the processes; returns every prompt's record {key: {key, id, responses, rewards}}."""
    path = Path(args.output_dir) / SCORED_FILE
    done = set() if args.overwrite else {record.get("key") for file in [path, *part_files(path)]
                                         for record in read_records(file)}
    missing = next((row for row in rows if row["key"] not in done and row["responses"] is None), None)
    if missing is not None and not args.policy_model_name_or_path:
        raise ValueError(f"{args.input}: row {missing['row']} has no `responses`; give them or a "
                         "--policy_model_name_or_path to generate them")
    scorer = RewardScorer.from_pretrained(args.reward_model, device=str(state.device), dtype=args.dtype,
                                          batch_size=args.batch_size,
                                          min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    generator = None

    def score(chunk: list[dict]) -> list[dict]:
        nonlocal generator
        need = [row for row in chunk if row["responses"] is None]
        if need and generator is None:  # loaded only when a prompt to score has no responses
            import torch
            torch.manual_seed(args.seed + state.process_index)
            generator = Generator(args, state.device)
        for i in range(0, len(need), args.generation_batch_size):
            batch = need[i:i + args.generation_batch_size]
            for row, responses in zip(batch, generator(batch)):
                row["responses"] = responses
        items = [{"images": row["images"], "prompt": row["prompt"], "response": response}
                 for row in chunk for response in row["responses"]]
        rewards = iter(scorer.score(items))
        return [{"key": row["key"], "id": row["id"], "responses": row["responses"],
                 "rewards": [next(rewards) for _ in row["responses"]]} for row in chunk]

    return score_resumably(path, [(row["key"], row) for row in rows], score,
                           provenance={**scorer.provenance(), **candidates_provenance(args, rows)},
                           overwrite=args.overwrite, per_write=args.prompts_per_write, desc="Scoring prompts")


def build_pairs(args: BuildMPODataArguments, rows: list[dict], scored: dict[str, dict]) -> tuple[list[dict], dict]:
    pairs, drops, margins = [], Counter(), []
    agree = with_answer = best_correct = 0
    for row in rows:
        record = scored[row["key"]]
        responses, rewards = record["responses"], record["rewards"]
        correct = [is_correct(r, row["answer"]) for r in responses] if row["answer"] is not None else None
        if correct is not None and responses:
            best_correct += correct[int(np.argmax(rewards))]
        choice = choose_pair(responses, rewards, correct, args.min_margin, args.require_correct)
        if isinstance(choice, str):
            drops[choice] += 1
            continue
        chosen, rejected = choice
        margins.append(rewards[chosen] - rewards[rejected])
        if correct is not None:
            with_answer += 1
            agree += correct[chosen] and not correct[rejected]
        pairs.append({
            "images": [{"bytes": Path(p).read_bytes(), "path": None} for p in row["images"]],
            "prompt": conversation(to_messages(row["prompt"], "user"), [], len(row["images"])),
            "chosen": to_messages(responses[chosen], "assistant"),
            "rejected": to_messages(responses[rejected], "assistant"),
            "chosen_reward": rewards[chosen], "rejected_reward": rewards[rejected], "row": row["row"], "id": row["id"],
        })
    prompts_with_answer = sum(row["answer"] is not None for row in rows)
    report = {
        "prompts_in": len(rows),
        "pairs_out": len(pairs),
        "drops": {reason: drops[reason] for reason in DROP_REASONS},
        "responses_scored": sum(len(scored[row["key"]]["responses"]) for row in rows),
        "margin": {"mean": float(np.mean(margins)), "median": float(np.median(margins)),
                   "min": float(np.min(margins)), "max": float(np.max(margins))} if margins else None,
        # With ground truth: how often the reward model's own pick is right, and how often a pair has a correct chosen
        # and an incorrect rejected response (by construction 1.0 with --require_correct).
        "prompts_with_answer": prompts_with_answer,
        "best_of_n_correct": round(best_correct / prompts_with_answer, 4) if prompts_with_answer else None,
        "pairs_agreeing_with_answer": round(agree / with_answer, 4) if with_answer else None,
        "settings": {k: v for k, v in asdict(args).items() if k not in ("input", "output_dir")},
    }
    return pairs, report


def plot_margins(pairs: list[dict], path: Path) -> None:
    figure = Figure(figsize=(6, 3.5))
    axes = figure.subplots()
    axes.hist([p["chosen_reward"] - p["rejected_reward"] for p in pairs], bins=40, color="tab:blue")
    axes.set_xlabel("reward margin, chosen - rejected")
    axes.set_ylabel("pairs")
    axes.set_title(f"MPO pairs ({len(pairs)})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(args: BuildMPODataArguments) -> dict | None:
    state = process_state()
    output_dir = Path(args.output_dir)
    rows = read_prompts(args.input, args.max_samples)
    scored = score_prompts(args, rows, state)  # every process returns when all are done
    if not state.is_main_process:
        return None
    pairs, report = build_pairs(args, rows, scored)
    Dataset.from_list(pairs, features=PAIR_FEATURES).to_parquet(str(output_dir / PAIRS_FILE))
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    plot_margins(pairs, output_dir / MARGINS_PLOT)
    table = [f"{'prompts in':<36}{report['prompts_in']:>8}", f"{'pairs out':<36}{report['pairs_out']:>8}"]
    table += [f"{'dropped: ' + reason:<36}{count:>8}" for reason, count in report["drops"].items()]
    print("\n".join(table))
    return report


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    main(*TrlParser((BuildMPODataArguments,)).parse_args_and_config())
