"""Adapters: the public preference datasets of the paper (§3.1) into the repository's one preference schema.

An adapter turns one source row into {images, prompt, chosen, rejected} or raises `DropRow` with a reason that
the pipeline counts: `tie` (the source calls both responses equally good) or `unparsable`. Images come out as
{"bytes", "path"} entries, undecoded; the pipeline stores and checks them. The prompt is a list of
{"role", "content": str} messages and the responses are strings, so every source shares one table layout.

    llava_critic        lmms-lab/llava-critic-113k, config pairwise: question, both responses and the verdict are
                        text in the conversation, in the LLaVA-Critic, MT-bench / Arena-Hard or LLaVA-Bench layout
    rlaif_v             openbmb/RLAIF-V-Dataset
    skywork_preference  Skywork/Skywork-Reward-Preference-80K-v0.2: chosen / rejected are whole conversations
    mmpr                OpenGVLab/MMPR, unzipped: meta.json names each annotation jsonl and its image root
    preference          jsonl / parquet / hub sets already in the schema (collators/preference_data.py)
"""

import json
import re
from pathlib import Path

from datasets import Dataset, load_dataset

from collators.conversation import to_messages
from collators.preference_data import _image_entry, _undecoded_images, load_source

ADAPT_REASONS = ("tie", "unparsable")


class DropRow(Exception):
    """A row that cannot be used: `reason` is counted in the report, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _message(role: str, content: str | None) -> dict:
    return {"role": role, "content": content or ""}


def _text(value) -> str:
    """The text of a string or of chat messages (image parts are dropped: images travel in `images`)."""
    return "".join(part["text"] or "" for message in to_messages(value, "user") for part in message["content"])


def _without_image_tags(text: str | None) -> str:
    return (text or "").replace("<image>", "").strip()


def _images(value, base_dir: str | None) -> list[dict]:
    if value is None:
        return []
    return [_image_entry(image, base_dir) for image in (value if isinstance(value, list) else [value])]


# LLaVA-Critic-113k pairwise. The human turn holds the question and both responses in one of three layouts.
_LAYOUTS = (
    re.compile(r"Question:\s*(?P<q>.*?)\s*\n\s*(?:The first response|Response 1|Response A):\s*(?P<a>.*?)\s*\n\s*"
               r"(?:The second response|Response 2|Response B):\s*(?P<b>.*?)\s*(?:ASSISTANT:)?\s*$", re.S),
    re.compile(r"<\|User Prompt\|>\s*(?P<q>.*?)\s*<\|The Start of Assistant A's Answer\|>\s*(?P<a>.*?)\s*"
               r"<\|The End of Assistant A's Answer\|>\s*<\|The Start of Assistant B's Answer\|>\s*(?P<b>.*?)\s*"
               r"<\|The End of Assistant B's Answer\|>", re.S),
    re.compile(r"\[Question\]\s*(?P<q>.*?)\s*\[Assistant 1\]\s*(?P<a>.*?)\s*\[End of Assistant 1\]\s*"
               r"\[Assistant 2\]\s*(?P<b>.*?)\s*\[End of Assistant 2\]", re.S),
)
_BETTER = re.compile(r"[Tt]he better response:\s*\[?\s*(?:[Tt]he\s+)?(?:[Rr]esponse\s+)?((?i:first|second)|[12AB])\b")
_ARENA = re.compile(r"\[\[(A>>B|A>B|A=B|B>A|B>>A)\]\]")
_SCORE_LINE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*,?\s+(\d+(?:\.\d+)?)\s*(?:\n|$)")  # LLaVA-Bench: "8 6" first
_TIE = re.compile(r"\bequally good\b|\btwo responses are equally\b", re.I)


def _unbracket(text: str) -> str:
    text = text.strip()
    return text[1:-1].strip() if text.startswith("[") and text.endswith("]") else text


def parse_critic_verdict(judgement: str) -> str:
    """'a' or 'b' for the better response; raises DropRow for a tie or a verdict that cannot be read.

    The explicit verdict wins over a tie phrase in the reasoning ("both are equally detailed, but ...")."""
    better = _BETTER.findall(judgement)
    if better:
        return "a" if better[-1].lower() in ("first", "1", "a") else "b"
    arena = _ARENA.findall(judgement)
    if arena:
        if arena[-1] == "A=B":
            raise DropRow("tie", f"verdict [[A=B]]: {judgement[-160:]!r}")
        return "a" if arena[-1].startswith("A") else "b"
    scores = _SCORE_LINE.match(judgement)
    if scores:
        first, second = float(scores.group(1)), float(scores.group(2))
        if first == second:
            raise DropRow("tie", f"equal scores {first:g} {second:g}: {judgement[:160]!r}")
        return "a" if first > second else "b"
    if _TIE.search(judgement):
        raise DropRow("tie", f"the judge calls the responses equally good: {judgement[-160:]!r}")
    raise DropRow("unparsable", f"no verdict found in the judgement: {judgement[-160:]!r}")


def llava_critic(row: dict, base_dir: str | None = None) -> dict:
    turns = row["conversations"]
    human = next((t["value"] for t in turns if t["from"] == "human"), None)
    judge = next((t["value"] for t in turns if t["from"] == "gpt"), None)
    if human is None or judge is None:
        raise DropRow("unparsable", f"expected a human and a gpt turn, got {[t['from'] for t in turns]}")
    human = _without_image_tags(human)
    match = next((m for layout in _LAYOUTS if (m := layout.search(human))), None)
    if match is None:
        raise DropRow("unparsable", f"no question / first / second response found in the human turn: {human[:160]!r}")
    question, first, second = (_unbracket(match.group(k)) for k in ("q", "a", "b"))
    better = parse_critic_verdict(judge)
    chosen, rejected = (first, second) if better == "a" else (second, first)
    return {"images": _images(row.get("image"), base_dir), "prompt": [_message("user", question)],
            "chosen": chosen, "rejected": rejected}


def rlaif_v(row: dict, base_dir: str | None = None) -> dict:
    prompt = [_message("user", _without_image_tags(row["question"]))]
    return {"images": _images(row.get("image"), base_dir), "prompt": prompt, "chosen": row["chosen"],
            "rejected": row["rejected"]}


def skywork_preference(row: dict, base_dir: str | None = None) -> dict:
    chosen, rejected = row["chosen"], row["rejected"]
    if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
        raise DropRow("unparsable", "chosen and rejected must be conversations ending with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise DropRow("unparsable", "chosen and rejected differ before their last turn (not one prompt)")
    prompt = [_message(m["role"], m["content"]) for m in chosen[:-1]]
    return {"images": [], "prompt": prompt, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def mmpr(row: dict, base_dir: str | None = None) -> dict:
    return {"images": _images(row["image"], None), "prompt": [_message("user", _without_image_tags(row["question"]))],
            "chosen": row["chosen"], "rejected": row["rejected"]}


def preference(row: dict, base_dir: str | None = None) -> dict:
    images = row.get("images")
    if images is None:
        images = row.get("image")
    responses = []
    for side in ("chosen", "rejected"):
        value = row[side]
        if not isinstance(value, str) and len(value) != 1:
            raise DropRow("unparsable", f"{side} has {len(value)} messages; a response is one string or message")
        responses.append(_text(value))
    prompt = [{"role": m["role"], "content": _text([m])} for m in to_messages(row["prompt"], "user")]
    return {"images": _images(images, base_dir), "prompt": prompt, "chosen": responses[0], "rejected": responses[1]}


ADAPTERS = {
    "llava_critic": (llava_critic, "pairwise"),
    "rlaif_v": (rlaif_v, None),
    "skywork_preference": (skywork_preference, None),
    "mmpr": (mmpr, None),
    "preference": (preference, None),
}


def _resolve(meta_dir: Path, value: str) -> Path:
    """meta.json paths are relative to its folder, or to the folder above in InternVL's layout ("MMPR/...")."""
    for base in (meta_dir, meta_dir.parent):
        if (base / value).exists():
            return base / value
    raise FileNotFoundError(f"{meta_dir / 'meta.json'}: {value} found neither in {meta_dir} nor in {meta_dir.parent}")


