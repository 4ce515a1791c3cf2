"""README table and chart of ``benchmarks.quality_real`` results (rendered from the JSON only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _short(task: str) -> str:
    return task.replace("_", " ")


def markdown_table(result: dict[str, Any]) -> str:
    """Two tables (normalized accuracy, then absolute accuracy, per task and mean) and one line
    per new variant saying whether it beat the method it modifies, or that it was absent."""
    tasks = list(result["tasks"])
    rows = result["rows"]
    out = [f"*{result['source_note']}*", ""] if result.get("source_note") else []
    out += [
        f"Normalized accuracy (% of the task's expert), {result['model']['name']}, {len(tasks)} tasks:",
        "",
        "| method | " + " | ".join(_short(t) for t in tasks) + " | **mean norm.** | mean acc. |",
        "|---" * (len(tasks) + 3) + "|",
    ]
    for r in rows:
        cells = " | ".join(f"{100 * r['normalized'][t]:.1f}" for t in tasks)
        out.append(
            f"| {r['label']} | {cells} | **{100 * r['mean_normalized']:.1f}** | {100 * r['mean_accuracy']:.1f} |"
        )
    out += [
        "",
        "Absolute accuracy (%):",
        "",
        "| method | " + " | ".join(_short(t) for t in tasks) + " | **mean** |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for r in rows:
        cells = " | ".join(f"{100 * r['accuracy'][t]:.1f}" for t in tasks)
        out.append(f"| {r['label']} | {cells} | **{100 * r['mean_accuracy']:.1f}** |")
    out += ["", *variant_lines(result)]
    return "\n".join(out)


def variant_lines(result: dict[str, Any]) -> list[str]:
    """Per new variant (ACTMat trim, SVC): beat its base method on this suite, or absent."""
    by_label = {r["label"]: r for r in result["rows"]}
    lines = []
    for label, base in result.get("variants", {}).items():
        if label not in by_label or base not in by_label:
            lines.append(f"- {label}: {base if label not in by_label else 'its base row did not run'}.")
            continue
        v, b = by_label[label]["mean_normalized"], by_label[base]["mean_normalized"]
        verdict = "beats" if v > b else "does not beat"
        lines.append(f"- {label} {verdict} {base}: {100 * v:.1f} vs {100 * b:.1f} mean normalized accuracy.")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars: mean normalized accuracy per row, with each task's value as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    rows = [r for r in result["rows"] if r["label"] != "Experts (individual)"]
    colors = {"reference": "#9a9a9a", "data-free": "#4c78a8", "data-based": "#b279a2"}
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.4))
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [100 * r["mean_normalized"] for r in rows], color=[colors[r["kind"]] for r in rows], height=0.7)
    markers = "os^vD<>ph*"
    for j, t in enumerate(tasks):
        ax.scatter(
            [100 * r["normalized"][t] for r in rows],
            ys,
            s=12,
            marker=markers[j % len(markers)],
            color="black",
            alpha=0.55,
            label=_short(t),
            zorder=3,
        )
    ax.axvline(100, color="black", lw=0.8, ls="--")
    ax.set_yticks(ys, [r["label"] for r in rows], fontsize=8)
    ax.set_xlabel("normalized accuracy (% of expert): bar = mean, markers = tasks")
    ax.set_title(
        f"Merging {len(tasks)} fully fine-tuned experts of {result['model']['name']} (raymerge merge())", fontsize=10
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
