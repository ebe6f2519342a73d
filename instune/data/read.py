"""Raw readers: expand a source's paths into files, and stream one file's records as `RawItem`s.

Everything here is plain Python and pyarrow over ONE file, so the data stage can call it inside a Ray task.
Memory is bounded by the largest record (capped by `max_record_bytes`) plus one read chunk, never by the
file: JSONL is split into lines by hand, a JSON array is parsed element by element over a sliding text
window, and Parquet is streamed batch by batch. A bad record becomes an error item, never an exception;
only a path the user must fix raises `UserError`.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterator

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from instune.data.schema import EXAMPLE_CHARS
from instune.errors import UserError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
CHUNK_BYTES = 1 << 16
PARQUET_BATCH_ROWS = 1024
_GLOB_CHARS = re.compile(r"[*?\[]")
# The options pyarrow reads from a URI's query ("?endpoint_override=host:port&scheme=http", "?region=..."): a
# trailing "?" followed by key=value pairs only, which no glob of a file name looks like.
_URI_OPTIONS = re.compile(r"\?[A-Za-z_]+=[^&?/]*(?:&[A-Za-z_]+=[^&?/]*)*$")


@dataclass(frozen=True, slots=True)
class RawItem:
    """One record as read: a JSON object (`value`) or what went wrong (`error`), never both."""

    position: str  # "line 3" (JSONL, 1-based), "index 5" (JSON array), "row 7" (Parquet), "offset 5120"
    value: dict | None
    error: str | None
    raw: str  # the start of the raw record text (at most EXAMPLE_CHARS), for reject examples


@dataclass
class ReadStats:
    """Filled in while a file is read; `peak_buffer` (bytes or characters held at once) proves the bound."""

    peak_buffer: int = 0

    def saw(self, held: int) -> None:
        self.peak_buffer = max(self.peak_buffer, held)


def json_type_name(value) -> str:
    """The JSON type of a decoded value with its article ("an array", "a string", "null"), for reasons."""
    if isinstance(value, bool):
        return "a boolean"
    for types, name in ((dict, "an object"), (list, "an array"), (str, "a string"), ((int, float), "a number")):
        if isinstance(value, types):
            return name
    return "null" if value is None else f"a {type(value).__name__}"


# ---------------------------------------------------------------- paths


def expand_paths(source_name: str, path: str | list[str]) -> list[str]:
    """Every data file a source names (globs and directories expanded), sorted; raises UserError if none."""
    paths = [path] if isinstance(path, str) else list(path)
    files: set[str] = set()
    for one in paths:
        expand = _expand_uri if "://" in one else _expand_local
        files.update(expand(source_name, one))
    if not files:
        raise UserError(f"source '{source_name}': path {paths} names no data files")
    return sorted(files)


def has_data_suffix(name: str) -> bool:
    return name.lower().endswith(DATA_SUFFIXES)


def _suffix_error(source_name: str, file: str) -> UserError:
    return UserError(
        f"source '{source_name}': {file} has an unsupported extension (expected one of {', '.join(DATA_SUFFIXES)})"
    )


def _expand_local(source_name: str, path: str) -> list[str]:
    path = os.path.expanduser(path)
    if _GLOB_CHARS.search(path):
        matches = sorted(glob.glob(path, recursive=True))
        if not matches:
            raise UserError(f"source '{source_name}': glob {path} matches no files")
    else:
        matches = [path]
    files = []
    for match in matches:
        if os.path.isdir(match):
            files.extend(_walk_local(source_name, match))
        elif os.path.isfile(match):
            if not has_data_suffix(match):
                raise _suffix_error(source_name, match)
            if not os.access(match, os.R_OK):
                raise UserError(f"source '{source_name}': {match} is not readable (permission denied)")
            files.append(match)
        elif os.path.lexists(match):
            raise UserError(f"source '{source_name}': {match} is not a regular file or directory")
        else:
            raise UserError(f"source '{source_name}': path {match} does not exist")
    return files


def _walk_local(source_name: str, directory: str) -> list[str]:
    def fail(error: OSError):
        raise UserError(f"source '{source_name}': cannot read directory {error.filename} ({error.strerror})")

    files = []
    for root, dirs, names in os.walk(directory, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]  # skip .git, _temporary and the like
        files.extend(os.path.join(root, n) for n in names if has_data_suffix(n) and not n.startswith((".", "_")))
    if not files:
        raise UserError(f"source '{source_name}': directory {directory} holds no {', '.join(DATA_SUFFIXES)} files")
    return files


def _expand_uri(source_name: str, uri: str) -> list[str]:
    """The same rules as local paths, through pyarrow's filesystems (s3://, gs://, file://, ...).

    The URI's options, if any, are taken off for globbing and put back on every file found, so each file is
    opened with them (an S3-compatible endpoint, a region).
    """
    found_options = _URI_OPTIONS.search(uri)
    options = found_options.group() if found_options else ""
    uri = uri[: len(uri) - len(options)]
    scheme = uri.split("://", 1)[0]
    glob_at = _GLOB_CHARS.search(uri)
    # The filesystem is opened on the part before the first glob, so '?' is never read as a URL query.
    base_uri = uri[: uri.rfind("/", 0, glob_at.start())] if glob_at else uri
    try:
        fs, base = pafs.FileSystem.from_uri(base_uri + options)
        if glob_at:
            pattern = base.rstrip("/") + uri[len(base_uri) :]
            selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
            matches = [i for i in fs.get_file_info(selector) if _glob_match(i.path, pattern)]
            if not matches:
                raise UserError(f"source '{source_name}': glob {uri} matches no files")
        else:
            matches = [fs.get_file_info(base)]
        files = []
        for info in sorted(matches, key=lambda i: i.path):
            as_uri = f"{scheme}://{info.path}{options}"
            if info.type == pafs.FileType.NotFound:
                raise UserError(f"source '{source_name}': path {uri} does not exist")
            if info.type == pafs.FileType.Directory:
                listed = fs.get_file_info(pafs.FileSelector(info.path, recursive=True))
                found = [
                    f"{scheme}://{i.path}{options}"
                    for i in listed
                    if i.type == pafs.FileType.File and _listable(i.path[len(info.path) :])
                ]
                if not found:
                    raise UserError(
                        f"source '{source_name}': directory {as_uri} holds no {', '.join(DATA_SUFFIXES)} files"
                    )
                files.extend(found)
            elif not has_data_suffix(info.path):
                raise _suffix_error(source_name, as_uri)
            else:
                files.append(as_uri)
        return files
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError; access errors are OSErrors
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"source '{source_name}': cannot read {uri} ({first_line})") from None


def _listable(relative_path: str) -> bool:
    """Whether a file found under a directory is data (the same rules as `_walk_local`)."""
    parts = relative_path.strip("/").split("/")
    return has_data_suffix(parts[-1]) and not any(p.startswith((".", "_")) for p in parts)


def _glob_match(path: str, pattern: str) -> bool:
    """Glob match as Python's glob does: segment by segment, '**' spans directories, dot names only by name."""

    def segment(part: str, pat: str) -> bool:
        return fnmatchcase(part, pat) and (not part.startswith(".") or pat.startswith("."))

    def match(parts: list[str], pats: list[str]) -> bool:
        if not pats:
            return not parts
        if pats[0] == "**":
            spans = range(len(parts) + 1)
            return any(match(parts[i:], pats[1:]) for i in spans if not any(p.startswith(".") for p in parts[:i]))
        return bool(parts) and segment(parts[0], pats[0]) and match(parts[1:], pats[1:])

    return match(path.strip("/").split("/"), pattern.strip("/").split("/"))


