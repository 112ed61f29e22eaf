"""``python -m deepatlas_fast.cli``: the ``deepatlas-fast`` command."""
import sys

from . import main

sys.exit(main())
