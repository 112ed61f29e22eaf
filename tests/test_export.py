"""ONNX export: the warp as standard ONNX ops (GridSample or gathers), parity of ONNX Runtime with
PyTorch on random and real inputs at several shapes, metadata, single-file models, errors."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from _onnx import exported_run
from deepatlas_fast import __version__, warp
from deepatlas_fast.inference.run import load_run
from deepatlas_fast.deploy.export import RegGraph, SegGraph, export_module, export_run
from deepatlas_fast.data.io import load_nifti
from deepatlas_fast.nn.nets import RegNet, SegNet

DATA = Path(__file__).parent / "data"
COMBOS = [(m, p) for m in ("linear", "nearest") for p in ("zeros", "border")]


def _ort_model(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _domains(path):
    return {n.domain for n in onnx.load(str(path)).graph.node}


class AllWarps(torch.nn.Module):
    """Every mode x padding of the warp in one graph (one export per implementation)."""

    def forward(self, image, disp):
        return tuple(warp(image, disp, mode=m, padding=p) for m, p in COMBOS)


@pytest.mark.parametrize("impl", ["gridsample", "gather"])
def test_warp_exports_as_standard_onnx_ops(tmp_path, impl):
    path = tmp_path / "warp.onnx"
    export_module(AllWarps(), (torch.rand(2, 2, 8, 8, 8), torch.rand(2, 3, 8, 8, 8)), path,
                  input_names=["image", "disp"], output_names=[f"{m}_{p}" for m, p in COMBOS], multiple=4, warp=impl)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert _domains(path) <= {"", "ai.onnx"}, "the warp must not need a custom domain"
    assert ("GridSample" in ops) == (impl == "gridsample") and ("GatherElements" in ops) == (impl == "gather")
    sess = _ort_model(path)
    # dynamic batch and grids; the displacement grid may differ from the image's (output takes it)
    for ishape, dshape in [((1, 2, 12, 16, 20), (12, 16, 20)), ((3, 2, 8, 12, 16), (16, 8, 12))]:
        image = torch.rand(ishape)
        disp = torch.randn(ishape[0], 3, *dshape) * 5  # many samples fall outside: both paddings matter
        outs = sess.run(None, {"image": image.numpy(), "disp": disp.numpy()})
        for (m, p), out in zip(COMBOS, outs):
            ref = warp(image, disp, mode=m, padding=p).numpy()
            assert out.shape == ref.shape
            if m == "linear":
                assert np.abs(out - ref).max() <= 1e-5, (m, p)
            else:  # random continuous coordinates: no ties, the same voxel is picked
                assert np.array_equal(out, ref), (m, p)


def _real(name):
    """A real OASIS T1 (4 mm, 40x48x56) scaled to [0, 1] like the network inputs."""
    from deepatlas_fast.data.preprocess import normalise
    return normalise(load_nifti(DATA / name)[0])


def _big_flow(net, std):
    with torch.no_grad():  # the trained-from-init head gives ~0 displacement: make it several voxels
        net.flow.weight.normal_(0, std)
    return net.eval()


def test_reg_parity_random_nets_and_shapes_gather(tmp_path):
    # (the GridSample export of RegNet is checked by the diffeomorphic and the real-brain tests)
    net = _big_flow(RegNet((4, 8, 8), (8, 8, 8, 4)), 0.5)
    path = tmp_path / "reg.onnx"
    export_module(RegGraph(net), (torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)), path,
                  input_names=["moving", "target"], output_names=["disp", "warped"], multiple=net.multiple, warp="gather")
    sess = _ort_model(path)
    real = [torch.from_numpy(_real(f"oasis_{s}_T1_4mm.nii.gz"))[None, None] for s in "ab"]
    for m, t in [(torch.rand(1, 1, 16, 20, 24), torch.rand(1, 1, 16, 20, 24)),
                 (torch.rand(2, 1, 28, 8, 12), torch.rand(2, 1, 28, 8, 12)), real]:
        with torch.no_grad():
            disp = net(m, t)
        assert disp.abs().max() > 2, "test needs displacements of several voxels"
        d, w = sess.run(None, {"moving": m.numpy(), "target": t.numpy()})
        assert np.abs(d - disp.numpy()).max() <= 1e-4
        assert np.abs(w - warp(m, disp).numpy()).max() <= 1e-4


def test_diffeomorphic_reg_parity(tmp_path):
    # scaling and squaring: the warp op inside the net, padding "border", image = the field itself
    net = _big_flow(RegNet((4, 8, 8), (8, 8, 8, 4), diffeomorphic=True, int_steps=3), 0.5)
    path = tmp_path / "reg.onnx"
    export_module(RegGraph(net), (torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)), path,
                  input_names=["moving", "target"], output_names=["disp", "warped"], multiple=net.multiple)
    m, t = torch.rand(1, 1, 20, 16, 12), torch.rand(1, 1, 20, 16, 12)
    with torch.no_grad():
        disp = net(m, t)
    assert disp.abs().max() > 1
    d, w = _ort_model(path).run(None, {"moving": m.numpy(), "target": t.numpy()})
    assert np.abs(d - disp.numpy()).max() <= 1e-4 and np.abs(w - warp(m, disp).numpy()).max() <= 1e-4


def _assert_same_labels(logits, labels, ref_logits):
    """Identical argmax except where the two best reference logits tie (within 1e-4)."""
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4
    assert clear.mean() > 0.99
    assert np.array_equal(labels[:, 0][clear], ref_logits.argmax(1)[clear])
    assert np.array_equal(labels[:, 0], logits.argmax(1))


def test_seg_parity_random_nets_and_shapes(tmp_path):
    # InstanceNorm + trilinear upsampling here; the default BatchNorm + transposed convs are in the
    # exported run of the real-brain test
    net = SegNet(5, (4, 8, 8), norm="instance", upsample="trilinear").eval()
    path = tmp_path / "seg.onnx"
    export_module(SegGraph(net), (torch.rand(2, 1, 8, 8, 8),), path, input_names=["image"],
                  output_names=["logits", "labels"], multiple=net.multiple)
    sess = _ort_model(path)
    for shape in [(1, 1, 16, 24, 8), (3, 1, 8, 12, 20)]:
        x = torch.rand(shape)
        with torch.no_grad():
            ref = net(x).numpy()
        logits, labels = sess.run(None, {"image": x.numpy()})
        assert labels.dtype == np.int64 and labels.shape == (shape[0], 1, *shape[2:])
        assert np.abs(logits - ref).max() <= 1e-4
        _assert_same_labels(logits, labels, ref)


def test_export_run_files_metadata_and_real_brain_parity(tmp_path_factory):
    dl, run_dir, out = exported_run(tmp_path_factory.getbasetemp())
    assert sorted(p.name for p in out.iterdir()) == ["checksums.json", "reg.onnx", "seg.onnx"], \
        "single-file models, no external data"
    from deepatlas_fast.deploy.export import file_sha256
    import hashlib
    sums = json.loads((out / "checksums.json").read_text())["sha256"]
    assert sums == {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in ("seg.onnx", "reg.onnx")}
    assert file_sha256(out / "seg.onnx") == sums["seg.onnx"]
    run = load_run(run_dir)
    metas = {}
    for kind in ("seg", "reg"):
        model = onnx.load(str(out / f"{kind}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == 20 and _domains(out / f"{kind}.onnx") <= {"", "ai.onnx"}
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["deepatlas_fast.model"] == kind and meta["deepatlas_fast.version"] == __version__
        assert json.loads(meta["deepatlas_fast.preprocessing"]) == run.prep.to_dict()
        assert json.loads(meta["deepatlas_fast.label_values"]) == [0, 7, 42, 100]
        assert json.loads(meta["deepatlas_fast.spacing"]) == [2.0, 2.0, 2.0]
        # batch and spatial axes are symbolic
        dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert dims[0] and all(dims[2:]) and not dims[1]
        metas[kind] = meta
    assert metas["seg"]["deepatlas_fast.export_id"] == metas["reg"]["deepatlas_fast.export_id"]

    # real OASIS T1 volumes (4 mm, 40x48x56) through the run's preprocessing
    mov = run.prep.image(load_nifti(DATA / "oasis_a_T1_4mm.nii.gz")[0])
    tgt = run.prep.image(load_nifti(DATA / "oasis_b_T1_4mm.nii.gz")[0])
    with torch.no_grad():
        disp = run.reg_net(mov, tgt)
        ref_logits = run.seg_net(mov).numpy()
    assert disp.abs().max() > 0.5
    d, w = _ort_model(out / "reg.onnx").run(None, {"moving": mov.numpy(), "target": tgt.numpy()})
    assert np.abs(d - disp.numpy()).max() <= 1e-4 and np.abs(w - warp(mov, disp).numpy()).max() <= 1e-4
    logits, labels = _ort_model(out / "seg.onnx").run(None, {"image": mov.numpy()})
    assert np.abs(logits - ref_logits).max() <= 1e-4
    _assert_same_labels(logits, labels, ref_logits)


def test_export_errors(tmp_path, tmp_path_factory):
    _, run_dir, _ = exported_run(tmp_path_factory.getbasetemp())
    with pytest.raises(ValueError, match="warp must be one of"):
        export_run(run_dir, tmp_path / "x", warp="bilinear")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_run(tmp_path, tmp_path / "x")
    assert not (tmp_path / "x").exists()
