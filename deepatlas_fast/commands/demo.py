"""deepatlas-fast demo [--quick] [--out DIR]: DeepAtlas end to end on the shipped brain set (offline)."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--out", default="deepatlas_demo", help="output folder (runs, eval, report.md); default ./deepatlas_demo")
    p.add_argument("--quick", action="store_true", help="a ~2 minute pipeline check (8 mm, tiny nets, few steps)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..demo import run_demo
    run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    return 0
