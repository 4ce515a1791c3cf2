"""The README's generated figure tables agree with the committed benchmark JSON."""

from __future__ import annotations

from benchmarks import figures


def test_readme_figures_match_their_json():
    text = figures.README.read_text()
    blocks = [m.group(2) for m in figures.BLOCK.finditer(text)]
    assert "throughput_7b-2L_h100" in blocks and "gram_methods" in blocks
    assert figures.render(text) == text, "run: python -m benchmarks.figures --write"


def test_render_replaces_a_stale_block():
    text = figures.README.read_text()
    m = next(figures.BLOCK.finditer(text))
    stale = text.replace(m.group(3), "| stale | table |\n", 1)
    assert stale != text and figures.render(stale) == text
