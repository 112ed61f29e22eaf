"""deepatlas-fast register --run RUN_DIR MOVING TARGET -o WARPED [--labels L --labels-out LO] [--disp-out D]"""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--run", required=True, help="run directory (latest checkpoint is used)")
    p.add_argument("moving", help="moving image (.nii / .nii.gz), on the target's grid (pre-aligned)")
    p.add_argument("target", help="target image")
    p.add_argument("-o", "--output", required=True, help="warped moving image (target affine)")
    p.add_argument("--labels", help="label map of the moving image, to warp along")
    p.add_argument("--labels-out", help="warped moving labels (original label values)")
    p.add_argument("--disp-out", help="displacement field, shape (D, H, W, 3), voxels, i/j/k order")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    from ..api import load_run
    if (args.labels is None) != (args.labels_out is None):
        raise ValueError("--labels and --labels-out go together")
    load_run(args.run, device=args.device).register_file(args.moving, args.target, args.output, labels=args.labels,
                                                         labels_out=args.labels_out, disp_out=args.disp_out)
    print(f"wrote {args.output}" + (f", {args.labels_out}" if args.labels_out else "")
          + (f", {args.disp_out}" if args.disp_out else ""))
    return 0
