"""deepatlas-fast register (--run RUN_DIR | --onnx ONNX_DIR) MOVING TARGET -o WARPED [--labels L --labels-out LO]
[--disp-out D] [--refine N [--no-net]]"""
from __future__ import annotations

from ...errors import DeepAtlasError
from ..paths import check_outputs


def add_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (latest checkpoint is used)")
    src.add_argument("--onnx", help="directory written by `deepatlas-fast export` (runs in ONNX Runtime)")
    p.add_argument("moving", help="moving image (.nii / .nii.gz), on the target's grid (pre-aligned)")
    p.add_argument("target", help="target image")
    p.add_argument("-o", "--output", required=True, help="warped moving image (target affine)")
    p.add_argument("--labels", help="label map of the moving image, to warp along")
    p.add_argument("--labels-out", help="warped moving labels (original label values)")
    p.add_argument("--disp-out", help="displacement field, shape (D, H, W, 3), voxels, i/j/k order")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="refine.KEY=VALUE",
                   help="with --refine: change a refinement setting of the run config, e.g. --set refine.lambda_r=1")
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="refine F_R's field for N Adam iterations per level (test-time optimisation; "
                        "PyTorch runs only, the run config's refine section gives the other settings)")
    p.add_argument("--no-net", action="store_true",
                   help="with --refine: start the refinement from zero instead of F_R's field (pure optimisation)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", help="PyTorch device (default cpu); with --onnx: auto (CUDA EP if available, "
                                    "else CPU), cpu, cuda or cuda:N")


def run(args) -> int:
    if (args.labels is None) != (args.labels_out is None):
        raise DeepAtlasError("--labels and --labels-out go together")
    if args.overrides and not args.refine:
        raise DeepAtlasError("--set changes refinement settings: give --refine N too")
    if args.no_net and not args.refine:
        raise DeepAtlasError("--no-net needs --refine N (N > 0): without F_R the field comes from the refinement")
    if args.onnx is not None and args.refine:
        raise DeepAtlasError("--refine needs gradients, which an ONNX model does not give: use --run")
    check_outputs({"MOVING": args.moving, "TARGET": args.target, "--labels": args.labels},
                  {"-o": args.output, "--labels-out": args.labels_out, "--disp-out": args.disp_out},
                  nifti=("-o", "--labels-out", "--disp-out"))
    if args.onnx is not None:
        from ...deploy.runtime import load_onnx
        model = load_onnx(args.onnx, device=args.device)
        where = f" (onnxruntime, {model.providers[0]})"
    else:
        from ...inference.run import load_run
        model, where = load_run(args.run, device=args.device or "cpu"), ""
    model.register_file(args.moving, args.target, args.output, labels=args.labels,
                        labels_out=args.labels_out, disp_out=args.disp_out,
                        refine=model.refine_settings(args.refine, args.overrides),
                        net=not args.no_net, progress=not args.no_progress and args.refine > 0)
    print(f"wrote {args.output}" + (f", {args.labels_out}" if args.labels_out else "")
          + (f", {args.disp_out}" if args.disp_out else "") + where)
    return 0
