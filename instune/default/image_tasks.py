"""The embedded multimodal corpus: image tasks drawn with Pillow whose answers a program can check.

Domains (each `(rng) -> ImageTask`):
    count         "How many shapes?"            1-4 shapes of one kind and colour
    colour        "What colour is the shape?"   one shape
    position      "Where is the shape?"         one shape in the left/right/top/bottom of the canvas
    digit         "What digit is shown?"        a digit drawn with Pillow's font (a task type held out)
    colour_heldout  the colour task on the (shape, colour) pairs that no other domain ever draws
    digits_real   "What digit is shown?"        scikit-learn's bundled handwritten digits (load_digits)

Out-of-domain sets hold back a task type (`digit`) and attribute combinations (`colour_heldout`): HELD_OUT
pairs appear nowhere in the in-domain domains. Every image has a caption describing it (its retrieval target,
eval/retrieval.py). `generate_image_corpus` writes LLaVA JSON files (`image` + `conversations` with an
`<image>` placeholder) and the PNG files they name.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from instune.atomic import atomic_dir

CANVAS = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 220), "yellow": (230, 210, 20)}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
# (shape, colour) pairs drawn only by `colour_heldout`: a combination the model never saw in training.
HELD_OUT = {("circle", "green"), ("square", "yellow"), ("triangle", "red")}
POSITIONS = ("left", "right", "top", "bottom")

PROMPTS = {
    "count": ("How many shapes are in the picture?", "Count the shapes.", "How many objects do you see?"),
    "colour": ("What colour is the shape?", "Name the colour of the object.", "Which colour is shown?"),
    "position": ("Where is the shape?", "In which part of the picture is the object?", "Where is it placed?"),
    "digit": ("What digit is shown?", "Read the digit in the picture.", "Which number is written here?"),
}


@dataclass
class ImageTask:
    image: Image.Image
    prompt: str
    answer: str
    caption: str  # what the image shows, for retrieval


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=rgb)


def _in_domain_pair(rng: random.Random) -> tuple[str, str]:
    while True:
        pair = (rng.choice(SHAPES), rng.choice(sorted(COLOURS)))
        if pair not in HELD_OUT:
            return pair


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (CANVAS, CANVAS), (255, 255, 255))
    return image, ImageDraw.Draw(image)


def count_task(rng: random.Random) -> ImageTask:
    shape, colour = _in_domain_pair(rng)
    n = rng.randint(1, 4)
    image, draw = _canvas()
    cells = rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], n)  # one shape per quadrant: they never overlap
    for cx, cy in cells:
        x, y = cx * 16 + rng.randint(1, 4), cy * 16 + rng.randint(1, 4)
        _draw_shape(draw, shape, (x, y, x + 10, y + 10), COLOURS[colour])
    plural = "s" if n > 1 else ""
    return ImageTask(image, rng.choice(PROMPTS["count"]), str(n), f"{NUMBER_WORDS[n]} {colour} {shape}{plural}")


def _single_shape(rng: random.Random, shape: str, colour: str, position: str | None = None) -> Image.Image:
    image, draw = _canvas()
    size = rng.randint(10, 14)
    if position is None:
        x, y = rng.randint(2, CANVAS - size - 2), rng.randint(2, CANVAS - size - 2)
    else:
        centre = (CANVAS - size) // 2
        x, y = {"left": (1, centre), "right": (CANVAS - size - 1, centre), "top": (centre, 1),
                "bottom": (centre, CANVAS - size - 1)}[position]
        x, y = x + rng.randint(-1, 1), y + rng.randint(-1, 1)
    _draw_shape(draw, shape, (x, y, x + size, y + size), COLOURS[colour])
    return image


def colour_task(rng: random.Random, held_out: bool = False) -> ImageTask:
    shape, colour = rng.choice(sorted(HELD_OUT)) if held_out else _in_domain_pair(rng)
    return ImageTask(_single_shape(rng, shape, colour), rng.choice(PROMPTS["colour"]), colour, f"a {colour} {shape}")


def position_task(rng: random.Random) -> ImageTask:
    shape, colour = _in_domain_pair(rng)
    position = rng.choice(POSITIONS)
    return ImageTask(_single_shape(rng, shape, colour, position), rng.choice(PROMPTS["position"]), position,
                     f"a {colour} {shape} at the {position}")


def digit_task(rng: random.Random) -> ImageTask:
    digit = rng.randint(0, 9)
    image, draw = _canvas()
    font = ImageFont.load_default(size=rng.randint(20, 26))
    draw.text((CANVAS // 2 + rng.randint(-2, 2), CANVAS // 2 + rng.randint(-2, 2)), str(digit), fill=(0, 0, 0),
              font=font, anchor="mm")
    return ImageTask(image, rng.choice(PROMPTS["digit"]), str(digit), f"the digit {digit}")


_DIGITS_CACHE: list = []


def real_digit_task(rng: random.Random) -> ImageTask:
    """One of scikit-learn's 1,797 bundled 8x8 handwritten digits (16 grey levels), scaled to the canvas."""
    if not _DIGITS_CACHE:
        from sklearn.datasets import load_digits

        digits = load_digits()
        _DIGITS_CACHE.extend(zip(digits.images, digits.target))
    pixels, digit = _DIGITS_CACHE[rng.randrange(len(_DIGITS_CACHE))]
    grey = Image.fromarray((255 - pixels * 16).clip(0, 255).astype("uint8"), mode="L")
    image = grey.resize((CANVAS, CANVAS), Image.Resampling.NEAREST).convert("RGB")
    return ImageTask(image, rng.choice(PROMPTS["digit"]), str(int(digit)), f"the digit {int(digit)}")