# ---------------------------------------------------------------- records


def iter_raw_records(
    file: str, max_record_bytes: int, chunk_bytes: int = CHUNK_BYTES, stats: ReadStats | None = None
) -> Iterator[RawItem]:
    """Stream one file's records as RawItems; the format comes from the extension (UserError if unknown)."""
    name = _URI_OPTIONS.sub("", file).lower().removesuffix(".gz") if "://" in file else file.lower().removesuffix(".gz")
    stats = stats or ReadStats()
    if name.endswith(".parquet"):
        yield from _iter_parquet(file, max_record_bytes, stats)
        return
    if not name.endswith((".jsonl", ".json")):
        raise UserError(f"{file}: unsupported extension (expected one of {', '.join(DATA_SUFFIXES)})")
    fs, path = _filesystem(file)
    try:
        stream = fs.open_input_stream(path, compression="detect")
    except OSError as e:
        raise UserError(f"{file}: cannot open ({str(e).splitlines()[0]})") from None
    with stream:
        parse = _iter_jsonl if name.endswith(".jsonl") else _iter_json
        yield from parse(stream, max_record_bytes, chunk_bytes, stats)


def _filesystem(file: str) -> tuple[pafs.FileSystem, str]:
    if "://" in file:
        return pafs.FileSystem.from_uri(file)
    return pafs.LocalFileSystem(), os.path.abspath(file)


