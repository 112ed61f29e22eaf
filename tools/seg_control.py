"""Control for the demo's segmentation gain: more supervised training alone, no anatomy loss.

    python tools/seg_control.py --preset long --init DEMO_OUT/runs/seg --steps 100 --out CONTROL_DIR

Trains F_S further with stage "seg" (supervised on the one labelled image) from a demo run's
segmentation baseline, with the preset's settings (lr 1e-3, as Semi-DA uses) and as many F_S
steps as Semi-DA (seg) takes (the long preset: 100; the demo: 50), then prints the test-split
segmentation Dice (mean and spread over the test images). If this stays at the baseline while
Semi-DA/DA rise, their gain comes from the anatomy loss, not from the extra steps.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from deepatlas_fast.cli.demo import PRESETS, _data
from deepatlas_fast.inference.evaluation import evaluate
from deepatlas_fast.training.trainer import train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["full", "long"], required=True, help="the demo preset INIT comes from")
    p.add_argument("--init", required=True, help="the demo run's segmentation baseline (DEMO_OUT/runs/seg)")
    p.add_argument("--steps", type=int, required=True, help="F_S steps (Semi-DA (seg) of the preset)")
    p.add_argument("--out", required=True, help="new run directory")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    data = _data(None, None)
    run = train(None, data, args.out, stage="seg", init=args.init, progress=False,
                overrides=preset["overrides"] + [f"train.steps.seg={args.steps}"])
    out = Path(args.out) / "eval"
    evaluate(run, data, split="test", out_dir=out, max_pairs=1, figures=False, progress=False)
    with open(out / "dice_seg.csv") as f:
        vals = [float(r["mean"]) for r in csv.DictReader(f) if r["mean"]]
    print(json.dumps({"preset": args.preset, "steps": args.steps, "mean": round(float(np.mean(vals)), 3),
                      "std": round(float(np.std(vals)), 3), "n": len(vals)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
