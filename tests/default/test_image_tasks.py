import json
import random

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from instune.default.image_tasks import (CANVAS, COLOURS, HELD_OUT, SHAPES, count_task, digit_task,
                                         generate_image_corpus, position_task, real_digit_task)


def _ink(image: Image.Image) -> np.ndarray:
    return (np.asarray(image).astype(int).sum(axis=2) < 3 * 250)


def test_count_answers_match_the_shapes_drawn():
    rng = random.Random(0)
    for _ in range(40):
        task = count_task(rng)
        _, components = ndimage.label(_ink(task.image))
        assert components == int(task.answer)


def test_position_answers_match_where_the_ink_is():
    rng = random.Random(1)
    seen = set()
    for _ in range(40):
        task = position_task(rng)
        ys, xs = np.nonzero(_ink(task.image))
        x, y = xs.mean() - CANVAS / 2, ys.mean() - CANVAS / 2
        where = ("right" if x > 0 else "left") if abs(x) > abs(y) else ("bottom" if y > 0 else "top")
        assert where == task.answer
        seen.add(where)
    assert len(seen) == 4


def test_digit_tasks_draw_ink_and_read_the_real_digits():
    rng = random.Random(2)
    drawn = digit_task(rng)
    assert _ink(drawn.image).sum() > 20 and drawn.answer in "0123456789"
    real = [real_digit_task(rng) for _ in range(30)]
    assert all(t.image.size == (CANVAS, CANVAS) and t.answer in "0123456789" for t in real)
    assert len({t.answer for t in real}) >= 5


def test_corpus_holds_out_attribute_pairs_and_task_types(tmp_path):
    files = generate_image_corpus(tmp_path / "mm", train_per_domain=30, eval_per_domain=10, seed=3)
    train = json.loads(files.train.read_text())
    assert len(train) == 90 and {r["domain"] for r in train} == {"count", "colour", "position"}
    held_out_captions = {f"{colour} {shape}" for shape, colour in HELD_OUT}
    assert not any(c in r["caption"] for r in train for c in held_out_captions)
    heldout = json.loads(files.eval["colour_heldout"].read_text())
    assert len(heldout) == 10 and all(any(c in r["caption"] for c in held_out_captions) for r in heldout)
    for record in train[:5] + heldout[:5]:
        image = Image.open(files.train.parent / record["image"])
        assert image.size == (CANVAS, CANVAS)
        assert record["conversations"][0]["value"].count("<image>") == 1
    # The colour answers are the colour of the ink.
    for record in heldout:
        pixels = np.asarray(Image.open(files.train.parent / record["image"]).convert("RGB")).reshape(-1, 3)
        ink = pixels[pixels.sum(axis=1) < 3 * 250]
        nearest = min(COLOURS, key=lambda c: np.abs(ink.mean(axis=0) - COLOURS[c]).sum())
        assert nearest == record["conversations"][1]["value"]
    assert set(files.eval) == {"count", "colour", "position", "digit", "colour_heldout"}
    assert {s for r in train for s in SHAPES if s in r["caption"]} == set(SHAPES)


def test_unknown_domain_is_refused(tmp_path):
    with pytest.raises(AssertionError, match="unknown image task domains"):
        generate_image_corpus(tmp_path / "x", in_domain=("count", "nope"))