def _error(position: str, reason: str, raw: str | bytes = "") -> RawItem:
    if isinstance(raw, bytes):
        raw = raw[: EXAMPLE_CHARS * 4].decode("utf-8", errors="replace")
    return RawItem(position, None, reason, raw[:EXAMPLE_CHARS])


def _as_object(position: str, value, raw: str) -> RawItem:
    if not isinstance(value, dict):
        return _error(position, f"expected a JSON object, got {json_type_name(value)}", raw)
    return RawItem(position, value, None, raw[:EXAMPLE_CHARS])


def _oversize(position: str, size: int, max_record_bytes: int, raw: str | bytes) -> RawItem:
    return _error(position, f"record is {size} bytes, over max_record_bytes ({max_record_bytes})", raw)


# ---------------------------------------------------------------- JSONL


def _iter_jsonl(stream, max_record_bytes: int, chunk_bytes: int, stats: ReadStats) -> Iterator[RawItem]:
    line_number = 0
    for line, size in _iter_lines(stream, max_record_bytes, chunk_bytes, stats):
        line_number += 1
        position = f"line {line_number}"
        if size > max_record_bytes:
            yield _oversize(position, size, max_record_bytes, line)
            continue
        line = line.rstrip()  # only the end, so a column in an error is the column in the file
        if line_number == 1:
            line = line.removeprefix(codecs.BOM_UTF8)
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _error(position, f"invalid UTF-8 at byte {e.start} of the line", line)
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            yield _error(position, f"malformed JSON: {e.msg} at column {e.colno}", text)
            continue
        yield _as_object(position, value, text)


def _iter_lines(stream, max_record_bytes: int, chunk_bytes: int, stats: ReadStats) -> Iterator[tuple[bytes, int]]:
    """(line, size in bytes) per line; a line over the limit comes back as just its start, never held whole."""
    buffer = b""
    start = 0  # where the current line begins in `buffer`
    skipping = None  # (start of an over-size line, bytes skipped so far) while discarding one
    while True:
        end = buffer.find(b"\n", start)
        if end >= 0:
            if skipping:
                yield skipping[0], skipping[1] + end - start
                skipping = None
            else:
                yield buffer[start:end], end - start
            start = end + 1
            continue
        pending = len(buffer) - start
        if skipping is None and pending > max_record_bytes:
            skipping = (buffer[start : start + EXAMPLE_CHARS * 4], 0)
        if skipping:
            skipping = (skipping[0], skipping[1] + pending)
            buffer, start = b"", 0
        chunk = stream.read(chunk_bytes)
        if not chunk:
            break
        buffer = buffer[start:] + chunk
        start = 0
        stats.saw(len(buffer))
    if skipping:
        yield skipping
    elif start < len(buffer):
        yield buffer[start:], len(buffer) - start


# ---------------------------------------------------------------- JSON (array or one object)

