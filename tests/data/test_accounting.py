"""The accounting of prepare: reasons grouped into kinds, and the stage table chaining each stage's counts."""

from instune.data.accounting import STAGES, reason_kind, stage_table


def test_reason_kinds_group_particulars():
    assert reason_kind("read", "record is 5123 bytes, over max_record_bytes (4096)") == \
        "record is N bytes, over max_record_bytes (N)"
    assert reason_kind("dedup:exact", "exact duplicate of s:f.jsonl:line 3") == "exact duplicate"
    assert reason_kind("dedup:near", "near-duplicate of s:f.jsonl:line 3 (jaccard≈0.91)") == "near-duplicate"
    assert reason_kind("score", "ifd 0.9812 is below min_score 1.5") == "ifd N is below min_score N"


def test_stage_table_chains_counts():
    table = stage_table({"s": 10}, {("s", "read", "x"): 2, ("s", "dedup:near", "y"): 3, ("s", "score", "z"): 1})
    rows = {r["stage"]: r for r in table["s"]}
    assert [r["stage"] for r in table["s"]] == list(STAGES)
    assert rows["read"] == {"stage": "read", "in": 10, "rejected": 2, "out": 8}
    assert rows["dedup:near"]["in"] == 8 and rows["score"] == {"stage": "score", "in": 5, "rejected": 1, "out": 4}
