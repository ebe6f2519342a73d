"""Where a model comes from: a local directory, a Hugging Face Hub id, or an s3:// / gs:// directory.

`local_model_dir(source)` returns a local directory holding the model named by `source`, fetching it first:
- a path that exists here is used as it is;
- a URI (`s3://BUCKET/PATH`, `gs://...`, with pyarrow's options in its query, as for `output_dir`) is copied
  into this node's model cache, `$INSTUNE_MODEL_CACHE` (default `~/.cache/instune/models`), once: a later
  call finds the copy current by comparing the bucket's listing (names and sizes) with the one it was made from;
- anything else (`org/name`, `name`, optionally `@revision`) is a Hub repo id, resolved by huggingface_hub into
  its own cache (HF_HOME, HF_HUB_CACHE), offline when HF_HUB_OFFLINE is set.

The source string, not a local path, is what travels to Ray workers: every load site calls `local_model_dir`,
so each node fetches the model once into its own cache (a file lock keeps the workers of one node from
copying it twice) and no node needs a filesystem shared with the driver. Before Ray starts the driver checks
the model with `model_files(source)`: its config and tokenizer files and the names of its files (the Hub's or
the bucket's listing), not its weights, so a missing model, an unreachable Hub or a missing bucket is one line
naming the config field, and a driver that trains nothing itself downloads no weights.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from instune.errors import UserError

MODEL_CACHE_ENV = "INSTUNE_MODEL_CACHE"
# Written last into a bucket model's local copy: the listing it was copied from.
LISTING_FILE = ".instune_source.json"
# What a Hub snapshot or a bucket copy leaves out: the original checkpoints some repos ship beside the HF
# weights (Llama's original/ at 16 GB, Mistral's consolidated.safetensors) and other frameworks' formats.
IGNORED_FILES = ["original/*", "consolidated*", "*.pth", "*.pt", "*.gguf", "*.msgpack", "*.h5", "*.ot",
                 "*.onnx", "onnx/*", "*.tflite"]
# PyTorch pickles are fetched only when a repo has no safetensors weights (many have both).
PICKLED_WEIGHTS = "*.bin"
# The weights: a check on the driver lists them (model_files) and leaves fetching them to the workers' nodes.
WEIGHT_FILES = ["*.safetensors", PICKLED_WEIGHTS]
# Hub repo ids: a name, or an owner and a name, of letters, digits, '-', '_' and '.'; an optional @revision.
HUB_ID = re.compile(r"^(?!\.)[\w.-]+(/(?!\.)[\w.-]+)?(@[\w./-]+)?$")


def is_uri(source: str) -> bool:
    return "://" in source


def is_hub_id(source: str) -> bool:
    """True when `source` is no local path and reads as a Hub repo id."""
    return not is_uri(source) and not Path(source).expanduser().exists() and bool(HUB_ID.match(source))


def is_remote(source: str | os.PathLike) -> bool:
    """True when `local_model_dir` has to fetch `source` (a URI or a Hub id) rather than use it in place."""
    return is_uri(str(source)) or is_hub_id(str(source))


@dataclass(frozen=True)
class ModelFiles:
    """What the driver checks a model by: a local directory holding its files but the weights (config, tokenizer,
    chat template, adapter config), and the relative names of all its files, weights included."""

    directory: Path
    names: tuple[str, ...]


def model_cache_dir() -> Path:
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "instune" / "models").expanduser()


def local_model_dir(source: str | os.PathLike, field: str = "model.path") -> str:
    """A local directory holding the model (or adapter, or tokenizer) named by `source`; see the module
    docstring. An existing local path comes back unchanged (its contents checked by the caller); a missing one
    and fetch errors are one-line UserErrors naming `field`."""
    source = str(source)
    if is_uri(source):
        return str(_fetched(source, field, _copy_from_bucket))
    if is_hub_id(source):
        return str(_fetched(source, field, _download_from_hub))
    if not Path(source).expanduser().exists():
        # Written as a path (./, /, ~, or more than org/name), so never sent to the Hub: say it is missing here
        # rather than let transformers try it as a repo id and fail in a worker with a long message.
        raise UserError(f"{field}: {source} does not exist (a local path; a Hub id is org/name, a bucket "
                        "s3://... or gs://...)")
    return source


def model_files(source: str | os.PathLike, field: str = "model.path") -> ModelFiles:
    """The files of the model `source` names, without fetching its weights: a Hub id or a bucket is checked on
    the driver by its config, tokenizer and file names, and each worker's node downloads the weights itself
    (local_model_dir). A local directory is used in place (its top-level names). Errors as local_model_dir's."""
    source = str(source)
    if is_uri(source):
        return _fetched(source, field, _bucket_files)
    if is_hub_id(source):
        return _fetched(source, field, _hub_files)
    directory = Path(local_model_dir(source, field)).expanduser()
    names = tuple(sorted(p.name for p in directory.iterdir())) if directory.is_dir() else ()
    return ModelFiles(directory, names)


@functools.lru_cache(maxsize=None)
def _fetched_once(source: str, fetch):
    return fetch(source)


def _fetched(source: str, field: str, fetch):
    # Once per process: a Hub lookup costs a request even when the snapshot is cached.
    try:
        return _fetched_once(source, fetch)
    except UserError as e:
        raise UserError(f"{field}: {e}") from None