_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8
_IN_STRING = re.compile(r'["\\]')
_IN_STRUCTURE = re.compile(r'["{}\[\],]')
_NUMBER_PART = re.compile(r"[-+.eE0-9]*")
_ESCAPE_PART = re.compile(r"u[0-9a-fA-F]{0,4}")


class _TextWindow:
    """A sliding window of decoded text over a byte stream, with the byte offset of its first character.

    Text is decoded with surrogateescape so invalid bytes survive as marks the parser can find, and so the
    text encodes back to exactly the bytes it came from (which keeps byte offsets exact).
    """

    def __init__(self, stream, chunk_bytes: int, stats: ReadStats):
        self.stream, self.chunk_bytes, self.stats = stream, chunk_bytes, stats
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.text, self.pos, self.start = "", 0, 0  # start: byte offset of text[0]
        self.bytes_in = 0  # bytes fed to the decoder
        self.eof = False

    def offset(self, index: int | None = None) -> int:
        return self.start + _byte_len(self.text[: self.pos if index is None else index])

    def drop_before(self, index: int) -> None:
        self.start += _byte_len(self.text[:index])
        self.text = self.text[index:]
        self.pos -= index

    def fill(self, at_least: int = 0) -> bool:
        """Drop consumed text, read more; False at end of file."""
        if self.eof:
            return False
        self.drop_before(self.pos)
        data = self.stream.read(max(self.chunk_bytes, at_least))
        self.bytes_in += len(data)
        self.eof = not data
        self.text += self.decoder.decode(data, final=self.eof)
        self.stats.saw(len(self.text))
        return not self.eof

    def buffered_bytes(self) -> int:
        return self.bytes_in - self.start

    def peek(self) -> str:
        """The next non-whitespace character ('' at end of file), with `pos` moved onto it."""
        while True:
            self.pos = _WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.fill():
                return ""


