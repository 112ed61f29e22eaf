"""deepatlas-fast segment (--run RUN_DIR | --onnx ONNX_DIR) IMAGE.nii.gz -o OUT.nii.gz
[--atlas [DATALIST] [--fuse atlas|net+atlas] [--weighting mean|lncc] [--refine N]]"""
from __future__ import annotations

from ...errors import DeepAtlasError
from ..paths import check_outputs

_RUN_ATLASES = "run"  # --atlas without a datalist: the run's labelled training images


def add_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (latest checkpoint is used)")
    src.add_argument("--onnx", help="directory written by `deepatlas-fast export` (runs in ONNX Runtime)")
    p.add_argument("image", help="input image (.nii / .nii.gz)")
    p.add_argument("-o", "--output", required=True, help="output label map (original label values, input affine)")
    p.add_argument("--atlas", nargs="?", const=_RUN_ATLASES, metavar="DATALIST",
                   help="multi-atlas segmentation through F_R: the labelled training images of DATALIST (a "
                        "datalist JSON; without it, the run's own labelled training images) are registered "
                        "to the image and their labels fused; atlases must be on the image's grid")
    p.add_argument("--fuse", choices=("atlas", "net+atlas"), default="atlas",
                   help="with --atlas: the atlases alone, or averaged with F_S's probabilities (default atlas)")
    p.add_argument("--weighting", choices=("mean", "lncc"), default="mean",
                   help="with --atlas: equal atlas weights, or weighted per voxel by local NCC (default mean)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="refine.KEY=VALUE",
                   help="with --refine: change a refinement setting of the run config, e.g. --set refine.lambda_r=1")
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="with --atlas: refine each atlas's field for N iterations per level (PyTorch runs only)")
    p.add_argument("--device", help="PyTorch device (default cpu); with --onnx: auto (CUDA EP if available, "
                                    "else CPU), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true")


def atlas_pairs(spec, run_dir) -> list:
    """(image, label) paths of the atlases: labelled training images of a datalist or of the run's data."""
    from ...data.datasets import read_data
    from ...training.run_folder import read_run_info
    if spec == _RUN_ATLASES:
        if run_dir is None:
            raise DeepAtlasError("--atlas without a datalist takes the run's training images: give a datalist "
                                 "with --onnx")
        data = read_run_info(run_dir).get("data")
        if data is None:
            raise DeepAtlasError(f"{run_dir} does not record its data: give the atlases as --atlas DATALIST")
        spec = data
    pairs = [(e["image"], e["label"]) for e in read_data(spec)["training"] if e["label"] is not None]
    if not pairs:
        raise DeepAtlasError(f"--atlas: {spec} has no labelled training image to use as an atlas")
    return pairs


def run(args) -> int:
    atlas_only = [f for f, on in (("--fuse", args.fuse != "atlas"), ("--weighting", args.weighting != "mean"),
                                  ("--refine", args.refine != 0), ("--set", bool(args.overrides))) if on]
    if args.atlas is None and atlas_only:
        raise DeepAtlasError(f"{', '.join(atlas_only)} only apply with --atlas")
    if args.refine < 0:
        raise DeepAtlasError(f"--refine must be >= 0, got {args.refine}")
    if args.overrides and not args.refine:
        raise DeepAtlasError("--set changes refinement settings: give --refine N too")
    if args.onnx is not None and args.refine:
        raise DeepAtlasError("--refine needs gradients, which an ONNX model does not give: use --run")
    atlases = atlas_pairs(args.atlas, args.run) if args.atlas is not None else None
    inputs = {"IMAGE": args.image}
    for k, (image, labels) in enumerate(atlases or ()):
        inputs.update({f"atlas image {image}": image, f"atlas labels {labels}": labels})
    check_outputs(inputs, {"-o": args.output}, nifti=("-o",))
    if args.onnx is not None:
        from ...deploy.runtime import load_onnx
        model = load_onnx(args.onnx, device=args.device)
        where = f" (onnxruntime, {model.providers[0]})"
    else:
        from ...inference.run import load_run
        model, where = load_run(args.run, device=args.device or "cpu"), ""
    if atlases is None:
        out = model.segment_file(args.image, args.output)
    else:
        out = model.segment_atlas_file(args.image, args.output, atlases, fuse=args.fuse, weighting=args.weighting,
                                       refine=model.refine_settings(args.refine, args.overrides), progress=not args.no_progress)
        where += f", {len(atlases)} atlas{'es' if len(atlases) > 1 else ''}, fuse {args.fuse}"
    print(f"wrote {out}{where}")
    return 0
