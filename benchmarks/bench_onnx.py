"""ONNX Runtime vs PyTorch eager: the segmentation net and registration net + warp, CPU.

    python -m benchmarks --only onnx [--repeat 5] [--json out.json]
    python -m benchmarks.bench_onnx [--repeat 5] [--threads N]

Runs at the demo grid (2 mm, 80x96x112) and at 1 mm (160x192x224) in one run (``--shape`` of the
runner is not used). Nets have the default widths (``config.DEFAULTS``) and random weights (time
does not depend on their values); the demo label table has 28 classes. The same computation on
both sides: seg = logits + argmax (``export.SegGraph``), reg = displacement + the moving image
warped by it (``export.RegGraph``), batch 1, float32, inference mode. ORT gets as many intra-op
threads as torch. Median of ``--repeat`` rounds, the cases of one grid interleaved in each round
(see ``common.interleaved_times``). Time only (no peak memory): the models are exported once, in this
process.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import common

SHAPES = {"2 mm demo": (80, 96, 112), "1 mm": (160, 192, 224)}
NUM_CLASSES = 28  # background + the demo's 27 structures


def _nets():
    from deepatlas_fast.training.config import DEFAULTS
    from deepatlas_fast.nn.nets import build_nets
    torch.manual_seed(0)
    reg, seg = build_nets(DEFAULTS["model"], NUM_CLASSES)
    return reg.eval(), seg.eval()


def _export(reg, seg, out: Path) -> dict:
    from deepatlas_fast.deploy.export import RegGraph, SegGraph, export_module
    paths = {"seg": out / "seg.onnx", "reg_gridsample": out / "reg.onnx", "reg_gather": out / "reg_gather.onnx"}
    ex = lambda n: torch.rand(2, 1, *(2 * n.multiple,) * 3)  # noqa: E731
    export_module(SegGraph(seg), (ex(seg),), paths["seg"], input_names=["image"], output_names=["logits", "labels"],
                  multiple=seg.multiple)
    for impl in ("gridsample", "gather"):
        export_module(RegGraph(reg), (ex(reg), ex(reg)), paths[f"reg_{impl}"], input_names=["moving", "target"],
                      output_names=["disp", "warped"], multiple=reg.multiple, warp=impl)
    return paths


def _ort_model(path, threads):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def cases(shape, reg, seg, paths, threads) -> dict:
    """{case name: fn} for one grid; fn() runs one inference."""
    from deepatlas_fast.deploy.export import RegGraph, SegGraph
    g = torch.Generator().manual_seed(0)
    m, t = torch.rand(1, 1, *shape, generator=g), torch.rand(1, 1, *shape, generator=g)
    seg_g, reg_g = SegGraph(seg), RegGraph(reg)
    feeds = {"seg": {"image": m.numpy()}, "reg": {"moving": m.numpy(), "target": t.numpy()}}

    def eager(module, *args):
        def run():
            with torch.inference_mode():
                module(*args)
        return run

    def ort_run(path, feed):
        sess = _ort_model(path, threads)
        return lambda: sess.run(None, feed)

    return {
        "seg: PyTorch eager": eager(seg_g, m),
        "seg: ONNX Runtime": ort_run(paths["seg"], feeds["seg"]),
        "reg+warp: PyTorch eager": eager(reg_g, m, t),
        "reg+warp: ONNX Runtime (GridSample)": ort_run(paths["reg_gridsample"], feeds["reg"]),
        "reg+warp: ONNX Runtime (Gather)": ort_run(paths["reg_gather"], feeds["reg"]),
    }


GROUPS = [
    ("seg", "seg: ONNX Runtime", ["seg: PyTorch eager"]),
    ("reg+warp", "reg+warp: ONNX Runtime (GridSample)",
     ["reg+warp: PyTorch eager", "reg+warp: ONNX Runtime (Gather)"]),
]


def main(args) -> list[dict]:
    """Entry point of ``python -m benchmarks`` (args: repeat); prints one table per grid."""
    import onnxruntime as ort
    threads = getattr(args, "threads", None) or torch.get_num_threads()
    torch.set_num_threads(threads)
    reg, seg = _nets()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print("  onnx: exporting the default nets ...", file=sys.stderr)
        paths = _export(reg, seg, Path(tmp))
        for label, shape in SHAPES.items():
            print(f"  onnx: {label} {'x'.join(map(str, shape))} ...", file=sys.stderr)
            fns = cases(shape, reg, seg, paths, threads)
            times = common.interleaved_times(fns, args.repeat)
            del fns
            by_case = {name: {"module": "bench_onnx", "case": name, "shape": list(shape), "grid": label,
                              "seconds": t, "threads": threads, "onnxruntime": ort.__version__}
                       for name, t in times.items()}
            for title, ours, others in GROUPS:
                for name in [ours, *others]:
                    by_case[name]["group"] = title
                for other in others:
                    by_case[other].setdefault("speedup_of", {})[ours] = by_case[other]["seconds"] / by_case[ours]["seconds"]
            print(f"\n### onnx: {label} ({'x'.join(map(str, shape))}, float32, batch 1, {threads} threads, "
                  f"onnxruntime {ort.__version__} CPU vs torch {torch.__version__})\n")
            print(common.format_table(list(by_case.values()), GROUPS))
            rows += by_case.values()
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_onnx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, help="threads for both torch and ORT (default: torch's)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    a = p.parse_args()
    out_rows = main(a)
    if a.json:
        common.dump_json(out_rows, a.json)
