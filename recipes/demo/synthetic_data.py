"""Synthetic preference pairs for the CPU demo, written in the repository's preference schema.

Image pairs can only be judged by looking at the image: every answer is the chosen one as often as it is
the rejected one, so a model that ignores the image stays at chance. Tasks: the colour of a shape, the
size of a circle, the tallest bar of a bar chart, and how many shapes there are. Text-only pairs (stage 2)
compare two numbers and tell even from odd.
"""

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 112
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (235, 215, 30), "purple": (140, 40, 170), "orange": (245, 140, 20),
}
BAR_COLOURS = ["red", "green", "blue"]
COUNTS = ["one", "two", "three", "four"]


def _canvas(size: int = IMAGE_SIZE) -> Image.Image:
    return Image.new("RGB", (size, size), (245, 245, 245))


def _box(x: int, y: int, r: int) -> tuple[int, int, int, int]:
    return (x - r, y - r, x + r, y + r)


def colour_pair(rng: random.Random) -> tuple[Image.Image, str, str, str]:
    colour, other = rng.sample(sorted(COLOURS), 2)
    image, draw = _canvas(), None
    draw = ImageDraw.Draw(image)
    x, y, r = rng.randint(30, 82), rng.randint(30, 82), rng.randint(16, 26)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(_box(x, y, r), fill=COLOURS[colour])
    return image, "What colour is the shape in the image?", f"The shape is {colour}.", f"The shape is {other}."


def size_pair(rng: random.Random) -> tuple[Image.Image, str, str, str]:
    large = rng.random() < 0.5
    image = _canvas()
    x, y, r = rng.randint(36, 76), rng.randint(36, 76), rng.randint(26, 34) if large else rng.randint(6, 10)
    ImageDraw.Draw(image).ellipse(_box(x, y, r), fill=COLOURS[rng.choice(sorted(COLOURS))])
    answers = ("The circle is large.", "The circle is small.")
    return image, "Is the circle large or small?", *(answers if large else answers[::-1])


def bar_chart_pair(rng: random.Random) -> tuple[Image.Image, str, str, str]:
    """Three bars in a random order; the question names them by colour."""
    names = rng.sample(BAR_COLOURS, 3)
    heights = rng.sample(range(16, 100, 24), 3)  # at least 24 pixels apart
    image = _canvas()
    draw = ImageDraw.Draw(image)
    for i, (name, height) in enumerate(zip(names, heights)):
        x0 = 8 + i * 36
        draw.rectangle((x0, IMAGE_SIZE - 4 - height, x0 + 26, IMAGE_SIZE - 4), fill=COLOURS[name])
    tallest = names[heights.index(max(heights))]
    other = rng.choice([n for n in names if n != tallest])
    return image, "Which bar is the tallest: the red, the green or the blue one?", f"The {tallest} bar.", f"The {other} bar."


def count_pair(rng: random.Random) -> tuple[Image.Image, str, str, str]:
    count, other = rng.sample(range(1, len(COUNTS) + 1), 2)
    image = _canvas()
    draw = ImageDraw.Draw(image)
    cells = rng.sample([(x, y) for x in (28, 84) for y in (28, 84)], count)
    for x, y in cells:
        draw.rectangle(_box(x, y, 14), fill=(200, 40, 40))
    return image, "How many shapes are there?", f"The count is {COUNTS[count - 1]}.", f"The count is {COUNTS[other - 1]}."


IMAGE_TASKS = (colour_pair, size_pair, bar_chart_pair, count_pair)


