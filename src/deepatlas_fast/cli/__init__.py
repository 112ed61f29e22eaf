"""Command line: ``deepatlas-fast <command> ...``.

Each command is a module ``deepatlas_fast.cli.commands.<name>`` with ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs (or to build the parser),
so a new command is one module plus one entry in ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .. import __version__
from ..errors import DeepAtlasError, DeepAtlasWarning

# name -> one-line help; order is the order shown by --help
COMMANDS = {
    "train": "train the registration and segmentation nets (stages seg, reg, semi-da, da, all)",
    "evaluate": "Dice per structure, folding and figures of a trained run on a datalist split",
    "segment": "segment a NIfTI image with a trained run",
    "register": "register a moving NIfTI image to a target with a trained run",
    "prealign": "affine (12-parameter) pre-alignment of an image, and optionally its labels, to a reference",
    "export": "export a run's nets to ONNX (seg.onnx, reg.onnx) for ONNX Runtime",
    "demo": "train and evaluate DeepAtlas one-shot on the shipped brain demo set, write a report (offline)",
}


def _module(name: str):
    return importlib.import_module(f"deepatlas_fast.cli.commands.{name.replace('-', '_')}")


def build_parser(argv=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepatlas-fast", description="DeepAtlas: joint registration and segmentation")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # only the chosen command's module is imported (keeps `--help` of one command light)
    chosen = next((a for a in (argv or []) if a in COMMANDS), None)
    for name, help_ in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if chosen is None or name == chosen:
            _module(name).add_arguments(p)
    return parser


def _one_line_warnings(prog: str):
    """A warnings.showwarning that prints ``PROG: warning: message`` on one line (the category
    too, for warnings that are not the package's own)."""
    def show(message, category, filename, lineno, file=None, line=None):
        kind = "" if issubclass(category, DeepAtlasWarning) else f"{category.__name__}: "
        text = " ".join(str(message).split())
        print(f"{prog}: warning: {kind}{text}", file=sys.stderr if file is None else file)
    return show


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings(f"deepatlas-fast {args.command}")
        try:
            return int(_module(args.command).run(args) or 0)
        except (DeepAtlasError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
                IsADirectoryError) as e:
            # the user's errors (config, data, models, options, a missing optional extra such as
            # onnxruntime; paths that do not exist, already exist or cannot be written): one
            # clear line. Any other exception is a bug and keeps its traceback.
            print(f"deepatlas-fast {args.command}: error: {e}", file=sys.stderr)
            return 2

