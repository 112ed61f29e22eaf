"""Run exported models (``deepatlas-fast export``) with ONNX Runtime.

    from deepatlas_fast.deploy import load_onnx
    model = load_onnx("runs/brain/onnx")              # seg.onnx + reg.onnx of one export
    print(model.providers)                            # e.g. ['CPUExecutionProvider']
    model.segment_file("sub.nii.gz", "sub_seg.nii.gz")
    model.register_file("mov.nii.gz", "tgt.nii.gz", "warped.nii.gz", labels="mov_seg.nii.gz",
                        labels_out="warped_seg.nii.gz", disp_out="disp.nii.gz")

``OnnxRun`` is an ``inference.run.Run`` whose two networks run in ONNX Runtime: segment, register and
the ``*_file`` methods are the PyTorch path's own code, so pre- and post-processing are the same
by construction (``data.preprocess.Preprocessing``, rebuilt from the models' metadata): percentile
normalisation, downsampling and padding before the nets; upsampling of logits / displacement,
label values and the input affine after. The resampling of the original-resolution moving image
and labels by the upsampled displacement uses the package's warp op, as in the PyTorch path
(``reg.onnx``'s own ``warped`` output is on the network grid, for pipelines that feed it directly).

Execution providers: ``providers=None`` takes CUDA first when onnxruntime-gpu is installed and
exposes it, then CPU; ORT silently falls back to CPU when the CUDA EP cannot start (no GPU, missing
CUDA/cuDNN libraries), so ``model.providers`` reports what the models actually run on.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import DataError, DeepAtlasError, DeepAtlasWarning, MissingDependencyError
from ..inference.run import Run
from .export import CHECKSUMS, FORMAT, META, file_sha256
from ..data.preprocess import Preprocessing

# inputs and outputs each model must have (name -> channels, None = any)
_SIGNATURES = {
    "seg": ({"image": 1}, {"logits": None, "labels": 1}),
    "reg": ({"moving": 1, "target": 1}, {"disp": 3, "warped": 1}),
}
_JSON_KEYS = {"preprocessing", "label_values", "normalisation", "spacing", "net"}
_REQUIRED = {"format", "version", "model", "preprocessing", "label_values", "spacing", "net", "export_id"}


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError("deepatlas_fast.deploy.runtime needs ONNX Runtime: pip install 'deepatlas_fast[onnx]' "
                          "(CPU) or 'deepatlas_fast[onnx-gpu]' (CUDA; the two are exclusive)") from e
    return onnxruntime


def default_providers(device: str | None = None) -> list:
    """Execution providers for ``device``: None/"auto" = CUDA (if this onnxruntime has it) then CPU,
    "cpu" = CPU only, "cuda"/"cuda:N" = CUDA (device N) then CPU."""
    ort = _ort()
    available = ort.get_available_providers()
    if device in (None, "auto"):
        return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise DeepAtlasError(f"device {device!r}: this onnxruntime has no CUDAExecutionProvider (available: "
                             f"{available}); install 'deepatlas_fast[onnx-gpu]' instead of '[onnx]'")
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise DeepAtlasError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def read_metadata(model, path) -> dict:
    """deepatlas_fast metadata of an ONNX ModelProto / loaded ONNX Runtime model, JSON values decoded."""
    props = model.get_modelmeta().custom_metadata_map if hasattr(model, "get_modelmeta") else \
        {p.key: p.value for p in model.metadata_props}
    meta = {k[len(META):]: v for k, v in props.items() if k.startswith(META)}
    if "format" not in meta:
        raise DataError(f"{path}: not a deepatlas-fast model (no '{META}*' metadata); "
                         "export one with `deepatlas-fast export --run RUN_DIR -o OUT_DIR`")
    if meta["format"] != FORMAT:
        raise DataError(f"{path}: model format {meta['format']!r}, this deepatlas_fast ({__version__}) reads "
                         f"format {FORMAT!r}; re-export the run")
    missing = sorted(_REQUIRED - set(meta))
    if missing:
        raise DataError(f"{path}: metadata lacks {[META + k for k in missing]}; re-export the run")
    for k in _JSON_KEYS & set(meta):
        try:
            meta[k] = json.loads(meta[k])
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: metadata {META + k} is not valid JSON ({e})") from None
    try:
        prep = Preprocessing.from_dict(meta["preprocessing"])
    except (TypeError, ValueError, KeyError) as e:
        raise DataError(f"{path}: metadata {META}preprocessing is not valid ({e})") from None
    if not isinstance(prep.multiple, int) or prep.multiple < 1 or prep.multiple & (prep.multiple - 1):
        raise DataError(f"{path}: preprocessing multiple must be a power of 2, got {prep.multiple!r}")
    for name, value in (("spacing", prep.spacing), ("spacing", meta["spacing"])):
        if value is not None and (len(value) != 3 or not all(isinstance(s, (int, float)) and 0 < s < float("inf")
                                                           for s in value)):
            raise DataError(f"{path}: {name} must be three positive voxel sizes (mm), got {value!r}")
    if list(meta["label_values"]) != list(prep.label_values):
        raise DataError(f"{path}: label_values {meta['label_values']} differ from the preprocessing's label table "
                        f"{prep.label_values}")
    return meta


def verify_checksums(onnx_dir) -> None:
    """The models of ``onnx_dir`` are the files the export wrote (``checksums.json``)."""
    onnx_dir = Path(onnx_dir)
    path = onnx_dir / CHECKSUMS
    if not path.is_file():
        raise DataError(f"{onnx_dir}: no {CHECKSUMS} (written by `deepatlas-fast export`); re-export the run")
    try:
        sums = json.loads(path.read_text())["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a valid checksum file ({e})") from None
    for name in ("seg.onnx", "reg.onnx"):
        if name in sums and (onnx_dir / name).is_file() and file_sha256(onnx_dir / name) != sums[name]:
            raise DataError(f"{onnx_dir / name}: contents differ from the export's checksum (the model or its "
                            "metadata was edited or damaged); re-export the run")


class _OrtNet:
    """An ONNX Runtime model called like the torch net it replaces: float32 tensors in, first output out."""

    def __init__(self, runner, inputs, output):
        self.runner, self.inputs, self.output = runner, list(inputs), output

    def __call__(self, *tensors):
        feed = {n: np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32) for n, t in zip(self.inputs, tensors)}
        return torch.from_numpy(self.runner.run([self.output], feed)[0])

    def eval(self):
        return self


def _load_model(path, kind, providers):
    ort = _ort()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path} (expected {kind}.onnx written by `deepatlas-fast export`)")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # no per-node placement notes on stderr
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises its own types (InvalidProtobuf, Fail, ...) for bad files
        raise DataError(f"{path}: cannot load ONNX model ({str(e).strip().splitlines()[0][:300]})") from e
    meta = read_metadata(sess, path)
    if meta.get("model") != kind:
        raise DataError(f"{path}: this is a {meta.get('model')!r} model, expected {kind!r} "
                         f"(seg.onnx and reg.onnx swapped or renamed?)")
    want_in, want_out = _SIGNATURES[kind]
    for what, args, want in (("inputs", sess.get_inputs(), want_in), ("outputs", sess.get_outputs(), want_out)):
        got = {a.name: a for a in args}
        if set(got) != set(want):
            raise DataError(f"{path}: {what} {sorted(got)}, expected {sorted(want)}")
        for name, channels in want.items():
            shape = got[name].shape
            if len(shape) != 5 or (channels is not None and shape[1] != channels):
                raise DataError(f"{path}: {name} has shape {shape}, expected [batch, {channels or 'C'}, D, H, W]")
    return sess, meta


class OnnxRun(Run):
    """Exported seg.onnx + reg.onnx with the pre/post-processing of the run they come from."""

    def __init__(self, onnx_dir, *, device: str | None = None, providers=None):
        onnx_dir = Path(onnx_dir)
        if not onnx_dir.is_dir():
            raise FileNotFoundError(f"no such directory: {onnx_dir} (write it with `deepatlas-fast export`)")
        providers = providers or default_providers(device)
        verify_checksums(onnx_dir)
        seg, seg_meta = _load_model(onnx_dir / "seg.onnx", "seg", providers)
        reg, reg_meta = _load_model(onnx_dir / "reg.onnx", "reg", providers)
        for key in ("preprocessing", "export_id"):
            if seg_meta.get(key) != reg_meta.get(key):
                raise DataError(f"{onnx_dir}: seg.onnx and reg.onnx come from different exports ({key} differs); "
                                 "export the run again into an empty directory")
        self.prep = Preprocessing.from_dict(seg_meta["preprocessing"])
        classes = seg.get_outputs()[0].shape[1]
        if isinstance(classes, int) and classes != self.prep.num_classes:
            raise DataError(f"{onnx_dir / 'seg.onnx'}: {classes} output classes but its label table has "
                             f"{self.prep.num_classes} values {self.prep.label_values}")
        self.meta = seg_meta
        self.config = {"model": seg_meta.get("net")}
        self.device = torch.device("cpu")  # pre/post-processing; the nets run where ORT puts them
        self.seg_net = _OrtNet(seg, ["image"], "logits")
        self.reg_net = _OrtNet(reg, ["moving", "target"], "disp")
        self.runners = {"seg": seg, "reg": reg}
        self.source = str(onnx_dir)
        self.stage = self.step = self.completed = None
        if providers[0] != "CPUExecutionProvider" and self.providers[0] == "CPUExecutionProvider":
            warnings.warn(f"onnxruntime fell back to CPU (asked for {providers})", DeepAtlasWarning, stacklevel=3)

    @property
    def providers(self) -> list:
        """Execution providers the models actually use, in priority order."""
        return self.runners["seg"].get_providers()


def load_onnx(onnx_dir, *, device: str | None = None, providers=None) -> OnnxRun:
    """seg.onnx + reg.onnx of ``onnx_dir`` -> OnnxRun (see module docstring)."""
    return OnnxRun(onnx_dir, device=device, providers=providers)