def load_mmpr(path: str) -> Dataset:
    """Every annotation listed in MMPR's meta.json, image paths made absolute (edit meta.json to choose)."""
    meta_path = Path(path) / "meta.json" if Path(path).is_dir() else Path(path)
    meta = json.loads(meta_path.read_text())

    def rows():
        for name, entry in meta.items():
            root = _resolve(meta_path.parent, entry["root"])
            with _resolve(meta_path.parent, entry["annotation"]).open() as lines:
                for line in lines:
                    row = json.loads(line)
                    images = row.get("image") or []
                    images = [str(root / image) for image in (images if isinstance(images, list) else [images])]
                    yield {"image": images, "question": row["question"], "chosen": row["chosen"],
                           "rejected": row["rejected"], "subset": name}

    return Dataset.from_generator(rows)


def load_adapter_input(path: str, adapter: str, split: str = "train") -> tuple[Dataset, str | None]:
    """The raw rows of one source and the folder its relative image paths start from."""
    if adapter not in ADAPTERS:
        raise ValueError(f"{path}: unknown adapter {adapter!r}; choose one of {sorted(ADAPTERS)}")
    config = ADAPTERS[adapter][1]
    if adapter == "mmpr":
        dataset, base_dir = load_mmpr(path), None
    elif config is not None and not Path(path).is_file():
        dataset, base_dir = load_dataset(path, config, split=split), (path if Path(path).is_dir() else None)
    else:
        dataset, base_dir = load_source(path, split)
    return _undecoded_images(dataset), base_dir
