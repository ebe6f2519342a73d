"""instune.storage against a real S3 endpoint (moto on 127.0.0.1) and the local disk: publish with the marker
last, incomplete prefixes refused, reading back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instune import storage
from instune.errors import UserError


def finished_output(directory: Path, marker: str | None = None) -> Path:
    """A small finished output: two Parquet-like files in a subfolder, a text file, and the marker if named."""
    (directory / "train").mkdir(parents=True)
    (directory / "train" / "part-0.parquet").write_bytes(b"a" * 100)
    (directory / "train" / "part-1.parquet").write_bytes(b"b" * 50)
    (directory / "notes.txt").write_text("hello\n")
    if marker:
        (directory / marker).write_text(json.dumps({"rows": 3}))
    return directory


def test_join_keeps_uri_options_last_and_local_paths_plain():
    assert storage.join("s3://b/exp?endpoint_override=h:1&scheme=http", "data", "train") == \
        "s3://b/exp/data/train?endpoint_override=h:1&scheme=http"
    assert storage.join("gs://b/exp/", "eval") == "gs://b/exp/eval"
    assert storage.join("/mnt/x", "data", "manifest.json") == "/mnt/x/data/manifest.json"
    assert storage.is_uri("s3://b") and not storage.is_uri("/mnt/x")


def test_publish_uploads_every_file_and_reads_back(s3_uri, tmp_path):
    local = finished_output(tmp_path / "data", marker="manifest.json")
    target = s3_uri("exp/data")
    storage.publish_dir(local, target, marker="manifest.json")

    assert storage.is_complete(target, "manifest.json")
    assert json.loads(storage.read_text(storage.join(target, "manifest.json"))) == {"rows": 3}
    assert storage.read_text(storage.join(target, "notes.txt")) == "hello\n"
    assert storage.list_dirs(target) == ["train"]
    assert storage.total_size(target, ".parquet") == 150
    copy = storage.fetch_dir(target, tmp_path / "copy", marker="manifest.json")
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()) == \
        ["manifest.json", "notes.txt", "train/part-0.parquet", "train/part-1.parquet"]
    assert (copy / "train" / "part-1.parquet").read_bytes() == b"b" * 50


def test_the_marker_is_uploaded_last(s3_uri, tmp_path, monkeypatch):
    uploaded = []
    upload = storage._upload
    monkeypatch.setattr(storage, "_upload", lambda local, fs, path: (uploaded.append(path.rsplit("/", 1)[1]),
                                                                      upload(local, fs, path)))
    storage.publish_dir(finished_output(tmp_path / "out"), s3_uri("exp/adapter"))
    assert sorted(uploaded[:-1]) == ["notes.txt", "part-0.parquet", "part-1.parquet"]
    assert uploaded[-1] == storage.SUCCESS


def test_a_failed_upload_leaves_no_marker_and_readers_refuse_the_prefix(s3_uri, tmp_path, monkeypatch):
    target = s3_uri("exp/data")
    storage.publish_dir(finished_output(tmp_path / "v1", marker="manifest.json"), target, marker="manifest.json")
    assert storage.is_complete(target, "manifest.json")

    # Replacing it fails half way: the old marker is already gone, so nobody reads a mix of versions.
    upload = storage._upload

    def failing(local, fs, path):
        if path.endswith("part-1.parquet"):
            raise OSError("connection reset")
        upload(local, fs, path)

    monkeypatch.setattr(storage, "_upload", failing)
    with pytest.raises(OSError, match="connection reset"):
        storage.publish_dir(finished_output(tmp_path / "v2", marker="manifest.json"), target, marker="manifest.json")
    assert not storage.is_complete(target, "manifest.json")
    assert storage.exists(storage.join(target, "notes.txt"))  # files are there, but no marker
    with pytest.raises(UserError, match=r"no manifest\.json, so it is not a complete output"):
        storage.fetch_dir(target, tmp_path / "copy", marker="manifest.json")
    assert not (tmp_path / "copy").exists()


def test_republishing_replaces_old_files(s3_uri, tmp_path):
    target = s3_uri("exp/merged")
    storage.publish_dir(finished_output(tmp_path / "v1"), target)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "model.safetensors").write_bytes(b"w")
    storage.publish_dir(v2, target)
    assert storage.list_dirs(target) == []  # v1's train/ is gone
    assert not storage.exists(storage.join(target, "notes.txt"))
    assert storage.read_bytes(storage.join(target, "model.safetensors")) == b"w"


def test_a_local_copy_is_downloaded_only_when_it_is_not_the_published_version(s3_uri, tmp_path):
    target = s3_uri("exp/merged")
    local = finished_output(tmp_path / "scratch" / "merged")
    storage.publish_dir(local, target)
    assert storage.is_current_copy(local, target)  # published from here: nothing to download
    (local / "notes.txt").write_text("local edit\n")
    assert storage.fetch_dir(target, local).joinpath("notes.txt").read_text() == "local edit\n"

    elsewhere = finished_output(tmp_path / "elsewhere")
    (elsewhere / "notes.txt").write_text("newer\n")
    storage.publish_dir(elsewhere, target)  # another machine publishes a new version
    assert not storage.is_current_copy(local, target)
    assert storage.fetch_dir(target, local).joinpath("notes.txt").read_text() == "newer\n"


def test_missing_locations_read_as_empty_and_unwritable_uris_are_user_errors(s3_uri, s3_endpoint, tmp_path):
    assert storage.list_dirs(s3_uri("nothing/here")) == [] and storage.total_size(s3_uri("nothing")) == 0
    assert not storage.exists(s3_uri("nothing")) and not storage.is_complete(s3_uri("nothing"))
    storage.write_text(storage.join(str(tmp_path), "a", "b.txt"), "x")
    assert storage.read_text(tmp_path / "a" / "b.txt") == "x"
    with pytest.raises(UserError, match=r"^output_dir: cannot write to nosuch://b/x \("):
        storage.check_output_location("nosuch://b/x", "output_dir")
    missing_bucket = f"s3://no-such-bucket/x?endpoint_override={s3_endpoint}&scheme=http"
    with pytest.raises(UserError, match=r"^output_dir: cannot write to s3://no-such-bucket/x.*existing bucket"):
        storage.check_output_location(missing_bucket, "output_dir")
    storage.check_output_location(s3_uri("exp"), "output_dir")
    assert storage.total_size(s3_uri()) == 0  # the probe is gone
