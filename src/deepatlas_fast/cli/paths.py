"""Output paths of the file commands, checked before any work: an output that would replace an
input, name a folder, repeat another output, or land where nothing can be written is refused
with one line (a run of minutes must not end in a failed or destructive write)."""
from __future__ import annotations

from pathlib import Path

from ..data.io import check_writable, is_nifti
from ..errors import DeepAtlasError


def check_outputs(inputs: dict, outputs: dict, *, nifti=()) -> None:
    """inputs, outputs: {option name: path or None}; ``nifti``: output options that must be NIfTI."""
    given_in = {name: Path(p).resolve() for name, p in inputs.items() if p is not None}
    seen = {}
    for name, p in outputs.items():
        if p is None:
            continue
        path = Path(p)
        real = path.resolve()
        for iname, ipath in given_in.items():
            if real == ipath:
                raise DeepAtlasError(f"{name} {p} is the input {iname}: it would be overwritten; choose another path")
        if real in seen:
            raise DeepAtlasError(f"{name} and {seen[real]} both name {p}; choose two paths")
        seen[real] = name
        if path.is_dir():
            raise DeepAtlasError(f"{name} {p} is a folder; give a file name")
        if name in nifti and not is_nifti(path):
            raise DeepAtlasError(f"{name} {p}: output must end with .nii or .nii.gz")
        check_writable(path, f"{name} {p}")
