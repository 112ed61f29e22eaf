"""deepatlas-fast evaluate --run RUN_DIR [--data LIST.json] [--split test] [--out DIR] [--refine N] [--atlas [DATALIST]]"""
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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="refine.KEY=VALUE",
                   help="with --refine: change a refinement setting of the run config, e.g. --set refine.lambda_r=1")
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="also score F_R's fields refined for N iterations per level (test-time optimisation)")
    p.add_argument("--atlas", nargs="?", const="run", metavar="DATALIST",
                   help="also score atlas segmentations (atlas copied, registered, fused, fused with F_S) from "
                        "the labelled training images of DATALIST (default: of the run's data)")
    p.add_argument("--weighting", choices=("mean", "lncc"), default="mean", help="atlas fusion weights (default mean)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    import json
    from pathlib import Path

    from ...inference.evaluation import evaluate
    from ...data.io import LabelTable
    from .segment import atlas_pairs
    if args.max_pairs < 0:
        raise DeepAtlasError(f"--max-pairs must be >= 0, got {args.max_pairs}")
    if args.refine < 0:
        raise DeepAtlasError(f"--refine must be >= 0, got {args.refine}")
    if args.overrides and not args.refine:
        raise DeepAtlasError("--set changes refinement settings: give --refine N too")
    atlases = None
    if args.atlas is not None:
        atlases = [{"image": str(i), "label": str(lab)} for i, lab in atlas_pairs(args.atlas, args.run)]
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
                 max_pairs=args.max_pairs, atlases=atlases, refine=args.refine, refine_overrides=args.overrides, weighting=args.weighting,
                 figures=not args.no_figures, progress=not args.no_progress)
    keys = ("seg", "reg", "unregistered", "reg_refined", "atlas_copy", "atlas_reg", "atlas_fused", "net_atlas")
    short = {k: (None if s[k] is None else {kk: vv for kk, vv in s[k].items() if kk != "per_structure"})
             for k in keys if k in s}
    print(json.dumps({"split": s["split"], **short}, indent=2))
    return 0
