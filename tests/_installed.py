"""For tests that start Python subprocesses: PKG_ROOT, the directory holding the package this
test run imported (the installed one in CI). Subprocesses put it on PYTHONPATH and run outside
the source tree, whose deepatlas_fast has no compiled extension there."""
from pathlib import Path

import deepatlas_fast

PKG_ROOT = str(Path(deepatlas_fast.__file__).resolve().parents[1])
