"""deepatlas-fast segment (--run RUN_DIR | --onnx ONNX_DIR) IMAGE.nii.gz -o OUT.nii.gz"""
from __future__ import annotations


def add_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (latest checkpoint is used)")
    src.add_argument("--onnx", help="directory written by `deepatlas-fast export` (runs in ONNX Runtime)")
    p.add_argument("image", help="input image (.nii / .nii.gz)")
    p.add_argument("-o", "--output", required=True, help="output label map (original label values, input affine)")
    p.add_argument("--device", help="PyTorch device (default cpu); with --onnx: auto (CUDA EP if available, "
                                    "else CPU), cpu, cuda or cuda:N")


def run(args) -> int:
    if args.onnx is not None:
        from ...deploy.runtime import load_onnx
        model = load_onnx(args.onnx, device=args.device)
        out = model.segment_file(args.image, args.output)
        print(f"wrote {out} (onnxruntime, {model.providers[0]})")
        return 0
    from ...inference.run import load_run
    out = load_run(args.run, device=args.device or "cpu").segment_file(args.image, args.output)
    print(f"wrote {out}")
    return 0
