"""Export a trained run to ONNX: ``seg.onnx`` and ``reg.onnx`` in standard ONNX ops only.

    from deepatlas_fast.deploy import export_run
    export_run("runs/brain", "runs/brain/onnx")            # warp as GridSample (opset 20)
    export_run("runs/brain", "onnx_gather", warp="gather")  # warp as Gather-based trilinear sampling

Models (float32, dynamic batch and spatial axes; spatial sizes must be multiples of the net's
stride, which ``Preprocessing`` pads to; inputs are network inputs, i.e. preprocessed images):

- ``seg.onnx``: image [B, 1, D, H, W] -> logits [B, C, D, H, W], labels [B, 1, D, H, W] (int64
  class indices, argmax of the logits; ``label_values`` metadata maps them to original values).
- ``reg.onnx``: moving, target [B, 1, D, H, W] -> disp [B, 3, D, H, W] (voxels, channels d, h, w),
  warped [B, 1, D, H, W] (moving sampled at x + disp(x), trilinear, zeros outside).

Each file is self-contained (weights inside, no external data) and carries ``metadata_props``:
``deepatlas_fast.format``, ``.version``, ``.model`` (seg | reg), ``.preprocessing`` (the run's
``preprocessing.json``: label table, intensity percentiles, downsampling, pad multiple, training
spacing and grid), ``.label_values``, ``.normalisation``, ``.spacing``, ``.net`` (network config),
``.warp`` (gridsample | gather), ``.source`` (checkpoint) and ``.export_id`` (shared by the two
files of one export, so deploy can refuse a mixed pair). ``checksums.json`` beside them holds
the sha256 of both files: deploy refuses a model whose weights or metadata were edited.

Exporter: torch.export-based (``torch.onnx.export(dynamo=True)``), the default and maintained path
of torch >= 2.9; the TorchScript exporter also works (``register_custom_op_symbolic``) but is
deprecated and warns that it will be removed. The C++ warp op is traced through its fake kernel
(ops/warp.py) and translated by ``custom_translation_table`` into one of the two onnxscript
functions below, so the models need no custom domain:

- ``gridsample``: ONNX GridSample (opset 20 accepts 5-D input) on identity + disp normalised by the
  image's sizes with align_corners=1, exactly the op's definition. ORT's CPU EP and its CUDA EP
  (>= 1.26, float32) run it.
- ``gather``: trilinear / nearest sampling from Floor, GatherElements and the 8 corner weights,
  in voxel coordinates, for runtimes without 5-D GridSample (TensorRT, older ORT, web runtimes).
"""
from __future__ import annotations

import json
import logging
import uuid
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import DeepAtlasError
from .. import __version__

FORMAT = "2"  # 2: checksums.json beside the models
OPSET = 20
WARP_IMPLS = ("gridsample", "gather")
META = "deepatlas_fast."
CHECKSUMS = "checksums.json"  # sha256 of seg.onnx and reg.onnx: an edited model or metadata is refused


def file_sha256(path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# the warp op as standard ONNX ops (onnxscript, traced: plain Python builds the graph)
def _identity_plus(op, disp):
    """disp [B, 3, D, H, W] + the voxel grid (d, h, w) -> sampling locations, float32.

    The grid comes from int64 Ranges cast to float: onnxruntime refuses a float Range whose limit
    is computed from a shape."""
    shape = op.Shape(disp, start=2, end=5)
    axes = []
    for k, view in enumerate(([-1, 1, 1], [1, -1, 1], [1, 1, -1])):
        n = op.Gather(shape, op.Constant(value_int=k), axis=0)
        r = op.Cast(op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1)), to=1)
        axes.append(op.Unsqueeze(op.Expand(op.Reshape(r, op.Constant(value_ints=view)), shape),
                                 op.Constant(value_ints=[0])))
    return op.Add(disp, op.Concat(*axes, axis=0))


