"""Image-text format adapters: one raw record -> canonical messages with `<image>` placeholders + its images.

Formats (a multimodal source's `format`):
    llava    `image` (one reference) or `images` (a list), and `conversations` [{from, value}] whose values hold
             one `<image>` placeholder per image, in order
    openai   `messages` [{role, content}] whose content is a string or parts: {type: text, text},
             {type: image_url, image_url: {url} | url}, {type: image, image: reference}; each image part
             becomes a placeholder where it stands
    auto     llava for `conversations`, openai for `messages`
Parquet files hold either shape, with the images' bytes in `images` (a list of bytes or {bytes, path}).

`to_multimodal` turns each raw item into a kept record (schema.make_record plus `images`: the resized PNG
bytes, and `images_digest`: the digest of the original bytes, for exact dedup) or a reject with its stage, in
two steps that prepare runs in different Ray tasks: `to_pending` (the record, its images named) and
`with_images` (the images read, decoded, checked and resized). Rejects carry the stage
"read" (the file), "normalise" (the record's shape, or placeholders that do not match the images) or "image"
(a missing, unreadable, undecodable, truncated, too small or too large image). One bad image rejects its
record only.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np

from instune.data.formats import RecordError, _example, normalise, record_metadata
from instune.data.images import (ImageError, ImageLimits, decode_image, image_reference, images_digest,
                                 png_bytes, read_image_bytes, resized_image)
from instune.data.read import RawItem, json_type_name
from instune.data.schema import make_record, make_reject

IMAGE_PLACEHOLDER = "<image>"
MULTIMODAL_FORMATS = ("auto", "llava", "openai")


def split_images(record: dict, fmt: str) -> tuple[dict, list]:
    """(the record as a text format `normalise` reads, its image references in placeholder order)."""
    if fmt == "auto":
        fmt = "openai" if isinstance(record.get("messages"), list) else "llava"
    if fmt == "llava":
        return record, _llava_images(record)
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise RecordError("missing field 'messages'" if "messages" not in record
                          else f"field 'messages' is {json_type_name(messages)}, expected an array")
    references: list = []
    text_messages = []
    for i, message in enumerate(messages):
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            message = {**message, "content": _content_text(message["content"], f"messages[{i}]", references)}
        text_messages.append(message)
    # Images may also be listed beside the messages (Parquet rows), their placeholders in the text.
    extra = record.get("images")
    if extra is not None:
        references += extra if isinstance(extra, list) else [extra]
    return {**record, "messages": text_messages}, references


def _llava_images(record: dict) -> list:
    if "images" in record:
        images = record["images"]
        return images if isinstance(images, list) else [images]
    if "image" in record and record["image"] is not None:
        return [record["image"]]
    return []  # a text-only record in a LLaVA file: no placeholders allowed


def _content_text(parts: list, where: str, references: list) -> str:
    pieces = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in ("image_url", "image"):
            value = part.get(kind)
            references.append(value.get("url") if isinstance(value, dict) and "url" in value else value)
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise RecordError(f"{where}.content[{j}] is neither a text nor an image part; got type {kind!r}")
    return "\n".join(pieces)


def to_pending(raw_items: Iterable[RawItem], source_name: str, domain: str, fmt: str, file: str
               ) -> Iterator[tuple[str, dict]]:
    """("kept", record with its images named but not yet read) or ("rejected", reject) for every record read, in
    file order. A pending record is schema.make_record plus `image_refs` ({bytes, path} each), `base_dir` (what a
    relative path is relative to) and, for an image reject later, the record's `file`, `position` and `example`."""
    basename = os.path.basename(file.rstrip("/"))
    base_dir = os.path.dirname(os.path.abspath(file)) if "://" not in file else file.rsplit("/", 1)[0]
    for item in raw_items:
        if item.error is not None:
            yield "rejected", make_reject(source_name, file, item.position, "read", item.error, item.raw)
            continue
        try:
            text_record, references = split_images(item.value, fmt)
            messages = normalise(text_record, "openai" if "messages" in text_record else "sharegpt")
            placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
            if placeholders != len(references):
                raise RecordError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(references)} "
                                  f"image(s)")
        except RecordError as e:
            yield "rejected", make_reject(source_name, file, item.position, "normalise", str(e), _example(item))
            continue
        try:
            named = [image_reference(r) for r in references]
        except ImageError as e:
            yield "rejected", make_reject(source_name, file, item.position, "image", str(e), _example(item))
            continue
        own_domain = item.value.get("domain")
        record_domain = own_domain if isinstance(own_domain, str) and own_domain.strip() else domain
        metadata = record_metadata(item.value)
        if isinstance(item.value.get("caption"), str):
            metadata["caption"] = item.value["caption"]  # the retrieval target (eval/retrieval.py)
        record = make_record(f"{source_name}:{basename}:{item.position}", source_name, record_domain, messages,
                             metadata)
        refs = [{"bytes": r, "path": None} if isinstance(r, bytes) else {"bytes": None, "path": r} for r in named]
        yield "kept", {**record, "image_refs": refs, "base_dir": base_dir, "file": file, "position": item.position,
                       "example": _example(item)}


RECORD_FIELDS = ("id", "source", "domain", "messages", "metadata")


def with_images(pending: dict, limits: ImageLimits) -> dict:
    """The record with `images` (each read, decoded, checked and resized to PNG) and `images_digest` (of the
    original bytes, for exact dedup); ImageError (the reject reason) for the first image that cannot be used."""
    return with_resized_images(pending, limits)[0]


def with_resized_images(pending: dict, limits: ImageLimits) -> tuple[dict, list[np.ndarray]]:
    """`with_images`' record and its resized images as RGB arrays (height, width, 3): the pixels the PNGs hold,
    for a caller that tokenizes the record at once without decoding its PNGs again."""
    originals = [read_image_bytes(r, pending["base_dir"]) for r in pending["image_refs"]]
    resized = [resized_image(decode_image(data, limits), limits.size) for data in originals]
    record = {**{k: pending[k] for k in RECORD_FIELDS}, "images": [png_bytes(image) for image in resized],
              "images_digest": images_digest(originals)}
    return record, [np.asarray(image) for image in resized]


def image_reject(pending: dict, reason: str) -> dict:
    """The reject row of a pending record whose images could not be used."""
    return make_reject(pending["source"], pending["file"], pending["position"], "image", reason, pending["example"])


def to_multimodal(raw_items: Iterable[RawItem], source_name: str, domain: str, fmt: str, file: str,
                  limits: ImageLimits) -> Iterator[tuple[str, dict]]:
    """("kept", record with images) or ("rejected", reject) for every record read, in file order: to_pending and
    with_images in one pass (prepare runs them in separate Ray tasks, eval reads its small sets with this)."""
    for kind, value in to_pending(raw_items, source_name, domain, fmt, file):
        if kind == "rejected":
            yield kind, value
            continue
        try:
            yield "kept", with_images(value, limits)
        except ImageError as e:
            yield "rejected", image_reject(value, str(e))
