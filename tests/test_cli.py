"""CLI: parser, train/segment/register/evaluate from the command line, NIfTI outputs, errors."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _synth import LABEL_VALUES, tiny_overrides, tiny_run, write_dataset
from deepatlas_fast.cli import COMMANDS, main
from deepatlas_fast.data.io import load_header, load_nifti, save_nifti
from deepatlas_fast.errors import DeepAtlasWarning


def test_help_lists_every_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "deepatlas_fast.cli", "--help"], capture_output=True, cwd=tmp_path,
                         text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out
    for name in ("train", "evaluate", "segment", "register"):
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0


def test_segment_and_register_keep_affine_and_label_values(tmp_path_factory, tmp_path):
    dl, run = tiny_run(tmp_path_factory.getbasetemp())
    data = Path(dl).parent
    # a non-trivial affine on the input must come back unchanged
    img, aff = load_nifti(data / "img0.nii.gz")
    aff = aff.copy()
    aff[:3, 3] = [-10.0, 5.0, 3.5]
    save_nifti(tmp_path / "in.nii.gz", img, aff)
    assert main(["segment", "--run", str(run), str(tmp_path / "in.nii.gz"), "-o", str(tmp_path / "s.nii.gz")]) == 0
    seg, saff = load_nifti(tmp_path / "s.nii.gz", label=True)
    assert np.allclose(saff, aff) and seg.shape == img.shape and set(np.unique(seg)) <= set(LABEL_VALUES)

    args = ["register", "--run", str(run), str(data / "img0.nii.gz"), str(data / "img1.nii.gz"),
            "-o", str(tmp_path / "w.nii.gz"), "--labels", str(data / "seg0.nii.gz"),
            "--labels-out", str(tmp_path / "wl.nii.gz"), "--disp-out", str(tmp_path / "d.nii.gz")]
    assert main(args) == 0
    w, waff = load_nifti(tmp_path / "w.nii.gz")
    wl, _ = load_nifti(tmp_path / "wl.nii.gz", label=True)
    d = np.asarray(nib.load(str(tmp_path / "d.nii.gz")).dataobj)
    tshape, taff, _ = load_header(data / "img1.nii.gz")
    assert w.shape == wl.shape == tshape and d.shape == (*tshape, 3) and np.allclose(waff, taff)
    assert set(np.unique(wl)) <= set(LABEL_VALUES) and 100 in np.unique(wl)
    # the warped image is the moving image resampled by the written displacement
    import torch
    from deepatlas_fast import warp
    mov = load_nifti(data / "img0.nii.gz")[0]
    again = warp(torch.from_numpy(mov)[None, None], torch.from_numpy(np.moveaxis(d, -1, 0))[None])[0, 0].numpy()
    assert np.allclose(again, w, atol=1e-3)


def test_cli_train_then_evaluate(tmp_path):
    dl = write_dataset(tmp_path / "data", shape=(16, 16, 16))
    sets = [a for s in tiny_overrides(seg=1, reg=1, da=0) for a in ("--set", s)]
    assert main(["train", "--data", str(dl), "--out", str(tmp_path / "run"), "--no-progress"] + sets) == 0
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--no-progress", "--no-figures",
                 "--structures", "7,42"]) == 0
    assert (tmp_path / "run" / "eval" / "test" / "summary.json").is_file()


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["segment", "--run", str(tmp_path / "nothing"), "x.nii.gz", "-o", "y.nii.gz"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "no checkpoint" in err and "Traceback" not in err
    assert main(["train", "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "r")]) == 2
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "r"), "--stage", "nope"])


def test_warnings_are_one_line(tmp_path_factory, tmp_path, capsys):
    """Images at twice the training voxel size: the API warns (DeepAtlasWarning), the CLI shows
    it as one line."""
    from deepatlas_fast.inference.run import load_run
    dl, run = tiny_run(tmp_path_factory.getbasetemp())
    data = Path(dl).parent
    for name in ("img0", "img1"):
        img, aff = load_nifti(data / f"{name}.nii.gz")
        aff = aff.copy()
        aff[:3, :3] *= 2
        save_nifti(tmp_path / f"{name}.nii.gz", img, aff)
    args = [str(tmp_path / "img0.nii.gz"), str(tmp_path / "img1.nii.gz"), str(tmp_path / "w.nii.gz")]
    with pytest.warns(DeepAtlasWarning, match="voxel size"):
        load_run(run).register_file(*args)
    capsys.readouterr()
    assert main(["register", "--run", str(run), *args[:2], "-o", args[2]]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith("deepatlas-fast register: warning: ") and "voxel size" in lines[0]


def test_register_refuses_mismatched_grids(tmp_path_factory, tmp_path):
    dl, run = tiny_run(tmp_path_factory.getbasetemp())
    data = Path(dl).parent
    img, aff = load_nifti(data / "img1.nii.gz")
    save_nifti(tmp_path / "small.nii.gz", img[:20], aff)
    rc = main(["register", "--run", str(run), str(data / "img0.nii.gz"), str(tmp_path / "small.nii.gz"),
               "-o", str(tmp_path / "w.nii.gz")])
    assert rc == 2


def test_segment_resamples_an_image_of_another_voxel_size(tmp_path_factory, tmp_path, capsys):
    """An image at twice the training voxel size is segmented on the training grid (the net sees
    the resampled image) and labelled on its own grid, with its own affine."""
    from deepatlas_fast.inference.run import load_run
    dl, run_dir = tiny_run(tmp_path_factory.getbasetemp())
    run = load_run(run_dir)
    img, aff = load_nifti(Path(dl).parent / "img0.nii.gz")
    small, small_aff = img[::2, ::2, ::2], aff.copy()
    small_aff[:3, :3] *= 2
    save_nifti(tmp_path / "small.nii.gz", small, small_aff)
    seen, forward = [], run.seg_net.forward
    run.seg_net.forward = lambda x: (seen.append(tuple(x.shape[2:])), forward(x))[1]

    run.segment_file(tmp_path / "small.nii.gz", tmp_path / "s.nii.gz")
    seg, saff = load_nifti(tmp_path / "s.nii.gz", label=True)
    assert seg.shape == small.shape and np.allclose(saff, small_aff)
    assert set(np.unique(seg)) <= set(LABEL_VALUES)
    work = run.prep.training_grid(small.shape, 2 * np.asarray(run.prep.spacing))
    assert all(abs(a - b) <= 1 for a, b in zip(work, img.shape))
    assert seen == [run.prep.net_shape(work)]
    assert "resampled" in capsys.readouterr().err
    # at the training voxel size nothing is resampled: the same labels as without a spacing
    seen.clear()
    assert np.array_equal(run.segment(img, spacing=run.prep.spacing), run.segment(img))
    assert seen == [run.prep.net_shape(img.shape)] * 2


def test_register_refine_round_trip_and_bad_input(tmp_path_factory, tmp_path, capsys):
    """--refine keeps the target's affine and the label values, changes F_R's field, and bad
    requests (N < 0, with --onnx, labels on another affine) fail with one line and write nothing."""
    from deepatlas_fast.inference.run import load_run
    dl, run = tiny_run(tmp_path_factory.getbasetemp())
    data = Path(dl).parent
    base = [str(data / "img0.nii.gz"), str(data / "img1.nii.gz")]
    labs = ["--labels", str(data / "seg0.nii.gz")]
    assert main(["register", "--run", str(run), *base, "-o", str(tmp_path / "w.nii.gz"), *labs,
                 "--labels-out", str(tmp_path / "wl.nii.gz"), "--refine", "3"]) == 0
    wl, waff = load_nifti(tmp_path / "wl.nii.gz", label=True)
    tshape, taff, _ = load_header(data / "img1.nii.gz")
    assert wl.shape == tshape and np.allclose(waff, taff) and set(np.unique(wl)) <= set(LABEL_VALUES)
    model = load_run(run)
    mov, tgt = load_nifti(data / "img0.nii.gz")[0], load_nifti(data / "img1.nii.gz")[0]
    plain, refined = model.register(mov, tgt)["disp"], model.register(mov, tgt, refine=3)["disp"]
    assert not np.allclose(plain, refined) and np.isfinite(refined).all()
    assert np.array_equal(refined, model.register(mov, tgt, refine=3)["disp"])  # deterministic

    capsys.readouterr()
    assert main(["register", "--run", str(run), *base, "-o", str(tmp_path / "a.nii.gz"), "--refine", "-1"]) == 2
    assert "refine.iterations must be an integer >= 0" in capsys.readouterr().err
    assert main(["register", "--onnx", str(tmp_path), *base, "-o", str(tmp_path / "a.nii.gz"), "--refine", "2"]) == 2
    assert "--refine needs gradients" in capsys.readouterr().err
    seg, aff = load_nifti(data / "seg0.nii.gz", label=True)
    aff = aff.copy()
    aff[:3, 3] += 7.0
    save_nifti(tmp_path / "moved_seg.nii.gz", seg.astype(np.int16), aff)
    assert main(["register", "--run", str(run), *base, "-o", str(tmp_path / "a.nii.gz"), "--labels",
                 str(tmp_path / "moved_seg.nii.gz"), "--labels-out", str(tmp_path / "al.nii.gz")]) == 2
    assert "not on the grid of the moving image" in capsys.readouterr().err
    assert not (tmp_path / "a.nii.gz").exists() and not (tmp_path / "al.nii.gz").exists()


@pytest.mark.parametrize("bad", [["--max-pairs", "-1"], ["--structures", "0"], ["--structures", ""],
                                 ["--structures", "2,0"]])
def test_evaluate_refuses_bad_counts_and_structures_before_any_work(tmp_path, capsys, bad):
    assert main(["evaluate", "--run", str(tmp_path / "no_run"), *bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("--max-pairs" in err or "--structures" in err)


def test_outputs_are_checked_before_any_work(tmp_path_factory, tmp_path, capsys):
    """-o naming an input, a folder, another output, a non-NIfTI name or an unwritable place:
    one line, exit 2, and every input byte-identical afterwards."""
    import os
    dl, run = tiny_run(tmp_path_factory.getbasetemp())
    data = Path(dl).parent
    for k in (0, 1):
        for kind in ("img", "seg"):
            (tmp_path / f"{kind}{k}.nii.gz").write_bytes((data / f"{kind}{k}.nii.gz").read_bytes())
    img0, img1, seg0 = (str(tmp_path / n) for n in ("img0.nii.gz", "img1.nii.gz", "seg0.nii.gz"))
    before = {p: Path(p).read_bytes() for p in (img0, img1, seg0)}
    (tmp_path / "folder.nii.gz").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = [
        (["segment", "--run", str(run), img0, "-o", img0], "is the input IMAGE"),
        (["segment", "--run", str(run), img0, "-o", str(tmp_path / "folder.nii.gz")], "is a folder"),
        (["segment", "--run", str(run), img0, "-o", str(tmp_path / "out.png")], "must end with .nii"),
        (["segment", "--run", str(run), img0, "-o", str(tmp_path / "afile" / "x.nii.gz")], "is a file, not a folder"),
        (["register", "--run", str(run), img0, img1, "-o", img1], "is the input TARGET"),
        (["register", "--run", str(run), img0, img1, "-o", str(tmp_path / "w.nii.gz"), "--labels", seg0,
          "--labels-out", seg0], "is the input --labels"),
        (["register", "--run", str(run), img0, img1, "-o", str(tmp_path / "w.nii.gz"), "--disp-out",
          str(tmp_path / "w.nii.gz")], "both name"),
        (["prealign", img0, img1, "-o", img0, "--quiet"], "is the input MOVING"),
        (["prealign", img0, img1, "-o", str(tmp_path / "p.nii.gz"), "--labels", seg0, "--labels-out",
          str(tmp_path / "p.nii.gz"), "--quiet"], "both name"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        cases.append((["segment", "--run", str(run), img0, "-o", str(ro / "x.nii.gz")], "permission denied"))
    capsys.readouterr()
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (argv, err)
    assert all(Path(p).read_bytes() == b for p, b in before.items())
    assert not (tmp_path / "w.nii.gz").exists() and not (tmp_path / "p.nii.gz").exists()


def test_refine_settings_from_the_command_line(tmp_path_factory, tmp_path, capsys):
    """--set refine.KEY=VALUE changes the refinement of evaluate / register / segment --atlas; any
    other key, a bad value or --set without --refine is one line before work."""
    dl, run = tiny_run(tmp_path_factory.getbasetemp())
    data = Path(dl).parent
    out = tmp_path / "ev"
    assert main(["evaluate", "--run", str(run), "--data", str(dl), "--split", "training", "--max-pairs", "1",
                 "--refine", "2", "--set", "refine.lambda_r=0.5", "--set", "refine.levels=[2, 1]",
                 "--out", str(out), "--no-figures", "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["refine"]["lambda_r"] == 0.5 and s["refine"]["levels"] == [2, 1] and s["refine"]["iterations"] == 2
    base = ["register", "--run", str(run), str(data / "img0.nii.gz"), str(data / "img1.nii.gz"),
            "-o", str(tmp_path / "w.nii.gz")]
    capsys.readouterr()
    for extra, msg in ((["--set", "refine.lambda_r=1"], "give --refine N too"),
                       (["--refine", "2", "--set", "train.lr=1"], "only refine.* settings"),
                       (["--refine", "2", "--set", "refine.window=4"], "refine.window must be odd"),
                       (["--refine", "2", "--set", "refine.bogus=1"], "unknown config key 'refine.bogus'")):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "w.nii.gz").exists()
