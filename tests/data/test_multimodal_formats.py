import base64
import io
import json

from PIL import Image

from instune.data.images import ImageLimits
from instune.data.multimodal_formats import to_multimodal
from instune.data.read import iter_raw_records

LIMITS = ImageLimits(size=16, min_side=8, max_side=256)


def png(colour=(255, 0, 0), side=20) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _run(path, fmt="auto"):
    return list(to_multimodal(iter_raw_records(str(path), 1 << 20), "src", "dom", fmt, str(path), LIMITS))


def test_llava_records_with_several_images_and_rejects_per_record(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    (tmp_path / "img" / "b.png").write_bytes(png((0, 0, 255)))
    (tmp_path / "img" / "tiny.png").write_bytes(png(side=4))
    noisy = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(noisy, format="PNG")
    (tmp_path / "img" / "cut.png").write_bytes(noisy.getvalue()[:2000])  # a file cut short
    turns = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": "yes"}]  # noqa: E731
    records = [
        {"id": "r0", "image": "img/a.png", "conversations": turns("<image>\nIs it red?"), "caption": "red"},
        {"images": ["img/a.png", "img/b.png"], "conversations": turns("<image> or <image>?"), "domain": "pairs"},
        {"image": "img/missing.png", "conversations": turns("<image>\nWhat?")},
        {"image": "img/cut.png", "conversations": turns("<image>\nWhat?")},
        {"image": "img/tiny.png", "conversations": turns("<image>\nWhat?")},
        {"image": "img/a.png", "conversations": turns("No placeholder here")},
        {"conversations": turns("Text only")},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    results = _run(tmp_path / "data.json", "llava")
    assert [kind for kind, _ in results] == ["kept", "kept", "rejected", "rejected", "rejected", "rejected", "kept"]
    first, pair = results[0][1], results[1][1]
    assert first["messages"][0] == {"role": "user", "content": "<image>\nIs it red?"}
    assert len(first["images"]) == 1 and Image.open(io.BytesIO(first["images"][0])).size == (16, 16)
    assert json.loads(first["metadata"]) == {"caption": "red", "original_id": "r0"}
    assert len(pair["images"]) == 2 and pair["domain"] == "pairs" and pair["images_digest"] != first["images_digest"]
    reasons = [(r["stage"], r["reason"]) for kind, r in results if kind == "rejected"]
    assert reasons[0][0] == "image" and "img/missing.png is missing" in reasons[0][1]
    assert reasons[1][0] == "image" and "truncated or corrupt" in reasons[1][1]
    assert reasons[2] == ("image", "image is 4x4, smaller than min_side 8")
    assert reasons[3] == ("normalise", "0 <image> placeholder(s) but 1 image(s)")
    assert results[6][1]["images"] == []


def test_openai_content_parts_and_parquet_image_bytes(tmp_path):
    data_uri = "data:image/png;base64," + base64.b64encode(png()).decode()
    (tmp_path / "b.png").write_bytes(png((0, 255, 0)))
    lines = [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Compare"},
                                                   {"type": "image_url", "image_url": {"url": data_uri}},
                                                   {"type": "image", "image": "b.png"}]},
                      {"role": "assistant", "content": "red, green"}]},
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]},
                      {"role": "assistant", "content": "?"}]},
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    results = _run(tmp_path / "chat.jsonl")
    assert results[0][0] == "kept"
    assert results[0][1]["messages"][0]["content"] == "Compare\n<image>\n<image>"
    assert len(results[0][1]["images"]) == 2
    assert results[1][0] == "rejected"
    assert "neither a text nor an image part; got type 'audio'" in results[1][1]["reason"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"messages": [[{"role": "user", "content": "<image> colour?"},
                                    {"role": "assistant", "content": "red"}]] * 2,
                      "images": [[png()], [b"garbage"]]})
    pq.write_table(table, tmp_path / "rows.parquet")
    results = _run(tmp_path / "rows.parquet")
    assert [k for k, _ in results] == ["kept", "rejected"]
    assert results[1][1]["record"] == "row 1" and "cannot be decoded" in results[1][1]["reason"]
