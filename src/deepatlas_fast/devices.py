"""Device names of the configs and commands (``auto``, ``cpu``, ``cuda``, ``cuda:N``) -> torch devices,
checked: an unavailable device is an error naming what is available, not a failure deep in torch."""
from __future__ import annotations

import os

import torch

from .errors import DeepAtlasError


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (or None): CUDA device LOCAL_RANK if CUDA is available, else the CPU."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    if not isinstance(name, str) or not name.strip():
        raise DeepAtlasError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeepAtlasError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeepAtlasError(f"device {name!r}: deepatlas_fast runs on 'cpu' or 'cuda' devices")
    if not torch.cuda.is_available():
        raise DeepAtlasError(f"device {name!r}: no CUDA device is available here (torch {torch.__version__}); "
                             "use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeepAtlasError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are available")
    return dev
