"""Where outputs live: a local directory or a cloud URI (s3://, gs://, ...), through pyarrow's filesystems.

Object stores have no rename, so instune.atomic's write-then-rename becomes: take the old completion marker
away, replace every file, and write the marker last. A reader trusts a prefix only when its marker is there.
A prepared dataset's marker is its manifest.json, which readers already require; every other published
directory gets `_SUCCESS` (the convention of Hadoop and Spark) holding a fresh id, so a local copy can tell
whether it is the published version. One object appears whole or not at all, so single files are plain uploads.

Credentials come from the environment, as each cloud's SDK reads them (AWS_* variables, ~/.aws, instance or
pod roles; GOOGLE_APPLICATION_CREDENTIALS, workload identity), never from configs. Options pyarrow reads from
URI query parameters (`?region=...`, `?endpoint_override=host:port&scheme=http` for MinIO or a test server)
stay with the URI: `join` keeps them after the path, so every derived location carries them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs

from instune.errors import UserError

SUCCESS = "_SUCCESS"
# Files at once when uploading a directory: object stores are slow per request, not per byte.
UPLOAD_THREADS = 8


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location`/`parts`: a path for a local location; for a URI, its query string (options) stays last."""
    if not is_uri(location):
        return str(Path(location, *parts))
    base, sep, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a URI or a local path."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(str(location)))


def check_output_location(location: str, field: str) -> None:
    """Raise UserError naming `field` when `location` is a URI that cannot be written: an unknown scheme, a
    missing bucket, no credentials. Checked by writing and deleting one small object, before any stage runs
    for minutes only to fail at its upload."""
    if not is_uri(location):
        return
    try:
        fs, path = resolve(location)
        probe = f"{path.rstrip('/')}/.instune-write-check"
        with fs.open_output_stream(probe) as f:
            f.write(b"")
        fs.delete_file(probe)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{field}: cannot write to {location} ({first_line}); give s3://BUCKET/PATH or "
                        f"gs://BUCKET/PATH of an existing bucket, with credentials in the environment") from None


def default_scratch_dir(output_dir: str, name: str) -> Path:
    """The local working directory for a URI output_dir: the same for every run of the same experiment, so a
    rerun on this machine finds its base model and logs again."""
    digest = hashlib.sha256(output_dir.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "instune-scratch" / f"{name}-{digest}"


def exists(location: str | os.PathLike) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def write_text(location: str | os.PathLike, text: str) -> None:
    """Write one whole file (one object on a store: it appears complete or not at all)."""
    fs, path = resolve(location)
    _make_parent(fs, path)
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def list_dirs(location: str | os.PathLike, prefix: str = "") -> list[str]:
    """Names of the subdirectories of `location` starting with `prefix`, sorted; [] when it does not exist."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix))


def total_size(location: str | os.PathLike, suffix: str = "") -> int:
    """Bytes in the files under `location` whose names end with `suffix`."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sum(i.size for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))


def _make_parent(fs: pafs.FileSystem, path: str) -> None:
    # Object stores need no directories (creating one writes an empty marker object), local disks do.
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(os.path.dirname(path), recursive=True)


def _upload(local_file: Path, fs: pafs.FileSystem, path: str) -> None:
    _make_parent(fs, path)
    pafs.copy_files(str(local_file), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def upload_file(local_file: str | os.PathLike, location: str | os.PathLike) -> None:
    fs, path = resolve(location)
    _upload(Path(local_file), fs, path)


def upload_files(local_dir: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copy every file under `local_dir` to `location`, over what is there; nothing is deleted. For logs that
    grow (metrics, TensorBoard events), which readers take as they are."""
    fs, root = resolve(location)
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(lambda p: _upload(p, fs, f"{root}/{p.relative_to(local_dir).as_posix()}"), files))


def delete_dir(location: str | os.PathLike) -> None:
    """Remove `location` and everything under it; nothing to do when it does not exist."""
    fs, path = resolve(location)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def download_files(location: str | os.PathLike, local_dir: str | os.PathLike, skip=lambda relative: False) -> None:
    """Copy every file under `location` into `local_dir`, over what is there, except those whose path
    relative to `location` `skip` names."""
    fs, root = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    for info in infos:
        relative = info.path[len(root.rstrip("/")) + 1:]
        if info.type == pafs.FileType.File and not skip(relative):
            target = Path(local_dir, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(target), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())


def publish_dir(local_dir: str | os.PathLike, location: str | os.PathLike, marker: str = SUCCESS) -> None:
    """Replace `location` with a copy of the finished `local_dir`, its `marker` file uploaded last.

    The old marker goes first and the old files next, so at no moment does a marker stand beside a mix of old
    and new files. With the default marker, `_SUCCESS` is written into `local_dir` too, with a fresh id: the
    local directory then is a current copy of the published one (`is_current_copy`).
    """
    local_dir = Path(local_dir)
    if marker == SUCCESS:
        (local_dir / SUCCESS).write_text(uuid.uuid4().hex + "\n")
    assert (local_dir / marker).is_file(), f"{local_dir}: no {marker} to publish last"
    fs, root = resolve(location)
    if fs.get_file_info(f"{root}/{marker}").type == pafs.FileType.File:
        fs.delete_file(f"{root}/{marker}")
    fs.delete_dir_contents(root, missing_dir_ok=True)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.relative_to(local_dir).as_posix() != marker)
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        # list() re-raises the first failed upload, before the marker is written.
        list(pool.map(lambda p: _upload(p, fs, f"{root}/{p.relative_to(local_dir).as_posix()}"), files))
    _upload(local_dir / marker, fs, f"{root}/{marker}")


def is_complete(location: str | os.PathLike, marker: str = SUCCESS) -> bool:
    return is_file(join(location, marker))


def is_current_copy(local_dir: str | os.PathLike, location: str | os.PathLike, marker: str = SUCCESS) -> bool:
    """True when `local_dir` holds the version now published at `location` (the same marker bytes)."""
    local_marker = Path(local_dir) / marker
    return local_marker.is_file() and is_complete(location, marker) and \
        local_marker.read_bytes() == read_bytes(join(location, marker))


def fetch_dir(location: str | os.PathLike, local_dir: str | os.PathLike, marker: str = SUCCESS) -> Path:
    """`local_dir` as a copy of the complete directory at `location`, downloaded unless already current.

    Raises UserError when `location` has no marker: it was never published whole, or is being replaced.
    """
    from instune.atomic import atomic_dir

    if not is_complete(location, marker):
        raise UserError(f"{location}: no {marker}, so it is not a complete output (never finished, or being "
                        "replaced); run the stage that writes it again")
    if is_current_copy(local_dir, location, marker):
        return Path(local_dir)
    fs, root = resolve(location)
    published = read_bytes(join(location, marker))
    with atomic_dir(local_dir) as tmp:
        pafs.copy_files(root, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                        use_threads=True)
        # Republished while we copied: the files may be a mix of two versions.
        if not is_complete(location, marker) or read_bytes(join(location, marker)) != published or \
                (tmp / marker).read_bytes() != published:
            raise UserError(f"{location}: was replaced while being downloaded; run again")
    return Path(local_dir)
