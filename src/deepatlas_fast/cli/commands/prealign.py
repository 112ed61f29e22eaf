"""`deepatlas-fast prealign`: affine pre-alignment of a NIfTI image (and its labels) to a reference."""
from __future__ import annotations

import argparse
import sys

from ..paths import check_outputs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("moving", help="moving image (.nii / .nii.gz)")
    p.add_argument("reference", help="reference image; outputs use its grid and affine")
    p.add_argument("-o", "--out", required=True, help="warped moving image")
    p.add_argument("--labels", help="label map on the moving grid, carried with nearest sampling")
    p.add_argument("--labels-out", help="warped label map (required with --labels)")
    p.add_argument("--reference-labels", help="label map on the reference grid: adds a Dice term")
    p.add_argument("--dice-weight", type=float, default=1.0, help="weight of (1 - Dice) (default 1)")
    p.add_argument("--similarity", choices=("lncc", "mse"), default="lncc", help="image term (default lncc)")
    p.add_argument("--levels", type=int, nargs="+", default=[4, 2, 1], help="downsampling factors, coarse to fine")
    p.add_argument("--iterations", type=int, nargs="+", default=[100, 50, 50], help="Adam steps per level")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate at the coarsest level")
    p.add_argument("--init", choices=("moments", "center", "identity", "header"), default="moments",
                   help="start: match foreground moments (default), centroids only, voxel identity, or NIfTI headers")
    p.add_argument("--matrix-out", help="text file for the 4x4 reference-world -> moving-world matrix (mm)")
    p.add_argument("--quiet", action="store_true", help="no per-level loss output")


def run(args: argparse.Namespace) -> int:
    from ...data.prealign import prealign_files
    if args.labels and not args.labels_out:
        print("deepatlas-fast prealign: --labels needs --labels-out", file=sys.stderr)
        return 2
    check_outputs({"MOVING": args.moving, "REFERENCE": args.reference, "--labels": args.labels,
                   "--reference-labels": args.reference_labels},
                  {"-o": args.out, "--labels-out": args.labels_out, "--matrix-out": args.matrix_out},
                  nifti=("-o", "--labels-out"))
    res = prealign_files(args.moving, args.reference, args.out, labels=args.labels,
                         labels_out=args.labels_out, reference_labels=args.reference_labels,
                         matrix_out=args.matrix_out, similarity=args.similarity,
                         dice_weight=args.dice_weight, levels=args.levels, iterations=args.iterations,
                         lr=args.lr, init=args.init, verbose=not args.quiet)
    if not args.quiet:
        print(f"wrote {args.out}" + (f" and {args.labels_out}" if args.labels_out else ""))
        print("reference-world -> moving-world matrix:")
        print("\n".join("  " + " ".join(f"{v:10.5f}" for v in row) for row in res.world_matrix))
    return 0

