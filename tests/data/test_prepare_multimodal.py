import io
import json

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from instune.data.images import ImageLimits
from instune.data.prepare_multimodal import MultimodalSource, prepare_multimodal


def png(colour, side=20) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _turns(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# 5-7 s a case on 2 cores, most of it the image tasks importing transformers and loading the processor: the one
# test of the multimodal prepare through Ray Data (read tasks, image tasks writing parts, exact dedup on the parts,
# tokenization, accounting).
@pytest.mark.slow
@pytest.mark.parametrize("block_rows", [128, 3])  # 3: duplicates and their firsts in different parts
def test_prepare_accounts_for_every_record_and_bad_image(local_ray, tiny_vlm, tmp_path, monkeypatch, block_rows):
    monkeypatch.setattr("instune.data.prepare_multimodal.IMAGE_BLOCK_ROWS", block_rows)
    corpus = tmp_path / "corpus"
    (corpus / "img").mkdir(parents=True)
    for name, colour in [("red", (255, 0, 0)), ("red_copy", (255, 0, 0)), ("blue", (0, 0, 255))]:
        (corpus / "img" / f"{name}.png").write_bytes(png(colour))
    (corpus / "img" / "small.png").write_bytes(png((0, 0, 0), side=4))
    (corpus / "img" / "junk.png").write_bytes(b"not a png")
    llava = [
        {"image": "img/red.png", "conversations": _turns("<image>\nWhat colour?", "red")},
        {"image": "img/red_copy.png", "conversations": _turns("<image>\nWhat  colour?", "red")},  # same bytes+text
        {"image": "img/blue.png", "conversations": _turns("<image>\nWhat colour?", "blue")},
        {"image": "img/blue.png", "conversations": _turns("<image>\nwhat colour?", "BLUE")},  # dup after normalising
        {"image": "img/red.png", "conversations": _turns("<image>\nWhat colour?", "blue")},  # different text: kept
        {"image": "img/gone.png", "conversations": _turns("<image>\nWhat colour?", "red")},
        {"image": "img/small.png", "conversations": _turns("<image>\nWhat colour?", "black")},
        {"image": "img/junk.png", "conversations": _turns("<image>\nWhat colour?", "black")},
        {"images": ["img/red.png", "img/blue.png"], "conversations": _turns("<image><image>\nColours?", "red, blue")},
        {"images": ["img/red.png"] * 12, "conversations": _turns("<image>" * 12, "too long")},
        {"images": ["img/red.png", "img/blue.png"], "conversations": _turns("<image>\nWhat colour?", "red")},
    ]
    (corpus / "llava.json").write_text(json.dumps(llava))
    rows = pa.table({"messages": [[{"role": "user", "content": "<image> colour?"},
                                   {"role": "assistant", "content": c}] for c in ("green", "green", "?")],
                     "images": [[png((0, 255, 0))], [png((0, 250, 0))], [b"\x89PNG\r\n\x1a\ncut"]]})
    pq.write_table(rows, corpus / "rows.parquet")
    sources = [MultimodalSource("shapes", "colour", "llava", [str(corpus / "llava.json")]),
               MultimodalSource("parquet", "colour", "auto", [str(corpus / "rows.parquet")])]

    manifest = prepare_multimodal(sources, str(tiny_vlm), tmp_path / "out", limits=ImageLimits(size=32),
                                  max_length=120)

    shapes, parquet = manifest["sources"]["shapes"], manifest["sources"]["parquet"]
    assert (shapes["read"], shapes["kept"], shapes["rejected"]) == (11, 5, 6)
    stages = {row["stage"]: row["rejected"] for row in shapes["stages"]}
    assert stages == {"read": 0, "normalise": 1, "image": 3, "dedup:exact": 2}
    assert (shapes["tokenized"], shapes["dropped"]) == (4, 1)  # twelve images do not fit in 120 tokens
    drops = [(r["stage"], r["count"]) for r in shapes["rejects"] if r["stage"] == "tokenize"]
    assert drops == [("tokenize", 1)] and "over model.max_length 120" in shapes["rejects"][-1]["example_reason"]
    assert (parquet["read"], parquet["kept"], parquet["rejected"], parquet["tokenized"]) == (3, 2, 1, 2)
    quarantine = pq.read_table(tmp_path / "out" / "quarantine").to_pylist()
    reasons = sorted(r["reason"] for r in quarantine if r["source"] == "shapes")
    assert any("gone.png is missing" in r for r in reasons)
    assert any("smaller than min_side" in r for r in reasons)
    assert any("cannot be decoded" in r for r in reasons)
    assert sum("exact duplicate of shapes:llava.json:index 0" in r for r in reasons) == 1
    assert sum("exact duplicate of shapes:llava.json:index 2" in r for r in reasons) == 1
    tokenized = pq.read_table(tmp_path / "out" / "tokenized").to_pylist()
    assert len(tokenized) == 6
    # filtered/ (written by the tokenizing tasks) holds each kept record once, the tokenized ones among them.
    filtered = pq.read_table(tmp_path / "out" / "filtered", columns=["id"])["id"].to_pylist()
    assert len(filtered) == len(set(filtered)) == 7 and {r["id"] for r in tokenized} < set(filtered)
    for row in tokenized:
        images = row["image_shape"][0]
        assert row["image_shape"][1:] == [3, 32, 32] and len(row["pixels"]) == images * 3 * 32 * 32
        assert len(row["pixel_map"]) == 6 and row["pixel_values"] == []
        assert np.sum(np.asarray(row["labels"]) != -100) >= 2  # the answer and its end-of-turn token
    assert sorted(r["image_shape"][0] for r in tokenized) == [1, 1, 1, 1, 1, 2]
