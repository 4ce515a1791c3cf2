"""The real-model quality suite: its task generators label what they write, and a smoke run of
the script (a tiny random BERT stands in for the packaged all-MiniLM-L6-v2) trains, merges and
reports numbers that can fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level package of the checkout, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import quality_real_tasks as qt  # noqa: E402


def _words(vocab: qt.Vocab, x: torch.Tensor) -> list[list[str]]:
    inv = {i: w for w, i in vocab.ids.items()}
    return [[inv[int(i)] for i in row[1:-1]] for row in x]


def test_tasks_label_what_they_write() -> None:
    vocab = qt.Vocab.tiny()
    g = torch.Generator().manual_seed(0)
    for task in qt.TASKS.values():
        x, y = task.sample(240, g, vocab)
        assert x.shape == (240, qt.SEQ_LEN)
        assert torch.bincount(y, minlength=task.classes).tolist() == [240 // task.classes] * task.classes, task.name
        assert (x[:, 0] == vocab.ids["[CLS]"]).all() and (x[:, -1] == vocab.ids["[SEP]"]).all()
    nums = {w: i for i, w in enumerate(qt.NUMBERS)}
    cats = [set(c) for c in qt.CATEGORIES]
    for name, check in {
        "continent": lambda r, y: any(w in (qt.EUROPE, qt.ASIA, qt.AMERICAS)[y] for w in r),
        "number_compare": lambda r, y: (lambda a, b: (nums[a] > nums[b]) == bool(y))(*[w for w in r if w in nums]),
        "animal_before_color": lambda r, y: (
            (min(i for i, w in enumerate(r) if w in qt.ANIMALS) < min(i for i, w in enumerate(r) if w in qt.COLORS))
            == bool(y)
        ),
        "repeated_word": lambda r, y: (len({w for w in r if w not in qt.FILLER}) < 4) == bool(y),
        "last_category": lambda r, y: [w for w in r if any(w in c for c in cats)][-1] in cats[y],
        "count_colors": lambda r, y: sum(w in qt.COLORS for w in r) == y + 1,
        "sentiment_negation": lambda r, y: (
            (lambda i: (r[i] in qt.POSITIVE) != (r[i - 1] == "not"))(
                next(i for i, w in enumerate(r) if w in qt.POSITIVE or w in qt.NEGATIVE)
            )
            == bool(y)
        ),
        "topic_majority": lambda r, y: sum(w in cats[y] for w in r) == 3,
    }.items():
        x, y = qt.TASKS[name].sample(60, g, vocab)
        for row, label in zip(_words(vocab, x), y.tolist(), strict=True):
            assert check(row, label), (name, row, label)


def test_quality_real_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.quality_real", "--smoke", "--results-dir", str(tmp_path)]
    cmd += ["--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "quality_real_smoke.json").read_text())
    assert (tmp_path / "quality_real_smoke.png").stat().st_size > 1000
    rows = {r["label"]: r for r in result["rows"]}
    expert, zero = rows["Experts (individual)"], rows["Base + expert heads"]
    assert expert["mean_accuracy"] > zero["mean_accuracy"] + 0.3, (expert["accuracy"], zero["accuracy"])
    assert abs(rows["Chance"]["mean_accuracy"] - (1 / 3 + 1 / 4) / 2) < 1e-9
    merged = [r for r in result["rows"] if r["kind"] == "data-free"]
    # TA, TIES, ACTMat, and ACTMat with the trimmed covariance where this raymerge has it.
    assert [r["method"] for r in merged][:3] == ["task_arithmetic", "ties", "actmat"]
    assert [r["label"] for r in merged][3:] in ([], ["ACTMat (trim 0.5)"])
    assert ("ACTMat trim" in result["variants"]) == (len(merged) == 3)
    for r in merged:
        assert zero["mean_accuracy"] < r["mean_accuracy"] <= expert["mean_accuracy"] + 0.05, r["label"]
        assert abs(r["mean_normalized"] - sum(r["normalized"].values()) / 2) < 1e-9
    assert result["training"]["cached"] is False
    # The README block is rendered from the JSON: two tables of one line per row, then the variants.
    from benchmarks.quality_real_report import markdown_table

    table = markdown_table(result)
    assert table.count("\n| ") == 2 * len(result["rows"]) + 2
    # One line per new variant (ACTMat trim, SVC on each method it plugs into): a verdict or "absent".
    assert sum(line.startswith("- ") for line in table.splitlines()) == len(result["variants"])
    assert proc.stdout.startswith(table.splitlines()[0])
    # Base and experts sit in the cache, marked complete, for the next run to reuse.
    assert all((Path(p) / "complete.json").exists() for p in result["training"]["experts"].values())


def test_variant_verdicts() -> None:
    from benchmarks.quality_real_report import variant_lines

    def row(label: str, mean: float) -> dict[str, object]:
        return {"label": label, "mean_normalized": mean}

    result = {
        "rows": [row("ACTMat", 0.84), row("ACTMat (trim 0.5)", 0.86), row("TA", 0.71), row("TA + SVC", 0.70)],
        "variants": {"ACTMat (trim 0.5)": "ACTMat", "TA + SVC": "TA", "SVC on X": "absent: no svc_x"},
    }
    assert variant_lines(result) == [
        "- ACTMat (trim 0.5) beats ACTMat: 86.0 vs 84.0 mean normalized accuracy.",
        "- TA + SVC does not beat TA: 70.0 vs 71.0 mean normalized accuracy.",
        "- SVC on X: absent: no svc_x.",
    ]
