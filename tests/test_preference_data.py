"""Loading the preference schema: relative images, mixing weights, and bad rows (error or counted drop)."""

import json

import pytest
from PIL import Image

from collators import PairCollator, load_preference_mixture
from collators.preference_data import BadRowError, PreferenceDataArguments


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (56, 56), "red").save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return tmp_path


GOOD = {"images": ["img/ok.png"], "prompt": "Colour?", "chosen": "red", "rejected": "blue"}
BAD_ROWS = {
    "missing_image": dict(GOOD, images=["img/nowhere.png"]),
    "corrupt_image": dict(GOOD, images=["img/corrupt.png"]),
    "empty_response": dict(GOOD, chosen="   "),
    "identical_responses": dict(GOOD, rejected="red"),
    "overlong": dict(GOOD, chosen="red " * 400),
}


def test_bad_rows_are_counted_and_dropped(processor, data_dir):
    rows = [GOOD, *BAD_ROWS.values(), dict(GOOD, images=[], prompt="Text only?", chosen="yes", rejected="no")]
    path = write_jsonl(data_dir / "pairs.jsonl", rows)
    dataset, report = load_preference_mixture({str(path): 1.0}, processor, max_length=128)
    entry = report[str(path)]
    assert entry["rows"] == len(rows) and entry["kept"] == 2 and len(dataset) == 2
    assert entry["dropped"] == {reason: 1 for reason in BAD_ROWS}
    assert entry["examples"]["missing_image"] == f"{path}: row 1: image file {data_dir / 'img/nowhere.png'} does not exist"
    assert "row 5" in entry["examples"]["overlong"] and "responses are never cut" in entry["examples"]["overlong"]
    # What is kept collates: one image pair and one text-only pair in the same batch.
    batch = PairCollator(processor)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["image_grid_thw"].shape[0] == 2


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_row_error_names_file_and_row(processor, data_dir, reason):
    path = write_jsonl(data_dir / "pairs.jsonl", [GOOD, GOOD, BAD_ROWS[reason]])
    with pytest.raises(BadRowError, match=rf"pairs\.jsonl: row 2: "):
        load_preference_mixture({str(path): 1.0}, processor, max_length=128, bad_rows="error")


def test_missing_column_is_an_error(processor, data_dir):
    path = write_jsonl(data_dir / "pairs.jsonl", [{"prompt": "Q", "chosen": "a"}])
    with pytest.raises(ValueError, match=r"pairs\.jsonl: missing column\(s\) \['rejected'\]"):
        load_preference_mixture({str(path): 1.0}, processor)


def test_weights_margin_and_chat_messages(processor, data_dir):
    chat = {"images": [], "prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": [{"role": "assistant", "content": "Go"}]}
    a = write_jsonl(data_dir / "a.jsonl", [dict(GOOD, margin=2.0)] * 4)
    b = write_jsonl(data_dir / "b.jsonl", [chat] * 4)
    dataset, _ = load_preference_mixture({str(a): 0.5, str(b): 2.0}, processor)
    assert len(dataset) == 2 + 8
    assert sorted(dataset["margin"]) == [0.0] * 8 + [2.0] * 2  # a source without margins trains with margin 0
    assert dataset[0]["images"][0]["path"] == str(data_dir / "img" / "ok.png")


def test_mixture_argument_from_cli_json_or_single_path():
    assert PreferenceDataArguments(dataset_mixture='{"a.jsonl": 1.0, "b": 0.5}').dataset_mixture == {"a.jsonl": 1.0, "b": 0.5}
    assert PreferenceDataArguments(dataset_mixture="org/pairs").dataset_mixture == {"org/pairs": 1.0}
    with pytest.raises(ValueError, match="bad_rows"):
        PreferenceDataArguments(bad_rows="skip")
