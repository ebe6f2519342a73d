"""Held-out preference pairs scored by a model: does it give the chosen response more probability?

`preference accuracy` is the fraction of pairs whose chosen response has the higher summed log-prob under the
model (the reward accuracy DPO's implicit reward would have with a uniform reference), so it can be measured
the same way before and after tuning. With the reference's log-probs stored beside the pairs (precompute),
the DPO reward accuracy and margin of the tuned model against that reference are reported too: before tuning
the model is the reference, every reward is 0 and there is nothing to compare.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from instune.data.reference_logprobs import REFERENCE_COLUMNS, ReferenceLogprobs
from instune.train.sessions import PAIR_COLUMNS


def read_pairs_split(split_dir: str | Path) -> dict[str, np.ndarray | list]:
    """The pair columns of a prepared split (local directory), rows unpadded."""
    import pyarrow.dataset as pads

    files = sorted(str(p) for p in Path(split_dir).glob("*.parquet"))
    table = pads.dataset(files, format="parquet").to_table()
    out: dict = {}
    for side in ("chosen", "rejected"):
        sequences = []
        for ids, labels in zip(table[f"{side}_input_ids"].to_pylist(), table[f"{side}_labels"].to_pylist()):
            labels = np.asarray(labels, dtype=np.int64)
            end = int(np.flatnonzero(labels != -100)[-1]) + 1
            sequences.append((np.asarray(ids[:end], dtype=np.int64), labels[:end]))
        out[side] = sequences
    for name in REFERENCE_COLUMNS:
        if name in table.column_names:
            out[name] = table[name].to_numpy()
    assert set(PAIR_COLUMNS) <= set(table.column_names), f"{split_dir} holds no preference pairs"
    return out


def score_pairs(model_path: str, split_dir: str | Path, beta: float, batch_size: int = 16,
                max_batch_tokens: int = 16384, dtype: str | None = None) -> dict:
    """{"pairs", "preference_accuracy", "logp_margin"[, "reward_accuracy", "reward_margin"]} of a model on a
    prepared split of pairs."""
    pairs = read_pairs_split(split_dir)
    # The actor class works as a plain object too: it holds the model and batches sequences by length.
    scorer = ReferenceLogprobs(model_path, pad_id=0, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                               dtype=dtype)
    n = len(pairs["chosen"])
    logps = scorer.logps(pairs["chosen"] + pairs["rejected"])
    chosen, rejected = logps[:n], logps[n:]
    result = {"pairs": n, "preference_accuracy": float(np.mean(chosen > rejected)) if n else 0.0,
              "logp_margin": float(np.mean(chosen - rejected)) if n else 0.0}
    if all(c in pairs for c in REFERENCE_COLUMNS) and n:
        chosen_reward = beta * (chosen - pairs["ref_chosen_logps"])
        rejected_reward = beta * (rejected - pairs["ref_rejected_logps"])
        result["reward_accuracy"] = float(np.mean(chosen_reward > rejected_reward))
        result["reward_margin"] = float(np.mean(chosen_reward - rejected_reward))
    return result


def before_after(base_model: str, tuned_model: str, split_dir: str | Path, beta: float,
                 dtype: str | None = None) -> dict:
    """{"before": score_pairs of the base, "after": of the tuned model} on the same held-out pairs, both in
    `dtype` (model.dtype, as the reference log-probs were computed)."""
    return {"before": score_pairs(base_model, split_dir, beta, dtype=dtype),
            "after": score_pairs(tuned_model, split_dir, beta, dtype=dtype)}


def accuracy_png(scores: dict) -> bytes:
    """Bars of the held-out pairs' preference and reward accuracy, before and after tuning."""
    from instune.report.format import figure_png, pyplot

    plt = pyplot()
    names = [k for k in ("preference_accuracy", "reward_accuracy") if k in scores["after"]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for offset, label, color in ((-0.2, "before", "#9e9e9e"), (0.2, "after", "#1f77b4")):
        ax.bar([i + offset for i in range(len(names))], [scores[label].get(n, 0.0) for n in names], width=0.4,
               label=label, color=color)
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names])
    ax.set(ylim=(0, 1), ylabel="fraction of held-out pairs", title=f"{scores['after']['pairs']} held-out pairs")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return figure_png(fig)


def report_sections(scores: dict) -> list:
    """The report's table and plot of held-out pair scores before and after tuning."""
    from instune.report.document import Image, Table

    keys = [k for k in scores["after"] if k != "pairs"]
    rows = [[k, scores["before"].get(k), scores["after"][k]] for k in keys]
    return [Table(["held-out pairs", "before", "after"], rows, title="preference pairs: before and after",
                  caption=f"{scores['after']['pairs']} held-out pairs (data.validation_fraction). Preference "
                          "accuracy: the chosen response has the higher log-prob. Reward accuracy and margin: "
                          "DPO's reward against the reference (0 before tuning, when the model is the reference)."),
            Image(accuracy_png(scores), title="preference pairs: accuracy before and after")]


def summary_line(scores: dict) -> str:
    before, after = scores["before"], scores["after"]
    line = (f"[eval] held-out pairs ({after['pairs']}): preference accuracy {before['preference_accuracy']:.3f} -> "
            f"{after['preference_accuracy']:.3f}, log-prob margin {before['logp_margin']:.3f} -> "
            f"{after['logp_margin']:.3f}")
    if "reward_accuracy" in after:
        line += f"; reward accuracy vs reference {after['reward_accuracy']:.3f}, margin {after['reward_margin']:.3f}"
    return line
