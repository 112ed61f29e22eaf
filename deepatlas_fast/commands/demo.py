"""deepatlas-fast demo [--quick | --long] [--out DIR]: DeepAtlas end to end on the shipped brain set (offline)."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--out", default="deepatlas_demo", help="output folder (runs, eval, report.md); default ./deepatlas_demo")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a ~2 minute pipeline check (8 mm, tiny nets, few steps)")
    g.add_argument("--long", action="store_true",
                   help="the README table's run: the full demo's settings with ~3x the steps (2-2.5x the steps; about 24 min on a quiet 2-core CPU, estimated)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..demo import run_demo
    run_demo(args.out, quick=args.quick, long=args.long, progress=not args.no_progress)
    return 0
