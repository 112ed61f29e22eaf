"""python -m benchmarks [--only warp,lncc,dice,refine,step,onnx] [--shape 160 192 224] [--repeat 5]
                        [--no-memory] [--json results.json] [--markdown docs/performance.md]

Prints one Markdown table per benchmark module, ratios measured in the same run; --markdown
also writes the complete page (method, environment, tables) that docs/performance.md is."""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

from benchmarks import common

MODULES = {"warp": "bench_warp", "lncc": "bench_lncc", "dice": "bench_dice", "refine": "bench_refine", "step": "bench_step",
           "onnx": "bench_onnx"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(MODULES), help="comma-separated: " + ", ".join(MODULES))
    p.add_argument("--shape", type=int, nargs=3, default=common.DEFAULT_SHAPE, metavar=("D", "H", "W"))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--json", help="also write all rows to this JSON file")
    p.add_argument("--markdown", metavar="PATH",
                   help="also write a complete Markdown page (method, environment, tables) to PATH")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in MODULES]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(MODULES)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape {tuple(args.shape)}, "
          f"median of {args.repeat}", file=sys.stderr)
    all_rows = []
    for w in wanted:
        module = MODULES[w]
        try:
            m = importlib.import_module(f"benchmarks.{module}")
        except ImportError as e:
            print(f"skipping {w}: {e}", file=sys.stderr)
            continue
        if hasattr(m, "main"):  # modules with their own protocol (e.g. ONNX Runtime)
            all_rows += m.main(args)
            continue
        try:
            rows = common.run_module(module, args.shape, args.repeat, not args.no_memory,
                                     progress=lambda s: print(s, file=sys.stderr))
        except ImportError as e:  # a baseline's package (MONAI) is missing
            print(f"skipping {w}: {e} (the baselines install with "
                  f"`pip install --no-build-isolation \".[bench]\"`)", file=sys.stderr)
            continue
        print(f"\n### {w} ({'x'.join(map(str, args.shape))}, float32, batch 1)\n")
        print(common.format_table(rows, m.GROUPS))
        if hasattr(m, "LEAST_BYTES"):
            roof = common.roofline(rows, m.LEAST_BYTES, m.GROUPS, args.shape, args.repeat)
            print("\nMemory roofline (same run):\n\n" + common.format_roofline(roof))
            rows += [{"module": module, "roofline": True, **e} for e in roof]
        if hasattr(m, "cuda_bandwidth"):
            bw = m.cuda_bandwidth(args.shape)
            print("\n" + m.format_bandwidth(bw))
            if bw is not None:
                rows.append({"module": module, "case": "cuda bandwidth", **bw})
        all_rows += rows
    if args.json:
        common.dump_json(all_rows, args.json)
    if args.markdown:
        env = common.environment(args.shape, args.repeat, argv, onnx="onnx" in wanted)
        ort = sorted({r["onnxruntime"] for r in all_rows if "onnxruntime" in r})
        if ort:
            env["onnxruntime"] = ", ".join(ort) + " (CPU execution provider)"
        common.write_markdown(all_rows, env, args.markdown)
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
