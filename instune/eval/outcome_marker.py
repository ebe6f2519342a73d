"""The success marker of negative-aware training at inference (Learning From Failure, Wang et al. 2024).

A model trained with outcome markers learned answers conditioned on "this response succeeds" or "fails";
evaluated without a marker it is asked something it never saw. So when training used markers, eval puts the
success marker in every prompt, where training put it (system message or before the first user turn), and
the report says so. `instune run` also evaluates the tuned model without it: the ablation row shows what
the marker is worth.
"""

from __future__ import annotations

from dataclasses import replace

from instune.data.outcome import OutcomeMarkers, with_marker
from instune.eval.compare import summary


def eval_marker(training_markers: dict | None, setting: str | None) -> OutcomeMarkers | None:
    """The markers whose success text eval prompts carry, or None.

    `training_markers` are the fields of data.outcome_markers (None when training used none); `setting` is
    eval.outcome_marker: "success", "none", or None for the default (success when training used markers).
    """
    if training_markers is None or setting == "none":
        return None
    return OutcomeMarkers(**training_markers)


def with_success_marker(eval_sets: list, markers: OutcomeMarkers) -> list:
    """Copies of `eval_sets` (EvalSet) whose every record has the success marker in its prompt; the answers,
    which the reference loss and the metrics read, are unchanged."""
    return [replace(s, records=[{**r, "messages": with_marker(r["messages"], markers.success, markers.position)}
                                for r in s.records]) for s in eval_sets]


def marker_note(markers: OutcomeMarkers | None, trained_with_markers: bool) -> str:
    """One line for the report: which marker the eval prompts carried."""
    if markers is not None:
        return (f"Eval prompts carry the success marker \"{markers.success}\" ({markers.position}), as the model "
                "was trained with outcome markers (eval.outcome_marker: success).")
    if trained_with_markers:
        return "Eval prompts carry no outcome marker (eval.outcome_marker: none), though training used them."
    return "Eval prompts carry no outcome marker (training used none)."


# (metric, label, figure) rows of the ablation table.
_ABLATION = [("exact_match", "exact match", "generalisation"), ("exact_match", "exact match", "in_domain"),
             ("exact_match", "exact match", "out_of_domain"), ("chrf", "chrF", "generalisation"),
             ("loss", "loss", "generalisation")]


def ablation_rows(with_marker_results, without_results) -> tuple[list[str], list[list]]:
    """(columns, rows): summary figures of the same model evaluated with and without the success marker."""
    with_summary, without_summary = summary(with_marker_results), summary(without_results)
    rows = []
    for metric, label, figure in _ABLATION:
        a, b = with_summary[metric][figure], without_summary[metric][figure]
        rows.append([label, figure.replace("_", "-"), a, b, a - b])
    return ["metric", "figure", "with success marker", "without marker", "difference"], rows


def marker_sections(markers: OutcomeMarkers | None, trained_with_markers: bool, with_marker_results=None,
                    without_results=None) -> list:
    """Report sections: the note on the eval prompts, and the ablation table when both results are given."""
    from instune.report.document import Table, Text

    sections = [Text(marker_note(markers, trained_with_markers), title="evaluation prompts")]
    if with_marker_results and without_results:
        sections.append(Table(*ablation_rows(with_marker_results, without_results),
                              title="outcome-marker ablation (tuned model)",
                              caption="The same model and eval sets, prompts with and without the success "
                                      "marker; difference = with - without."))
    return sections
