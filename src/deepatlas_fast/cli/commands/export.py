"""deepatlas-fast export --run RUN_DIR -o OUT_DIR [--warp gridsample|gather]"""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--run", required=True, help="run directory (latest checkpoint is used)")
    p.add_argument("-o", "--output", required=True, help="output directory for seg.onnx and reg.onnx")
    p.add_argument("--checkpoint", help="export this checkpoint file instead of the run's latest")
    p.add_argument("--warp", choices=("gridsample", "gather"), default="gridsample",
                   help="how the warp is written in ONNX: GridSample (ONNX opset 20, 5-D input) or "
                        "Gather-based trilinear sampling for runtimes without 5-D GridSample (default: %(default)s)")


def run(args) -> int:
    from ...deploy.export import export_run
    paths = export_run(args.run, args.output, warp=args.warp, checkpoint=args.checkpoint)
    print(f"wrote {paths['seg']}, {paths['reg']}")
    return 0