def _warp_gridsample(image, disp, mode: str = "linear", padding: str = "zeros"):
    from onnxscript import opset20 as op
    loc = _identity_plus(op, disp)
    # normalise by the image's sizes (align_corners=True: -1 and 1 are the centres of the corner
    # voxels); max(size - 1, 1) keeps a size-1 axis finite (grid_sample maps it to index 0 anyway)
    size = op.Cast(op.Shape(image, start=2, end=5), to=1)
    one = op.Constant(value_float=1.0)
    scale = op.Div(op.Constant(value_float=2.0), op.Max(op.Sub(size, one), one))
    norm = op.Sub(op.Mul(loc, op.Reshape(scale, op.Constant(value_ints=[1, 3, 1, 1, 1]))), one)
    # channels (d, h, w) -> GridSample's last axis (x, y, z) = (w, h, d)
    grid = op.Transpose(op.Gather(norm, op.Constant(value_ints=[2, 1, 0]), axis=1), perm=[0, 2, 3, 4, 1])
    return op.GridSample(image, grid, align_corners=1, mode=mode, padding_mode=padding)


def _warp_gather(image, disp, mode: str = "linear", padding: str = "zeros"):
    """Same result as GridSample, from gathers: per axis the corner indices (clamped into the
    volume) and weights (zeroed for corners outside with zeros padding), then the weighted sum of
    the 8 (linear) or 1 (nearest) gathered corners. Mirrors csrc/warp/warp_math.h."""
    from onnxscript import opset20 as op
    loc = _identity_plus(op, disp)
    size_i = op.Shape(image, start=2, end=5)
    zero_f, one_f = op.Constant(value_float=0.0), op.Constant(value_float=1.0)
    zero_i = op.Constant(value_int=0)

    corners = []  # per axis: list of (index [B, 1, M] int64, weight [B, 1, M] float)
    for k in range(3):
        x = op.Reshape(op.Gather(loc, op.Constant(value_ints=[k]), axis=1), op.Constant(value_ints=[0, 1, -1]))
        n = op.Gather(size_i, op.Constant(value_int=k), axis=0)
        hi_i = op.Sub(n, op.Constant(value_int=1))
        hi_f = op.Cast(hi_i, to=1)
        # border: clip the coordinate into the volume; zeros: clamp to [-2, n + 1], which changes
        # nothing (all corners are outside there) but keeps the int cast defined
        x = op.Clip(x, zero_f, hi_f) if padding == "border" else \
            op.Clip(x, op.Constant(value_float=-2.0), op.Add(hi_f, op.Constant(value_float=2.0)))
        if mode == "nearest":
            i0 = op.Round(x)  # half to even, as the op
            taps = [(i0, None)]
        else:
            i0 = op.Floor(x)
            w1 = op.Sub(x, i0)
            taps = [(i0, op.Sub(one_f, w1)), (op.Add(i0, one_f), w1)]
        axis = []
        for idx_f, w in taps:
            idx = op.Cast(idx_f, to=7)
            inside = op.And(op.GreaterOrEqual(idx, zero_i), op.LessOrEqual(idx, hi_i))
            if padding == "zeros":
                mask = op.Cast(inside, to=1)
                w = mask if w is None else op.Mul(w, mask)
            axis.append((op.Clip(idx, zero_i, hi_i), w))
        corners.append(axis)

    size_h = op.Gather(size_i, op.Constant(value_int=1), axis=0)
    size_w = op.Gather(size_i, op.Constant(value_int=2), axis=0)
    flat = op.Reshape(image, op.Concat(op.Shape(image, start=0, end=2), op.Constant(value_ints=[-1]), axis=0))
    gather_shape = op.Concat(op.Shape(image, start=0, end=2), op.Shape(corners[0][0][0], start=2, end=3), axis=0)
    out = None
    for iz, wz in corners[0]:
        for iy, wy in corners[1]:
            for ix, wx in corners[2]:
                lin = op.Add(op.Mul(op.Add(op.Mul(iz, size_h), iy), size_w), ix)
                v = op.GatherElements(flat, op.Expand(lin, gather_shape), axis=2)
                ws = [w for w in (wz, wy, wx) if w is not None]
                if ws:
                    wt = ws[0]
                    for w in ws[1:]:
                        wt = op.Mul(wt, w)
                    v = op.Mul(v, wt)
                out = v if out is None else op.Add(out, v)
    return op.Reshape(out, op.Concat(op.Shape(image, start=0, end=2), op.Shape(disp, start=2, end=5), axis=0))


_WARP_FUNCS = {"gridsample": _warp_gridsample, "gather": _warp_gather}


