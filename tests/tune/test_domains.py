import pyarrow.parquet as pq

from instune.data.formats import read_canonical
from instune.tune.domains import rekey_by_domain, write_domain_sources


def test_rekey_keys_records_by_domain_and_counts_them(tmp_path, filtered):
    counts = rekey_by_domain(filtered, tmp_path / "by_domain")
    assert counts == {"arithmetic": 3, "string_edit": 1, "list_ops": 1}
    table = pq.read_table(tmp_path / "by_domain")
    assert table.column("source").to_pylist() == table.column("domain").to_pylist()
    assert sorted(table.column("id").to_pylist()) == ["1", "2", "3", "4", "5"]
    assert table.schema == pq.read_schema(filtered / "part-0.parquet")


def test_rekey_reuses_a_finished_copy(tmp_path, filtered):
    rekey_by_domain(filtered, tmp_path / "by_domain")
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "by_domain").iterdir()}
    assert rekey_by_domain(filtered, tmp_path / "by_domain")["arithmetic"] == 3
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "by_domain").iterdir()} == stamps


def test_domain_sources_read_back_as_openai_records_of_their_domain(tmp_path, filtered):
    files = write_domain_sources(filtered, tmp_path / "sources", ["arithmetic", "list_ops"])
    assert sorted(p.name for p in (tmp_path / "sources").iterdir()) == ["arithmetic.jsonl", "list_ops.jsonl"]
    kept = [record for kind, record in read_canonical(str(files["arithmetic"]), "arithmetic", "general", "openai",
                                                      None, 10_000) if kind == "kept"]
    assert [r["messages"][1]["content"] for r in kept] == ["a 1", "a 3", "a 4"]
    assert {r["domain"] for r in kept} == {"arithmetic"}