DOMAINS = {
    "count": count_task,
    "colour": colour_task,
    "position": position_task,
    "digit": digit_task,
    "colour_heldout": lambda rng: colour_task(rng, held_out=True),
    "digits_real": real_digit_task,
}
IN_DOMAIN = ("count", "colour", "position")
OUT_OF_DOMAIN = ("digit", "colour_heldout")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def llava_record(record_id: str, image_path: str, task: ImageTask, domain: str) -> dict:
    """One LLaVA JSON record: the image path, the `<image>` placeholder before the question, and the answer."""
    return {"id": record_id, "image": image_path, "domain": domain, "caption": task.caption,
            "conversations": [{"from": "human", "value": f"<image>\n{task.prompt}"},
                              {"from": "gpt", "value": task.answer}]}


@dataclass
class ImageCorpusFiles:
    train: Path  # LLaVA JSON of every in-domain training record
    eval: dict[str, Path]  # domain -> LLaVA JSON of its eval records (prompts and images never trained on)


def generate_image_corpus(out_dir: str | Path, in_domain=IN_DOMAIN, out_of_domain=OUT_OF_DOMAIN,
                          train_per_domain: int = 200, eval_per_domain: int = 40, seed: int = 0
                          ) -> ImageCorpusFiles:
    """Write the corpus (train.json, eval_<domain>.json, images/*.png) under `out_dir`, whole or not at all."""
    out_dir = Path(out_dir)
    unknown = sorted((set(in_domain) | set(out_of_domain)) - set(DOMAINS))
    assert not unknown, f"unknown image task domains {unknown}; known: {sorted(DOMAINS)}"
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        train = []
        for domain in in_domain:
            rng = random.Random(f"{seed}:{domain}:train")
            for i in range(train_per_domain):
                train.append(_write(tmp, f"{domain}-train-{i}", DOMAINS[domain](rng), domain))
        (tmp / "train.json").write_text(json.dumps(train))
        for domain in (*in_domain, *out_of_domain):
            rng = random.Random(f"{seed}:{domain}:eval")
            records = [_write(tmp, f"{domain}-eval-{i}", DOMAINS[domain](rng), domain)
                       for i in range(eval_per_domain)]
            (tmp / f"eval_{domain}.json").write_text(json.dumps(records))
    return ImageCorpusFiles(out_dir / "train.json",
                            {d: out_dir / f"eval_{d}.json" for d in (*in_domain, *out_of_domain)})


def _write(directory: Path, record_id: str, task: ImageTask, domain: str) -> dict:
    # Paths are relative to the JSON file that names them (all JSON files sit beside images/).
    (directory / "images" / f"{record_id}.png").write_bytes(png_bytes(task.image))
    return llava_record(record_id, f"images/{record_id}.png", task, domain)


# The text-only instruction tasks mixed in by data.multimodal_share: the embedded text corpus's in-domain kinds.
TEXT_TASKS_FILE = "text_tasks.json"


def write_text_tasks(out_dir: str | Path, count: int, seed: int = 0) -> Path:
    """Write `count` text-only LLaVA records (no image, no placeholder) of the embedded text corpus's arithmetic,
    list and string tasks to out_dir/text_tasks.json, domain "text"; returns the file."""
    from instune.atomic import write_text
    from instune.default.corpus import make_arithmetic, make_list_ops, make_string_edit

    rng = random.Random(f"{seed}:text")
    records = []
    for i in range(count):
        instruction, input_, answer = rng.choice((make_arithmetic, make_list_ops, make_string_edit))(rng)
        prompt = f"{instruction}\n{input_}" if input_ else instruction
        records.append({"id": f"text-train-{i}", "domain": "text",
                        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]})
    path = Path(out_dir) / TEXT_TASKS_FILE
    write_text(path, json.dumps(records))
    return path
