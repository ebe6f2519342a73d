"""The vision-language run report, built from a results dict as vlm_run writes it (no model, no Ray)."""

import json

import pytest

from instune.report.document import Image, Table, Text
from instune.report.vlm import vlm_sections, write_vlm_report


def row(em, i2t_r1, i2t_r5, t2i_r1, t2i_r5, chance=0.25):
    return {"exact_match": em, "i2t_r1": i2t_r1, "i2t_r5": i2t_r5, "t2i_r1": t2i_r1, "t2i_r5": t2i_r5,
            "i2t_chance_r1": chance, "examples": 6, "images": 6}


def gap(by_domain):
    """retrieval.domain_gap for in-domain count and colour, out-of-domain digit (without importing torch)."""
    return {m: (by_domain["count"][m] + by_domain["colour"][m]) / 2 - by_domain["digit"][m]
            for m in ("exact_match", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")}


@pytest.fixture(scope="module")
def results():
    before = {"count": row(0.5, 0.5, 1.0, 0.4, 0.8), "colour": row(0.3, 0.3, 0.9, 0.2, 0.6),
              "digit": row(0.0, 0.1, 0.5, 0.1, 0.5, chance=0.1)}
    after = {"count": row(1.0, 0.9, 1.0, 0.8, 1.0), "colour": row(0.7, 0.7, 1.0, 0.6, 1.0),
             "digit": row(0.5, 0.5, 0.9, 0.3, 0.7, chance=0.1)}
    rejects = [{"stage": "image", "reason": "image is 4x4, smaller than min_side 8", "count": 2, "example": "{..}"},
               {"stage": "tokenize", "reason": "70 tokens with images expanded, over model.max_length 64",
                "count": 1, "example": "What?"}]
    return {"before": before, "after": after, "in_domain": ["count", "colour"], "out_of_domain": ["digit"],
            "gap": {"before": gap(before), "after": gap(after)},
            "data": {"image_tasks": {"read": 12, "kept": 10, "rejected": 2, "tokenized": 9, "dropped": 1,
                                     "rejects": rejects}}}


@pytest.fixture(scope="module")
def sections(results):
    return vlm_sections(results)  # drawn once: the figures are most of this file's time


def tables(sections) -> dict[str, Table]:
    return {s.title: s for s in sections if isinstance(s, Table)}


def test_retrieval_table_has_each_domain_before_after_change_and_the_gap(sections):
    table = tables(sections)["zero-shot retrieval per domain"]
    assert table.columns[:5] == ["domain", "kind", "image->text R@1 before", "image->text R@1 after",
                                 "image->text R@1 change"]
    by_domain = {r[0]: r for r in table.rows}
    assert [r[0] for r in table.rows] == ["count", "colour", "digit", "gap (in - out)"]
    assert by_domain["digit"][1] == "out" and by_domain["digit"][2:5] == pytest.approx([0.1, 0.5, 0.4])
    # Gap before: mean(0.5, 0.3) - 0.1 = 0.3; after: mean(0.9, 0.7) - 0.5 = 0.3: unchanged for i2t R@1.
    assert by_domain["gap (in - out)"][2:5] == pytest.approx([0.3, 0.3, 0.0])
    # t2i R@5: before mean(0.8, 0.6) - 0.5 = 0.2, after mean(1.0, 1.0) - 0.7 = 0.3.
    assert by_domain["gap (in - out)"][-3:] == pytest.approx([0.2, 0.3, 0.1])
    assert "digit 0.1" in table.caption and "count 0.25" in table.caption
    generation = tables(sections)["generation per domain"]
    assert {r[0]: r[2:] for r in generation.rows}["count"] == pytest.approx([0.5, 1.0, 0.5])


def test_gap_table_summary_plots_and_data_accounting(sections):
    gaps = {r[0]: r[1:] for r in tables(sections)["gap per metric"].rows}
    assert gaps["exact match"] == pytest.approx([0.4, 0.35, -0.05, -0.05])
    assert gaps["text->image R@5"] == pytest.approx([0.2, 0.3, 0.1, 0.1])  # wider
    summary = next(s for s in sections if isinstance(s, Text)).body
    assert "Out-of-domain: digit" in summary and "image->text R@1 0.3 -> 0.3 (the same size)" in summary
    assert "exact match 0.4 -> 0.35 (narrower)" in summary and "text->image R@5 0.2 -> 0.3 (wider)" in summary
    images = [s for s in sections if isinstance(s, Image)]
    assert [i.title for i in images] == ["the gap before and after", "recall@1 and @5 per domain"]
    assert all(i.source.startswith(b"\x89PNG") for i in images)
    data = tables(sections)
    assert data["data: records per source"].rows == [["image_tasks", 12, 10, 2, 9, 1]]
    reasons = data["data: rejected and dropped records by reason"].rows
    assert [(r[1], r[3]) for r in reasons] == [("image", 2), ("tokenize", 1)]


def test_written_report_holds_the_tables_and_the_learning_curves(results, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-3}) for s in (1, 2)))
    paths = write_vlm_report(tmp_path / "out", "vlm: vision-language run", results, metrics, "name: vlm\n")
    markdown = paths.markdown.read_text()
    assert "| gap (in - out) |  | 0.3 | 0.3 | 0 |" in markdown
    assert "## learning curves" in markdown and "name: vlm" in markdown
    assert len(list((tmp_path / "out" / "report_images").glob("*.png"))) == 3
    assert "data:image/png;base64," in paths.html.read_text()
