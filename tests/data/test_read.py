import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instune.data.read import ReadStats, expand_paths, iter_raw_records
from instune.errors import UserError


def write(path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def read_all(file, max_record_bytes=10**6, chunk_bytes=1 << 16):
    return list(iter_raw_records(file, max_record_bytes, chunk_bytes=chunk_bytes))


def values(items):
    return [i.value for i in items if i.error is None]


def errors(items):
    return [(i.position, i.error) for i in items if i.error is not None]


# ---------------------------------------------------------------- paths


def test_expand_glob_dir_and_list_sorted_without_duplicates(tmp_path):
    for name in ["b.jsonl", "a.json", "sub/deep/c.parquet", "sub/d.jsonl.gz", "notes.txt", ".hidden.jsonl",
                 "_tmp/e.jsonl"]:
        write(tmp_path / name, "")
    found = expand_paths("src", str(tmp_path))
    assert found == sorted(str(tmp_path / n) for n in ["a.json", "b.jsonl", "sub/d.jsonl.gz", "sub/deep/c.parquet"])
    assert expand_paths("src", str(tmp_path / "*.json*")) == [str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")]
    assert expand_paths("src", str(tmp_path / "**" / "*.parquet")) == [str(tmp_path / "sub/deep/c.parquet")]
    both = expand_paths("src", [str(tmp_path / "b.jsonl"), str(tmp_path / "*.jsonl")])
    assert both == [str(tmp_path / "b.jsonl")]


def test_expand_file_uri_glob_and_directory(tmp_path):
    for name in ["x/a.jsonl", "x/b.json", "x/y/c.jsonl", "x/readme.md", "x/_temporary/part.jsonl", "x/.d.json"]:
        write(tmp_path / name, "")
    uri = f"file://{tmp_path}/x"
    assert expand_paths("src", f"{uri}/*.jsonl") == [f"{uri}/a.jsonl"]
    # A glob is explicit, so it reaches '_' directories (as Python's glob does) but not dot names.
    assert expand_paths("src", f"{uri}/**/*.json*") == [
        f"{uri}/_temporary/part.jsonl", f"{uri}/a.jsonl", f"{uri}/b.json", f"{uri}/y/c.jsonl"
    ]
    assert expand_paths("src", str(tmp_path / "x" / "**" / "*.json*")) == [
        str(tmp_path / "x" / n) for n in ["_temporary/part.jsonl", "a.jsonl", "b.json", "y/c.jsonl"]
    ]
    assert expand_paths("src", uri) == [f"{uri}/a.jsonl", f"{uri}/b.json", f"{uri}/y/c.jsonl"]
    with pytest.raises(UserError, match=r"source 'src': path file://.*/x/nope.jsonl does not exist"):
        expand_paths("src", f"{uri}/nope.jsonl")


@pytest.mark.parametrize(
    "relative, message",
    [
        ("missing.jsonl", r"^source 'web': path .*/missing.jsonl does not exist$"),
        ("*.parquet", r"^source 'web': glob .*/\*.parquet matches no files$"),
        ("empty_dir", r"^source 'web': directory .*/empty_dir holds no .jsonl, .json, .parquet"),
        ("notes.txt", r"^source 'web': .*/notes.txt has an unsupported extension"),
    ],
)
def test_expand_errors_name_source_and_path(tmp_path, relative, message):
    write(tmp_path / "notes.txt", "")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match=message):
        expand_paths("web", str(tmp_path / relative))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file, so permissions cannot be tested")
def test_expand_unreadable_file(tmp_path):
    path = write(tmp_path / "secret.jsonl", "{}\n")
    os.chmod(path, 0)
    with pytest.raises(UserError, match="secret.jsonl is not readable"):
        expand_paths("src", path)


def test_expand_special_file_is_an_error(tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(UserError, match="pipe.jsonl is not a regular file"):
        expand_paths("src", str(tmp_path / "pipe.jsonl"))


def test_unknown_extension_when_reading(tmp_path):
    with pytest.raises(UserError, match=r"data.csv: unsupported extension"):
        read_all(write(tmp_path / "data.csv", "a,b\n"))


# ---------------------------------------------------------------- JSONL


def test_jsonl_records_and_every_kind_of_bad_line(tmp_path):
    lines = [
        b'\xef\xbb\xbf{"a": 1}',  # byte-order mark
        b"",
        b"   ",
        b'{"a": 2}\r',  # CRLF
        b'{"a": ',
        b"[1, 2]",
        b'{"a": "caf\xe9"}',  # latin-1, not UTF-8
        b'{"a": "' + b"x" * 200 + b'"}',
        b'{"a": "\xc3\xa9"}',
        b'{"a": 3}',  # no trailing newline
    ]
    items = read_all(write(tmp_path / "d.jsonl", b"\n".join(lines)), max_record_bytes=100, chunk_bytes=16)
    assert values(items) == [{"a": 1}, {"a": 2}, {"a": "é"}, {"a": 3}]
    assert [i.position for i in items if i.error is None] == ["line 1", "line 4", "line 9", "line 10"]
    assert errors(items) == [
        ("line 5", "malformed JSON: Expecting value at column 6"),
        ("line 6", "expected a JSON object, got an array"),
        ("line 7", "invalid UTF-8 at byte 10 of the line"),
        ("line 8", "record is 209 bytes, over max_record_bytes (100)"),
    ]
    oversize = next(i for i in items if i.position == "line 8")
    assert oversize.raw.startswith('{"a": "xxxx') and len(oversize.raw) <= 200


def test_jsonl_oversize_line_is_not_held_in_memory(tmp_path):
    big = b'{"a": "' + b"y" * 100_000 + b'"}'
    file = write(tmp_path / "d.jsonl", b'{"a": 1}\n' + big + b'\n{"a": 2}\n' + big)
    stats = ReadStats()
    items = list(iter_raw_records(file, 1000, chunk_bytes=512, stats=stats))
    assert values(items) == [{"a": 1}, {"a": 2}]
    assert errors(items) == [("line 2", "record is 100009 bytes, over max_record_bytes (1000)")] + [
        ("line 4", "record is 100009 bytes, over max_record_bytes (1000)")
    ]
    assert stats.peak_buffer < 1000 + 2 * 512


def test_gzipped_jsonl(tmp_path):
    file = tmp_path / "d.jsonl.gz"
    file.write_bytes(gzip.compress(b'{"a": 1}\n{"a": 2}\n'))
    assert values(read_all(str(file))) == [{"a": 1}, {"a": 2}]


# ---------------------------------------------------------------- JSON


RECORDS = [
    {"a": 'x\\"y é 😀', "n": [1, 2.5e3, -3, True, False, None]},
    {"b": {"c": [{}, []]}, "t": "line\nbreak", "u": "\\ud83d\\ude00 true"},
    {"k": "😀 last"},
]


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1 << 16])
def test_json_array_records_by_index(tmp_path, chunk_bytes):
    file = write(tmp_path / "d.json", "\ufeff" + json.dumps(RECORDS, indent=2, ensure_ascii=False))
    items = read_all(file, chunk_bytes=chunk_bytes)
    assert values(items) == RECORDS
    assert [i.position for i in items] == ["index 0", "index 1", "index 2"]
    assert items[2].raw == '{\n    "k": "😀 last"\n  }'