# ---------------------------------------------------------------- Hugging Face Hub


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """huggingface_hub's cache directory, from the variables it honours, read now: it reads them once, when
    imported, and a long-lived process (a notebook, a test session) may set them later."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def _snapshot(source: str, ignore: list[str]) -> Path:
    """huggingface_hub's snapshot of the repo `source` names, without the files `ignore` matches."""
    from huggingface_hub import snapshot_download

    repo_id, _, revision = source.partition("@")
    return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=hub_cache_dir(),
                                  local_files_only=_env_flag("HF_HUB_OFFLINE"), ignore_patterns=ignore))


def _download_from_hub(source: str) -> Path:
    with _hub_errors(source):
        path = _snapshot(source, IGNORED_FILES + [PICKLED_WEIGHTS])
        if not any(path.glob("*.safetensors")):
            path = _snapshot(source, IGNORED_FILES)
    return path


def _hub_files(source: str) -> ModelFiles:
    """The repo's files but its weights, fetched into the Hub cache, and the names of all its files: the Hub's
    listing, or offline the cache's (workers on this node will find only what it holds)."""
    with _hub_errors(source):
        path = _snapshot(source, IGNORED_FILES + WEIGHT_FILES)
        if _env_flag("HF_HUB_OFFLINE"):
            names = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
        else:
            from huggingface_hub import HfApi

            repo_id, _, revision = source.partition("@")
            names = HfApi().list_repo_files(repo_id, revision=revision or None)
    return ModelFiles(path, tuple(sorted(n for n in names if not _matches(n, IGNORED_FILES))))


@contextlib.contextmanager
def _hub_errors(source: str):
    """huggingface_hub's errors for the repo `source` names as one-line UserErrors saying what to do."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo_id, _, revision = source.partition("@")
    try:
        yield
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if _env_flag("HF_HUB_OFFLINE") else "the Hub cannot be reached"
        raise UserError(f"{source} is not a local directory, and it is not in the Hugging Face cache "
                        f"{hub_cache_dir()} while {why}; download it once with network access (or set HF_HUB_CACHE "
                        "to a cache that holds it), or give a local model directory") from None
    except GatedRepoError:
        raise UserError(f"{source} is a gated model: accept its license on huggingface.co and set HF_TOKEN") \
            from None
    except RepositoryNotFoundError:
        raise UserError(f"{source} is not a local directory, and the Hugging Face Hub has no model {repo_id} "
                        "that these credentials can see") from None
    except RevisionNotFoundError:
        raise UserError(f"{source}: the Hub model {repo_id} has no revision {revision!r}") from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"{source}: fetching it from the Hugging Face Hub failed ({_first_line(e)})") from None


# ---------------------------------------------------------------- buckets


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _matches(relative: str, patterns: list[str]) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(relative, pattern) for pattern in patterns)


def bucket_listing(source: str) -> dict[str, int]:
    """Relative path -> size of every model file under the URI `source`; UserError when there are none."""
    import pyarrow.fs as pafs

    from instune import storage

    try:
        fs, root = storage.resolve(source)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"cannot read {source} ({_first_line(e)}); give s3://BUCKET/PATH or gs://BUCKET/PATH "
                        "of a model directory, with credentials in the environment") from None
    prefix = root.rstrip("/") + "/"
    listing = {i.path[len(prefix):]: i.size for i in infos if i.type == pafs.FileType.File}
    listing = {name: size for name, size in listing.items() if not _matches(name, IGNORED_FILES)}
    if not listing:
        raise UserError(f"{source} holds no files (expected a Hugging Face model directory)")
    return dict(sorted(listing.items()))


def _copy_from_bucket(source: str) -> Path:
    """This node's copy of the model directory at the URI `source`, made unless a current one is there."""
    return _bucket_copy(source, bucket_listing(source))


def _bucket_files(source: str) -> ModelFiles:
    """A copy of the bucket model's files but its weights (beside the whole copy, not in it), and all names."""
    listing = bucket_listing(source)
    small = {name: size for name, size in listing.items() if not _matches(name, WEIGHT_FILES)}
    return ModelFiles(_bucket_copy(source, small, suffix="-noweights"), tuple(listing))


def _bucket_copy(source: str, listing: dict[str, int], suffix: str = "") -> Path:
    """This node's copy of the files in `listing` under the URI `source`, made unless a current one is there."""
    import pyarrow.fs as pafs
    from filelock import FileLock

    from instune import storage
    from instune.atomic import atomic_dir

    # The query holds options (endpoint, region), not identity; the copy is named by bucket and path.
    location = source.partition("?")[0]
    target = model_cache_dir() / (hashlib.sha256(location.encode()).hexdigest()[:16] + suffix)
    recorded = {"source": location, "files": listing}
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        marker = target / LISTING_FILE
        if marker.is_file() and json.loads(marker.read_text()) == recorded:
            return target
        fs, root = storage.resolve(source)
        print(f"[model] copying {location} to {target}", flush=True)
        with atomic_dir(target) as tmp:
            for name in listing:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(f"{root.rstrip('/')}/{name}", str(tmp / name), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
            (tmp / LISTING_FILE).write_text(json.dumps(recorded))
    return target