def _byte_len(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogateescape"))


def _iter_json(stream, max_record_bytes: int, chunk_bytes: int, stats: ReadStats) -> Iterator[RawItem]:
    window = _TextWindow(stream, chunk_bytes, stats)
    first = window.peek()
    if first == "\ufeff":  # a byte-order mark before the value
        window.pos += 1
        first = window.peek()
    if first not in ("[", "{"):
        found = "an empty file" if first == "" else f"{first!r}"
        yield _error("offset 0", f"expected a JSON array or object at the top level, found {found}")
        return
    if first == "{":  # a file holding one object is one record
        item = _read_element(window, "index 0", max_record_bytes)
        yield item
        if _is_file_level(item):
            return
    else:
        window.pos += 1
        index = 0
        while True:
            after = window.peek()
            if after == "]" and index == 0:
                window.pos += 1
                break
            item = _read_element(window, f"index {index}", max_record_bytes)
            yield item
            if _is_file_level(item):  # nothing after a break in the file's structure can be trusted
                return
            index += 1
            after = window.peek()
            if after == ",":
                window.pos += 1
                continue
            if after == "]":
                window.pos += 1
                break
            where = f"offset {window.offset()}"
            if after == "":
                yield _error(where, "truncated JSON array (file ends before the closing ']')")
            else:
                yield _error(where, f"malformed JSON array: expected ',' or ']', found {after!r}")
            return
    if window.peek() != "":
        yield _error(f"offset {window.offset()}", "unexpected data after the top-level JSON value")


def _is_file_level(item: RawItem) -> bool:
    """Errors about the file's structure name a byte offset; errors about one element name its index."""
    return item.error is not None and item.position.startswith("offset")


def _read_element(window: _TextWindow, position: str, max_record_bytes: int) -> RawItem:
    """Decode the value at `window.pos`, reading more text until it is complete, too big, or broken."""
    while True:
        begin = window.pos
        try:
            value, end = _DECODER.raw_decode(window.text, begin)
        except json.JSONDecodeError as e:
            ended_early = _ends_inside_value(e, window.text)
            error_offset = window.offset(e.pos)
            window.drop_before(begin)  # so the window holds just this element: its size is what is buffered
            begin = 0
            if ended_early and window.buffered_bytes() > max_record_bytes:
                return _skip_oversize(window, position, max_record_bytes)
            # Grow geometrically so a large record is decoded O(log size) times, not once per chunk.
            if ended_early and window.fill(at_least=len(window.text) - begin):
                continue
            where = f"offset {window.offset(begin)}"
            if ended_early:
                return _error(where, "truncated JSON array (file ends inside a record)", window.text[begin:])
            return _error(where, f"malformed JSON: {e.msg} at offset {error_offset}", window.text[begin:])
        # A number at the very end of the window may continue in the next chunk.
        if end == len(window.text) and isinstance(value, (int, float)) and window.fill():
            continue
        raw = window.text[begin:end]
        window.pos = end
        size = len(raw) if len(raw) * 4 <= max_record_bytes else _byte_len(raw)  # chars <= bytes <= 4 * chars
        if size > max_record_bytes:
            return _oversize(position, size, max_record_bytes, raw)
        bad_byte = _ESCAPED_BYTES.search(raw)
        if bad_byte:
            return _error(position, f"invalid UTF-8 at byte {_byte_len(raw[: bad_byte.start()])} of the record", raw)
        return _as_object(position, value, raw)


def _ends_inside_value(error: json.JSONDecodeError, text: str) -> bool:
    """Whether a decode error only says the text stops too soon (needs more, or is truncated)."""
    if error.msg.startswith("Unterminated string"):
        return True
    tail = text[error.pos :].rstrip()
    if error.msg.startswith("Invalid \\uXXXX escape"):
        return _ESCAPE_PART.fullmatch(tail) is not None  # the text stops inside or right after '\\uXXXX'
    return (
        tail == ""
        or any(word.startswith(tail) for word in ("true", "false", "null"))
        or _NUMBER_PART.fullmatch(tail) is not None
    )


def _skip_oversize(window: _TextWindow, position: str, max_record_bytes: int) -> RawItem:
    """Step over an element too big to hold, tracking only strings and nesting depth, and report its size."""
    begin_offset = window.offset()
    example = window.text[window.pos : window.pos + EXAMPLE_CHARS]
    window.drop_before(window.pos)
    depth, in_string, i = 0, False, 0
    while True:
        text = window.text
        match = (_IN_STRING if in_string else _IN_STRUCTURE).search(text, i)
        if match is None or (match.group() == "\\" and match.end() == len(text)):
            keep = len(text) if match is None else match.start()  # keep a trailing backslash for its pair
            window.drop_before(keep)
            window.pos = 0
            if not window.fill():
                return _error(f"offset {begin_offset}", "truncated JSON array (file ends inside a record)", example)
            i = 0
            continue
        char = match.group()
        i = match.end()
        if in_string:
            if char == "\\":
                i += 1
            else:
                in_string = False
                if depth == 0:
                    break
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif depth == 0:  # ',' or a closer ends a scalar element
            i = match.start()
            break
        elif char in "}]":
            depth -= 1
            if depth == 0:
                break
    window.pos = i
    return _oversize(position, window.offset() - begin_offset, max_record_bytes, example)


# ---------------------------------------------------------------- Parquet


def _iter_parquet(file: str, max_record_bytes: int, stats: ReadStats) -> Iterator[RawItem]:
    fs, path = _filesystem(file)
    try:
        parquet = pq.ParquetFile(fs.open_input_file(path))
    except (OSError, ValueError) as e:
        raise UserError(f"{file}: cannot read as Parquet ({str(e).splitlines()[0]})") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        stats.saw(batch.nbytes)
        # Arrow holds at least a row's data bytes, so a batch under the limit cannot hold an over-size row.
        check_rows = batch.nbytes > max_record_bytes
        for value in batch.to_pylist():
            position = f"row {row}"
            row += 1
            if check_rows:
                raw = json.dumps(value, ensure_ascii=False, default=str)
                if _byte_len(raw) > max_record_bytes:
                    yield _oversize(position, _byte_len(raw), max_record_bytes, raw)
                    continue
            yield RawItem(position, value, None, "")