def test_json_truncated_array_keeps_records_before_the_cut_and_names_the_offset(tmp_path):
    data = json.dumps(RECORDS, ensure_ascii=False).encode()
    third = data.index(b'{"k"')
    file = write(tmp_path / "d.json", data[: third + 6])
    items = read_all(file, chunk_bytes=5)
    assert values(items) == RECORDS[:2]
    assert errors(items) == [(f"offset {third}", "truncated JSON array (file ends inside a record)")]
    assert third > 50  # a byte offset past the multi-byte characters, not a character index


@pytest.mark.parametrize("indent", [None, 1])
def test_json_cut_anywhere_is_truncation_never_a_wrong_record(tmp_path, indent):
    data = json.dumps(RECORDS, indent=indent, ensure_ascii=indent is None).encode()
    file = tmp_path / "d.json"
    for cut in range(1, len(data)):
        file.write_bytes(data[:cut])
        items = read_all(str(file), chunk_bytes=3)
        kept = values(items)
        assert kept == RECORDS[: len(kept)], cut
        assert len(errors(items)) == 1 and "truncated JSON array" in errors(items)[0][1], (cut, errors(items))


def test_json_bad_elements_are_rejected_and_reading_goes_on(tmp_path):
    big = {"big": "z" * 5000}
    data = b"[" + b", ".join(
        [b'{"a": 1}', b'"text"', json.dumps(big).encode(), b'{"a": "caf\xe9"}', b"[]", b'{"a": 2}']
    ) + b"]\n"
    items = read_all(write(tmp_path / "d.json", data), max_record_bytes=1000, chunk_bytes=64)
    assert values(items) == [{"a": 1}, {"a": 2}]
    assert errors(items) == [
        ("index 1", "expected a JSON object, got a string"),
        ("index 2", f"record is {len(json.dumps(big))} bytes, over max_record_bytes (1000)"),
        ("index 3", "invalid UTF-8 at byte 10 of the record"),
        ("index 4", "expected a JSON object, got an array"),
    ]
    assert [i.position for i in items][-1] == "index 5"


