"""deepatlas-fast train --data LIST.json --out RUN_DIR [--stage STAGE] [--config FILE] [--resume | --overwrite]"""
from __future__ import annotations

from ...training.config import STAGES


def add_arguments(p):
    p.add_argument("--data", help="datalist JSON (MONAI format) or folder of images (+ labels/); "
                                  "optional with --resume")
    p.add_argument("--out", required=True, help="run directory (created; a new run needs it empty)")
    p.add_argument("--stage", default="all", choices=STAGES, help="all = seg -> reg -> da (default: all)")
    p.add_argument("--config", help="YAML or JSON config file (defaults: deepatlas_fast/training/config.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 --set train.steps.da=500 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a non-empty --out: first remove the run files there (config.json, "
                        "run.json, preprocessing.json, metrics.jsonl, curves.png, checkpoints, eval/); "
                        "other files are kept")
    p.add_argument("--init", metavar="RUN_DIR", help="initialise both nets from another run (e.g. pretraining)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: config 'device', auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from ...training.trainer import train
    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    try:
        out = train(args.config, args.data, args.out, stage=args.stage, resume=args.resume, overwrite=args.overwrite,
                    init=args.init, overrides=overrides, progress=not args.no_progress)
    finally:
        # under torchrun: a process group left to the interpreter's exit can abort in gloo's
        # threads (std::terminate), failing a finished run
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    print(f"run directory: {out}")
    return 0
