"""Outcome markers for negative-aware training (Learning From Failure, Wang et al. 2024).

Agent and tool-use corpora hold failed trajectories as well as successful ones. Instead of throwing the
failures away, a record labelled with its outcome gets a marker in its prompt that says which one it is; the
model learns from both, and at inference the success marker asks for a success. Records without a label
(or with a value that is neither) are left as they are.

Markers are added when tokenizing (phase 2), so a sweep can turn them on and off without re-filtering.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# Label values read as an outcome, compared lower-cased and stripped; booleans and 1/0 count too.
SUCCESS_VALUES = frozenset({"success", "successful", "succeeded", "true", "1", "pass", "passed", "correct",
                            "positive", "yes", "solved", "resolved"})
FAILURE_VALUES = frozenset({"failure", "failed", "fail", "false", "0", "incorrect", "wrong", "negative", "no",
                            "unsolved", "unresolved", "error"})


@dataclass(frozen=True)
class OutcomeMarkers:
    field: str  # the metadata key holding the label
    success: str
    failure: str
    position: str  # "system" or "prefix"


# Written beside a model exported from a run trained with markers: `instune chat MODEL` then asks with the success
# marker without the run's config, as eval does with it.
MARKERS_FILE = "outcome_markers.json"


def write_markers_file(model_dir, markers: dict) -> None:
    """Record the run's data.outcome_markers fields in `model_dir` (a directory being written atomically)."""
    from pathlib import Path

    from instune.atomic import write_json

    write_json(Path(model_dir) / MARKERS_FILE, markers)


def read_markers_file(model_dir) -> OutcomeMarkers | None:
    """The markers a model in local directory `model_dir` was trained with, or None when it has no record."""
    from pathlib import Path

    path = Path(model_dir) / MARKERS_FILE
    return OutcomeMarkers(**json.loads(path.read_text())) if path.is_file() else None


def outcome_of(metadata: dict, field: str) -> str | None:
    """"success", "failure", or None when the record has no readable outcome label."""
    value = metadata.get(field)
    if isinstance(value, bool):
        return "success" if value else "failure"
    if not isinstance(value, (str, int, float)):
        return None
    text = str(value).strip().lower()
    if text in SUCCESS_VALUES:
        return "success"
    if text in FAILURE_VALUES:
        return "failure"
    return None


def with_marker(messages: list[dict], marker: str, position: str) -> list[dict]:
    """A copy of `messages` with `marker` in the prompt; the input is not changed.

    "system" puts it in a system message (before the text of one that exists, else a new first message);
    "prefix" puts it before the first user message, or in a system message when there is no user turn
    (completion records), so the assistant text that carries the labels is never touched.
    """
    messages = [dict(m) for m in messages]
    target_role = "user" if position == "prefix" else "system"
    for message in messages:
        if message["role"] == target_role:
            message["content"] = f"{marker}\n\n{message['content']}" if message["content"] else marker
            return messages
        if target_role == "system":
            break  # a system message only counts as one when it comes first
    return [{"role": "system", "content": marker}] + messages


def mark_outcome(messages: list[dict], metadata_json: str, markers: OutcomeMarkers) -> tuple[list[dict], str | None]:
    """(messages with the marker for the record's outcome, the outcome or None when unlabelled)."""
    metadata = json.loads(metadata_json) if metadata_json else {}
    outcome = outcome_of(metadata, markers.field)
    if outcome is None:
        return messages, None
    marker = markers.success if outcome == "success" else markers.failure
    return with_marker(messages, marker, markers.position), outcome