def text_pair(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        a, b = rng.sample(range(21), 2)
        return f"Which number is larger, {a} or {b}?", f"{max(a, b)} is larger.", f"{min(a, b)} is larger."
    n = rng.randint(0, 20)
    right, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
    return f"Is {n} even or odd?", f"{n} is {right}.", f"{n} is {wrong}."


def write_image_rows(path: Path, n: int, seed: int, make_row) -> Path:
    """`n` rows of the image tasks as jsonl, the images as PNG files beside it (paths relative to the jsonl).
    `make_row(i, task, rng, prompt, right, wrong)` gives row i's fields besides `images` and `source`."""
    rng = random.Random(seed)
    image_dir = path.parent / f"{path.stem}_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            task = IMAGE_TASKS[i % len(IMAGE_TASKS)]
            image, prompt, right, wrong = task(rng)
            image.save(image_dir / f"{i:05d}.png")
            row = {"images": [f"{image_dir.name}/{i:05d}.png"], **make_row(i, task, rng, prompt, right, wrong),
                   "source": task.__name__}
            f.write(json.dumps(row) + "\n")
    return path


def write_image_pairs(path: Path, n: int, seed: int) -> Path:
    """`n` image preference pairs: the right answer chosen, a wrong one rejected."""
    return write_image_rows(path, n, seed, lambda i, task, rng, prompt, right, wrong: {
        "prompt": prompt, "chosen": right, "rejected": wrong})


def write_text_pairs(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n):
            prompt, chosen, rejected = text_pair(rng)
            f.write(json.dumps({"images": [], "prompt": prompt, "chosen": chosen, "rejected": rejected,
                                "source": "text_pair"}) + "\n")
    return path


def blank_image(size: int = IMAGE_SIZE) -> Image.Image:
    """What the model sees in the blind check: the same canvas with nothing drawn on it."""
    return _canvas(size)


def candidate_answers(task, right: str, rng: random.Random, n: int) -> tuple[list[str], str]:
    """Up to `n` answers of `task`'s template, the right one among them, in random order; and the ground truth."""
    options = {
        colour_pair: (sorted(COLOURS), "The shape is {}."),
        size_pair: (["large", "small"], "The circle is {}."),
        bar_chart_pair: (BAR_COLOURS, "The {} bar."),
        count_pair: (COUNTS, "The count is {}."),
    }[task]
    words, template = options
    truth = next(word for word in words if template.format(word) == right)
    chosen_words = [truth] + rng.sample([w for w in words if w != truth], min(n, len(words)) - 1)
    rng.shuffle(chosen_words)
    return [template.format(word) for word in chosen_words], truth


def write_mpo_prompts(path: Path, n: int, seed: int, responses: int = 4) -> Path:
    """`n` image prompts for MPO, each with candidate answers (right and wrong about the image) and the right one
    as `answer`."""
    def make_row(i, task, rng, prompt, right, wrong):
        answers, truth = candidate_answers(task, right, rng, responses)
        return {"id": f"{task.__name__}-{i}", "prompt": prompt, "responses": answers,
                "answer": truth}
    return write_image_rows(path, n, seed, make_row)


# Tasks that only the new inputs can teach. Motion: a shape crosses the frames of a video left to right or right to
# left; every frame alone looks alike either way, so shuffled frames leave a model at chance. Drawing: two responses
# draw a circle, one in the colour the prompt asks for; their texts are the same two phrases in random order, so a
# model blind to the responses' images stays at chance.
FRAME_SIZE = 56
MOTION_STEPS = (2, 12, 30, 40)  # the shape's left edge in each frame, moving right


def motion_frames(direction: str, rng: random.Random) -> list[Image.Image]:
    colour, y = COLOURS[rng.choice(sorted(COLOURS))], rng.randint(2, FRAME_SIZE - 16)
    frames = []
    for x in MOTION_STEPS if direction == "right" else MOTION_STEPS[::-1]:
        frame = _canvas(FRAME_SIZE)
        ImageDraw.Draw(frame).rectangle((x, y, x + 13, y + 13), fill=colour)
        frames.append(frame)
    return frames


def write_motion_pairs(path: Path, n: int, seed: int) -> Path:
    """`n` video pairs (each video a list of frame files beside the jsonl): the right direction chosen."""
    rng = random.Random(seed)
    frame_dir = path.parent / f"{path.stem}_frames"
    frame_dir.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            direction, other = ("right", "left") if i % 2 == 0 else ("left", "right")
            video = []
            for t, frame in enumerate(motion_frames(direction, rng)):
                frame.save(frame_dir / f"{i:05d}_{t}.png")
                video.append(f"{frame_dir.name}/{i:05d}_{t}.png")
            f.write(json.dumps({"videos": [video], "prompt": "Which way does the shape move?",
                                "chosen": f"It moves {direction}.", "rejected": f"It moves {other}.",
                                "source": "motion"}) + "\n")
    return path


def drawing(colour: str, rng: random.Random) -> Image.Image:
    image = _canvas(FRAME_SIZE)
    x, y = rng.randint(18, 38), rng.randint(18, 38)
    ImageDraw.Draw(image).ellipse(_box(x, y, 14), fill=COLOURS[colour])
    return image


def write_drawing_pairs(path: Path, n: int, seed: int) -> Path:
    """`n` pairs whose responses are images (inline image parts, files beside the jsonl): the one in the asked
    colour chosen."""
    rng = random.Random(seed)
    image_dir = path.parent / f"{path.stem}_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            colour, other = rng.sample(sorted(COLOURS), 2)
            texts = rng.sample(["Here it is.", "Here is the picture."], 2)
            row = {"prompt": f"Draw a {colour} circle.", "source": "drawing"}
            for side, shown, text in (("chosen", colour, texts[0]), ("rejected", other, texts[1])):
                drawing(shown, rng).save(image_dir / f"{i:05d}_{side}.png")
                row[side] = [{"role": "assistant", "content": [
                    {"type": "image", "image": f"{image_dir.name}/{i:05d}_{side}.png"}, {"type": "text", "text": text}]}]
            f.write(json.dumps(row) + "\n")
    return path