def test_json_malformed_array_stops_with_one_error(tmp_path):
    data = b'[{"a": 1}, {"a": x}, {"a": 3}]'
    items = read_all(write(tmp_path / "d.json", data), chunk_bytes=4)
    assert values(items) == [{"a": 1}]
    assert errors(items) == [("offset 11", "malformed JSON: Expecting value at offset 17")]
    items = read_all(write(tmp_path / "e.json", b'[{"a": 1} {"a": 2}]'))
    assert errors(items) == [("offset 10", "malformed JSON array: expected ',' or ']', found '{'")]


@pytest.mark.parametrize(
    "text, expected_values, expected_errors",
    [
        ('{"a": 1}\n', [{"a": 1}], []),
        ("[ ]", [], []),
        ("", [], [("offset 0", "expected a JSON array or object at the top level, found an empty file")]),
        ("42", [], [("offset 0", "expected a JSON array or object at the top level, found '4'")]),
        ('[{"a": 1}] [', [{"a": 1}], [("offset 11", "unexpected data after the top-level JSON value")]),
        ('[{"a": 1}', [{"a": 1}], [("offset 9", "truncated JSON array (file ends before the closing ']')")]),
    ],
)
def test_json_top_level_shapes(tmp_path, text, expected_values, expected_errors):
    items = read_all(write(tmp_path / "d.json", text))
    assert (values(items), errors(items)) == (expected_values, expected_errors)


def test_json_array_of_20_mb_is_read_with_a_bounded_buffer(tmp_path):
    record = {"instruction": "q" * 500, "output": "é" * 250}
    largest = {"instruction": "big", "output": "w" * 50_000}
    rows = [record] * 10_000 + [largest] + [record] * 10_000
    file = tmp_path / "big.json"
    with open(file, "w", encoding="utf-8") as out:
        out.write("[\n")
        out.write(",\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
        out.write("\n]\n")
    assert file.stat().st_size > 20_000_000
    stats = ReadStats()
    count = 0
    for item in iter_raw_records(str(file), 100_000, chunk_bytes=8192, stats=stats):
        assert item.error is None
        count += 1
    assert count == len(rows)
    largest_chars = len(json.dumps(largest))
    assert stats.peak_buffer <= 3 * (largest_chars + 8192), stats.peak_buffer


# ---------------------------------------------------------------- Parquet


def test_parquet_rows_round_trip_including_nested_messages(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], "n": i}
        for i in range(2500)
    ]
    file = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), file, row_group_size=700)
    items = read_all(str(file))
    assert values(items) == rows
    assert [i.position for i in items[:2]] + [items[-1].position] == ["row 0", "row 1", "row 2499"]


def test_parquet_oversize_row(tmp_path):
    rows = [{"text": "short"}, {"text": "x" * 3000}, {"text": "also short"}]
    file = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), file)
    items = read_all(str(file), max_record_bytes=1000)
    assert values(items) == [rows[0], rows[2]]
    assert errors(items) == [("row 1", "record is 3012 bytes, over max_record_bytes (1000)")]


def test_sources_behind_an_s3_compatible_endpoint_keep_its_options(s3_uri):
    """A glob or directory on a bucket of a non-AWS endpoint (MinIO, a test server) expands to files that carry
    the URI's options, so each one opens on that endpoint; records come back whole."""
    import pyarrow.fs as pafs

    base = s3_uri("corpus")
    fs, root = pafs.FileSystem.from_uri(base)
    for name, lines in (("a.jsonl", ['{"instruction": "x", "output": "y"}']), ("sub/b.jsonl", ['{"n": 1}', '{"n": 2}'])):
        with fs.open_output_stream(f"{root}/{name}") as f:
            f.write(("\n".join(lines) + "\n").encode())
    path, _, options = base.partition("?")
    files = expand_paths("src", f"{path}/*.jsonl?{options}")
    assert files == [f"{path}/a.jsonl?{options}"]
    everything = expand_paths("src", base)
    assert everything == [f"{path}/a.jsonl?{options}", f"{path}/sub/b.jsonl?{options}"]
    assert [item.value for item in iter_raw_records(everything[1], 1000)] == [{"n": 1}, {"n": 2}]
    # A glob's own "?" (one character) is still a glob, not options.
    assert expand_paths("src", f"{path}/?.jsonl?{options}") == files
