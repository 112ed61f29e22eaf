"""deepatlas-fast evaluate --data LIST.json --run RUN_DIR [--split test] [--out DIR]"""
from __future__ import annotations

from ...errors import DeepAtlasError


def add_arguments(p):
    p.add_argument("--run", required=True, help="run directory (latest checkpoint is used)")
    p.add_argument("--data", help="datalist JSON or folder (default: the run's training data)")
    p.add_argument("--split", choices=("training", "validation", "test"),
                   help="default: test, else validation, else training")
    p.add_argument("--out", help="output folder (default: RUN_DIR/eval/SPLIT)")
    p.add_argument("--structures", help="label values to score: a text file or comma-separated list "
                                        "(default: all labels of the run)")
    p.add_argument("--max-pairs", type=int, default=20, help="registration pairs evaluated (default 20)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    import json
    from pathlib import Path

    from ...inference.evaluation import evaluate
    from ...data.io import LabelTable
    if args.max_pairs < 0:
        raise DeepAtlasError(f"--max-pairs must be >= 0, got {args.max_pairs}")
    structures = None
    if args.structures is not None:
        if Path(args.structures).is_file():
            structures = [v for v in LabelTable.from_file(args.structures).values if v]
        else:
            try:
                structures = [int(v) for v in args.structures.replace(",", " ").split()]
            except ValueError:
                raise DeepAtlasError(f"--structures: a file or a comma-separated list of label values, "
                                     f"got {args.structures!r}") from None
        if not structures or 0 in structures:
            raise DeepAtlasError(f"--structures: label values of structures, background (0) excluded, "
                                 f"got {args.structures!r}")
    s = evaluate(args.run, args.data, split=args.split, out_dir=args.out, structures=structures,
                 max_pairs=args.max_pairs, figures=not args.no_figures, progress=not args.no_progress)
    short = {k: (None if s[k] is None else {kk: vv for kk, vv in s[k].items() if kk != "per_structure"})
             for k in ("seg", "reg", "unregistered")}
    print(json.dumps({"split": s["split"], **short}, indent=2))
    return 0
