import base64
import io

import pytest
from PIL import Image

from instune.data.images import ImageError, ImageLimits, decode_image, images_digest, read_image_bytes, resized_png

LIMITS = ImageLimits(size=32, min_side=8, max_side=256)


def png(width=20, height=20, colour=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_references_from_paths_uris_base64_and_bytes(tmp_path):
    data = png()
    (tmp_path / "a.png").write_bytes(data)
    assert read_image_bytes("a.png", str(tmp_path)) == data
    assert read_image_bytes(f"file://{tmp_path}/a.png", "/elsewhere") == data
    assert read_image_bytes(str(tmp_path / "a.png"), "/elsewhere") == data
    assert read_image_bytes("data:image/png;base64," + base64.b64encode(data).decode(), "") == data
    assert read_image_bytes({"bytes": data, "path": None}, "") == data
    assert read_image_bytes(data, "") == data


@pytest.mark.parametrize("reference, reason", [
    ("nope.png", "image nope.png is missing"),
    ("data:image/png;base64,@@@", "invalid base64"),
    ("data:image/png,rawtext", "is not base64"),
    (7, "image reference is int"),
])
def test_bad_references_say_what_is_wrong(tmp_path, reference, reason):
    with pytest.raises(ImageError, match=reason):
        read_image_bytes(reference, str(tmp_path))


def test_decode_checks_format_truncation_and_size():
    image = decode_image(png(40, 30), LIMITS)
    assert image.size == (40, 30) and image.mode == "RGB"
    with pytest.raises(ImageError, match="cannot be decoded"):
        decode_image(b"not an image at all", LIMITS)
    noisy = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(noisy, format="PNG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(noisy.getvalue()[: len(noisy.getvalue()) // 2], LIMITS)
    with pytest.raises(ImageError, match="4x30, smaller than min_side 8"):
        decode_image(png(4, 30), LIMITS)
    with pytest.raises(ImageError, match="300x20, larger than max_side 256"):
        decode_image(png(300, 20), LIMITS)
    with pytest.raises(ImageError, match="over the limit of 10"):
        decode_image(png(), ImageLimits(max_bytes=10))


def test_resize_and_digest():
    small = Image.open(io.BytesIO(resized_png(decode_image(png(40, 30), LIMITS), 32)))
    assert small.size == (32, 32)
    assert images_digest([png()]) == images_digest([png()])
    assert images_digest([png()]) != images_digest([png(colour=(0, 0, 255))])
    assert images_digest([b"ab", b"c"]) != images_digest([b"a", b"bc"])  # lengths are part of the digest
