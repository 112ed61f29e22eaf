"""Speed and memory of deepatlas_fast against what users would otherwise run.

`python -m benchmarks` prints the tables; see benchmarks/__main__.py."""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_installed_package():
    """`python -m benchmarks` run from a checkout puts the checkout first on sys.path, and its
    deepatlas_fast/ has no compiled extension after `pip install .`: import the installed
    package first. (An in-place or editable build is found either way.)"""
    if "deepatlas_fast" in sys.modules:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
    try:
        import deepatlas_fast  # noqa: F401
    except ImportError:  # not installed: the checkout's own (in-place build) is tried later
        for name in [m for m in sys.modules if m == "deepatlas_fast" or m.startswith("deepatlas_fast.")]:
            del sys.modules[name]
    finally:
        sys.path[:] = saved


_import_installed_package()
