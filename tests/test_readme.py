"""The README as issue 23 wants it: for users, under 200 lines, its one results table generated from the logs (the
copy between its markers equals paper_figures/nvidia-h200/training-speedup.md, which tests/test_bench_figures.py
checks against experiments/logs/), and every file it links to present."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _tool():
    path = ROOT / "experiments" / "tools" / "readme_results.py"
    spec = importlib.util.spec_from_file_location("readme_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_under_200_lines():
    assert len(README.splitlines()) < 200


def test_results_table_is_the_generated_one():
    tool = _tool()
    table = tool.generated()
    assert "| mode | L | flash_tt_attn ms | flex ms | vs flex |" in table
    assert tool.embedded(README) == table, "run experiments/tools/readme_results.py after the figures command"


def test_results_table_is_the_h200_training_spec():
    results = README[README.index("## Results"):README.index("## Usage")]
    assert "NVIDIA H200" in results and "`57951b3`" in results and "experiments/training.yaml" in results
    assert "paper_figures/README.md" in results  # the H100 results, linked


def test_readme_shows_the_two_seed_figures():
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", README)
    assert figures == [f"paper_figures/nvidia-h100-80gb-hbm3/fused-attention-batch4-head8-d32-fwd-{kind}.png"
                       for kind in ("latency", "memory")]


def test_every_relative_link_exists():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    missing = [link for link in links if not link.startswith("http") and not (ROOT / link).exists()]
    assert not missing, missing


def test_known_limits_are_one_line_each():
    limits = README[README.index("## Known limits"):].split("\n## ", 1)[0]
    items = [line for line in limits.splitlines()[1:] if line.strip()]
    assert items and all(line.startswith("- ") for line in items), items


def test_cite_matches_citation_cff():
    cff = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    title = re.search(r'^title: "(.+)"', cff, re.M).group(1)
    author = re.search(r'- name: "(.+)"', cff).group(1)
    year, month = re.search(r'^date-released: "(\d{4})-(\d{2})', cff, re.M).groups()
    bibtex = re.search(r"```bibtex\n(.*?)```", README, re.S).group(1)
    assert f"title = {{{title}}}" in bibtex and f"author = {{{author}}}" in bibtex
    assert f"year = {{{year}}}" in bibtex and f"month = {{{int(month)}}}" in bibtex
