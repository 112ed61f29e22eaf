"""The package's own exception and warning types. Imports nothing of the package, so every layer
may raise them."""
from __future__ import annotations


class DeepAtlasWarning(UserWarning):
    """Something the user should know that does not stop the work: a damaged checkpoint skipped,
    a figure not written, an execution provider not used, an image at another voxel size."""
