"""Copy the generated results table into README.md, between its results markers.

The table is paper_figures/nvidia-h200/training-speedup.md (written by ``python -m flash_tt_attn.bench figures``
from experiments/logs/nvidia-h200/training.jsonl), less its title and source lines, whose relative links only work
from that folder. Run it after the figures command; ``--check`` only reports whether the README's copy is current
(exit 1 if not), as tests/test_readme.py does.

Usage: python experiments/tools/readme_results.py [--check] [--readme README.md]
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLE = Path("paper_figures/nvidia-h200/training-speedup.md")
BEGIN = f"<!-- results: generated from {TABLE.as_posix()} by experiments/tools/readme_results.py -->"
END = "<!-- /results -->"


def generated(root: Path = ROOT) -> str:
    """The table's lines from its caption on (the lines after the title and the "Source:" line)."""
    lines = (root / TABLE).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Source:")) + 1
    return "\n".join(lines[start:]).strip("\n") + "\n"


def embedded(readme: str) -> str:
    """What the README holds between the markers (its first and last newline dropped)."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise ValueError(f"the README needs exactly one {BEGIN!r} and one {END!r}")
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def replaced(readme: str, table: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return f"{head}{BEGIN}\n{table}{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if the README's copy is stale")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    table = generated()
    if embedded(text) == table:
        print(f"{args.readme.name}: results table up to date")
        return 0
    if args.check:
        print(f"{args.readme.name}: results table differs from {TABLE}; run experiments/tools/readme_results.py")
        return 1
    args.readme.write_text(replaced(text, table), encoding="utf-8")
    print(f"{args.readme.name}: results table rewritten from {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