# ---------------------------------------------------------------------------------------------
class SegGraph(nn.Module):
    """What seg.onnx computes: logits and their argmax."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, image):
        logits = self.net(image)
        return logits, logits.argmax(1, keepdim=True)


class RegGraph(nn.Module):
    """What reg.onnx computes: the displacement and the moving image warped by it."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, moving, target):
        from ..ops import warp
        disp = self.net(moving, target)
        return disp, warp(moving, disp)


def _spatial_dims(multiple: int, batch):
    from torch.export import Dim
    d, h, w = (Dim(n, min=1) for n in ("d", "h", "w"))
    # sizes must be multiples of the U-Net's stride: export with that constraint, so the graph is
    # valid for every such size (the dim names in the model, e.g. "16*d", say so)
    return {0: batch, 2: multiple * d, 3: multiple * h, 4: multiple * w}


def export_module(module: nn.Module, example: tuple, path, *, input_names, output_names, multiple: int,
                  warp: str = "gridsample", metadata: dict | None = None):
    """Export ``module`` (eval mode, float32) to the single file ``path`` and check it. -> ModelProto."""
    import onnx
    from torch.export import Dim

    if warp not in WARP_IMPLS:
        raise DeepAtlasError(f"warp must be one of {WARP_IMPLS}, got {warp!r}")
    batch = Dim("batch", min=1, max=4096)
    dims = _spatial_dims(multiple, batch)
    table = {torch.ops.deepatlas_fast.warp.default: _WARP_FUNCS[warp]}
    module = module.eval()
    # distinct tensors: torch.export treats one tensor passed twice as a single aliased input
    example = tuple(t.clone() for t in example)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" notes, irrelevant here
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            program = torch.onnx.export(module, example, dynamo=True, opset_version=OPSET, input_names=list(input_names),
                                        output_names=list(output_names), dynamic_shapes={n: dims for n in input_names},
                                        custom_translation_table=table, external_data=False, verbose=False)
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    proto.producer_name, proto.producer_version = "deepatlas_fast", __version__
    for k, v in (metadata or {}).items():
        proto.metadata_props.add(key=META + k, value=v if isinstance(v, str) else json.dumps(v))
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    return proto


def export_run(run_dir, out_dir, *, warp: str = "gridsample", checkpoint=None) -> dict:
    """Export the nets of a run (latest checkpoint, or ``checkpoint``) -> {"seg": path, "reg": path}."""
    from ..inference.run import load_run
    if warp not in WARP_IMPLS:
        raise DeepAtlasError(f"--warp must be one of {WARP_IMPLS}, got {warp!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DeepAtlasError(f"{out_dir} is a file: the export writes a folder (seg.onnx, reg.onnx, {CHECKSUMS})")
    run = load_run(run_dir, checkpoint=checkpoint)
    for net in (run.seg_net, run.reg_net):  # the exported graph has no memory formats
        net.use_channels_last(False)
    prep = run.prep
    meta = {"format": FORMAT, "version": __version__, "preprocessing": prep.to_dict(),
            "label_values": list(prep.label_values),
            "normalisation": {"percentiles": list(prep.percentiles), "range": [0.0, 1.0]},
            "spacing": None if prep.spacing is None else list(prep.spacing),
            "net": run.config["model"], "warp": warp, "source": run.source, "export_id": uuid.uuid4().hex}
    # example sizes: 2 batch items and 2 strides per axis, so no dim is specialised to 0 or 1
    def example(net):
        return torch.rand(2, 1, *(2 * net.multiple,) * 3)

    paths = {"seg": out_dir / "seg.onnx", "reg": out_dir / "reg.onnx"}
    export_module(SegGraph(run.seg_net), (example(run.seg_net),), paths["seg"], input_names=["image"],
                  output_names=["logits", "labels"], multiple=run.seg_net.multiple, warp=warp,
                  metadata={**meta, "model": "seg"})
    export_module(RegGraph(run.reg_net), (example(run.reg_net), example(run.reg_net)), paths["reg"],
                  input_names=["moving", "target"], output_names=["disp", "warped"],
                  multiple=run.reg_net.multiple, warp=warp, metadata={**meta, "model": "reg"})
    sums = {p.name: file_sha256(p) for p in paths.values()}
    (out_dir / CHECKSUMS).write_text(json.dumps({"export_id": meta["export_id"], "sha256": sums}, indent=2) + "\n")
    return paths
