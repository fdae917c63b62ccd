"""Command line: ``python -m flash_tt_attn.bench {run,figures,validate} ...`` (run from the repository root).

    python -m flash_tt_attn.bench run seed-fwd alphafold        # spec ids or paths; resumes
    python -m flash_tt_attn.bench run smoke --dry-run            # list points, todo / done
    python -m flash_tt_attn.bench run long-inference --only B=2   # only the points with B = 2
    python -m flash_tt_attn.bench figures                        # logs -> paper_figures/
    python -m flash_tt_attn.bench validate                       # check every experiments/*.yaml
    python -m flash_tt_attn.bench checks passed gpu_tests        # did this suite pass at this commit here?
"""

from __future__ import annotations

import argparse
import sys

from .spec import SpecError, all_spec_paths, load_spec, resolve_spec

# The modules of the `bench` extra (pyproject.toml), by import name: without one, the command says so in one line.
BENCH_EXTRA_MODULES = ("yaml", "pandas", "seaborn", "matplotlib", "tqdm")
MISSING_EXTRA = ("error: python -m flash_tt_attn.bench needs the `bench` extra ({module} is not installed): "
                 "pip install 'flash-tt-attn[bench]', or pip install '.[bench]' in a checkout")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m flash_tt_attn.bench", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--specs", default="experiments", help="folder of spec files (default: experiments)")
    common.add_argument("--logs", default="experiments/logs", help="folder of raw logs (default: experiments/logs)")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="measure the points of specs that the log does not hold yet")
    run.add_argument("spec", nargs="+", help="spec id (experiments/<id>.yaml) or path")
    run.add_argument("--dry-run", action="store_true", help="list the points (todo/done); measure nothing")
    run.add_argument("--force", action="store_true", help="measure every point again (rows are appended)")
    run.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    run.add_argument("--only", action="append", metavar="FIELD=VALUE[,VALUE...]",
                     help="measure only the points whose FIELD is one of the VALUEs (repeatable: all must match), "
                          "e.g. --only B=2 --only L=1024,2048")

    fig = sub.add_parser("figures", parents=[common], help="regenerate tables, figures and their README from the logs")
    fig.add_argument("--out", default="paper_figures", help="output folder (default: paper_figures)")

    val = sub.add_parser("validate", parents=[common], help="validate specs (default: all) and count their points")
    val.add_argument("spec", nargs="*", help="spec ids or paths")

    chk = sub.add_parser("checks", parents=[common],
                         help="test suites passed per commit and GPU (<logs>/<gpu>/checks.jsonl): ask or record")
    chk.add_argument("action", choices=("passed", "record"),
                     help="passed: print 'passed' or 'not passed' at this commit; record: append a passing row")
    chk.add_argument("name", help="suite name, e.g. gpu_tests")
    return ap


def main(argv=None) -> int:
    """Entry point; returns the process exit code (2 for an invalid spec)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            from .runner import run_specs  # noqa: PLC0415

            try:
                run_specs(args.spec, args.specs, args.logs, args.device, args.force, args.dry_run, only=args.only)
            except ValueError as e:  # a bad --only
                print(f"error: {e}", file=sys.stderr)
                return 2
        elif args.command == "figures":
            from .build import build  # noqa: PLC0415

            for path in build(args.specs, args.logs, args.out):
                print(path)
        elif args.command == "checks":
            from . import checks  # noqa: PLC0415

            if args.action == "record":
                print(checks.record(args.name, args.logs))
            else:
                print("passed" if checks.passed(args.name, args.logs) else "not passed")
        else:
            paths = [resolve_spec(s, args.specs) for s in args.spec] or all_spec_paths(args.specs)
            for path in paths:
                spec = load_spec(path)
                print(f"{spec.id}: {len(spec.points())} points, {len(spec.figures)} figures, "
                      f"{len(spec.tables)} tables")
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        module = (e.name or "").partition(".")[0]
        if module not in BENCH_EXTRA_MODULES:
            raise
        print(MISSING_EXTRA.format(module=module), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
