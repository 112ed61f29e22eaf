"""deepatlas-fast demo [--quick | --long] [--out DIR]: the one-shot DeepAtlas experiment on the shipped brain set (offline)."""
from __future__ import annotations

from ...errors import DeepAtlasError


def _seeds(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise DeepAtlasError(f"--seeds: a comma-separated list of integers, got {text!r}") from None
    if not seeds:
        raise DeepAtlasError("--seeds: at least one seed")
    return seeds


def _checked_docs(paths, preset):
    """``paths`` (--update-doc), each checked before the run to hold the block the summary table
    replaces."""
    from pathlib import Path
    start, end = f"<!-- demo:{preset}:start -->", f"<!-- demo:{preset}:end -->"
    for path in paths:
        doc = Path(path).read_text()
        if start not in doc or end not in doc[doc.find(start):]:
            raise DeepAtlasError(f"--update-doc {path}: no block {start} ... {end} to replace")
    return paths


def add_arguments(p):
    p.add_argument("--out", default="deepatlas_demo", help="output folder (runs, eval, report/); default ./deepatlas_demo")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a ~2 minute pipeline check (8 mm, tiny nets, few steps)")
    g.add_argument("--long", action="store_true", help="the experiment of docs/experiment.md: more steps, three seeds")
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="split to score (the presets' settings were chosen on 'validation')")
    p.add_argument("--seeds", type=str, default=None, help="comma-separated seeds instead of the preset's")
    p.add_argument("--update-doc", action="append", default=[], metavar="FILE",
                   help="replace the <!-- demo:PRESET:start/end --> block of FILE with the summary table")
    p.add_argument("--from-results", metavar="RESULTS_JSON",
                   help="train nothing: print and write (--update-doc) the table of a finished demo's results.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, after the preset's (e.g. train.precision=bf16); "
                        "not with --update-doc")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..demo import run_demo, summary_table, update_doc_blocks
    if args.from_results:
        import json
        from pathlib import Path
        try:
            res = json.loads(Path(args.from_results).read_text())
            table = summary_table(res)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DeepAtlasError(f"--from-results {args.from_results}: not a demo results.json ({e})") from None
        update_doc_blocks(res, args.update_doc)
        print(table)
        return 0
    preset = "quick" if args.quick else "long" if args.long else "full"
    if args.set and args.update_doc:
        raise DeepAtlasError("--set changes the preset, whose tables the documents hold: not with --update-doc")
    if args.set:
        from ...training.config import load_config
        load_config(None, args.set)  # a bad key or value stops here, before any training
    res = run_demo(args.out, preset=preset, split=args.split, seeds=None if args.seeds is None else _seeds(args.seeds),
                   update_docs=_checked_docs(args.update_doc, preset), progress=not args.no_progress, overrides=args.set)
    print("\n" + summary_table(res))
    print(f"\nreport: {res['report']} ({res['total_seconds'] / 60:.1f} min)")
    return 0
