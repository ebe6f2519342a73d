"""Before/after tables and the summary figures: in-domain mean, out-of-domain mean, the gap."""

from __future__ import annotations


def summary(results) -> dict:
    """Mean exact match and loss over in-domain sets, over out-of-domain sets, over all, and the gap."""
    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else float("nan")

    out = {}
    for key in ("exact_match", "loss"):
        ind = mean(getattr(r, key) for r in results if r.kind == "in_domain")
        ood = mean(getattr(r, key) for r in results if r.kind == "out_of_domain")
        out[key] = {"in_domain": ind, "out_of_domain": ood, "all": mean(getattr(r, key) for r in results),
                    "gap": ind - ood}
    return out


def before_after_table(before, after) -> str:
    """A Markdown table: one row per eval set, exact match and loss before and after tuning."""
    after_by_name = {r.name: r for r in after}
    lines = ["| set | domain | kind | n | exact match before | after | loss before | after |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for b in before:
        a = after_by_name.get(b.name)
        lines.append(f"| {b.name} | {b.domain} | {b.kind} | {b.examples} | {b.exact_match:.3f} | "
                     f"{a.exact_match:.3f} | {b.loss:.3f} | {a.loss:.3f} |" if a else
                     f"| {b.name} | {b.domain} | {b.kind} | {b.examples} | {b.exact_match:.3f} | - | "
                     f"{b.loss:.3f} | - |")
    sb, sa = summary(before), summary(after)
    for group in ("in_domain", "out_of_domain", "all"):
        lines.append(f"| **mean {group}** | | | | {sb['exact_match'][group]:.3f} | {sa['exact_match'][group]:.3f} | "
                     f"{sb['loss'][group]:.3f} | {sa['loss'][group]:.3f} |")
    return "\n".join(lines)
