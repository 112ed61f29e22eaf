"""deepatlas-fast segment --run RUN_DIR IMAGE.nii.gz -o OUT.nii.gz"""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--run", required=True, help="run directory (latest checkpoint is used)")
    p.add_argument("image", help="input image (.nii / .nii.gz)")
    p.add_argument("-o", "--output", required=True, help="output label map (original label values, input affine)")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    from ..api import load_run
    out = load_run(args.run, device=args.device).segment_file(args.image, args.output)
    print(f"wrote {out}")
    return 0
