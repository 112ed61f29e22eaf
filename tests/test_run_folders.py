"""Run folders: nothing of a run is overwritten, truncated or deleted by a train that is refused
or that fails its checks; checkpoint rotation keeps the run's own checkpoints."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _synth import AFFINE, subject, tiny_overrides, write_dataset
from deepatlas_fast.cli import main
from deepatlas_fast.data.io import save_nifti
from deepatlas_fast.errors import ConfigError, DataError, DeepAtlasError, DeepAtlasWarning
from deepatlas_fast.training.checkpoint import CKPT_FORMAT, latest_checkpoint, list_checkpoints, save_checkpoint
from deepatlas_fast.training.trainer import train

RUN_FILES = ("config.json", "run.json", "preprocessing.json", "metrics.jsonl")


def _ov(**steps):
    return tiny_overrides(**{"seg": 0, "reg": 2, "semi-da": 0, "da": 0, **steps})


def _snapshot(run: Path) -> dict:
    """Every file under ``run`` -> its bytes."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), shape=(16, 16, 16))


def _train(data, run, **kw):
    kw.setdefault("overrides", _ov())
    return train(None, data, run, stage="reg", progress=False, **kw)


def _interrupted(data, run):
    """A reg run stopped after step 2 of 4 (its checkpoint of step 4 removed)."""
    _train(data, run, overrides=_ov(reg=4) + ["train.checkpoint_keep=0"])
    list_checkpoints(run)[-1].unlink()
    return run


# -- checkpoint rotation ------------------------------------------------------------------------
def test_rotation_keeps_the_new_checkpoints_over_a_stale_one(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    (d / "ckpt-00000099.pt").write_bytes(b"left by something else")
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, {"format": CKPT_FORMAT, "global_step": step}, keep=1)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert "ckpt-00000003.pt" in names and "ckpt-00000001.pt" not in names
    with pytest.warns(DeepAtlasWarning, match="ckpt-00000099.pt"):
        path, ckpt = latest_checkpoint(tmp_path)
    assert ckpt["global_step"] == 3


def test_resume_past_a_stale_checkpoint_keeps_its_own(tmp_path, data):
    run = _interrupted(data, tmp_path / "run")
    (run / "checkpoints" / "ckpt-00000099.pt").write_bytes(b"")
    with pytest.warns(DeepAtlasWarning, match="ckpt-00000099.pt"):
        _train(data, run, resume=True, overrides=["train.steps.reg=6", "train.checkpoint_keep=1"])
    with pytest.warns(DeepAtlasWarning):
        path, ckpt = latest_checkpoint(run)
    assert path.name == "ckpt-00000006.pt" and ckpt["global_step"] == 6


# -- a fresh train never reuses a non-empty folder unless told to -------------------------------
def test_fresh_train_refuses_a_folder_with_an_unreadable_checkpoint(tmp_path, data, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "ckpt-00000099.pt").write_bytes(b"cut by a crash")
    before = _snapshot(run)
    sets = [a for s in _ov() for a in ("--set", s)]
    rc = main(["train", "--data", str(data), "--out", str(run), "--stage", "reg", "--no-progress"] + sets)
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(run) == before


def test_fresh_train_refuses_a_folder_holding_run_files(tmp_path, data):
    """A run killed before its first checkpoint (or another run's files): no checkpoint, but its
    config, metrics and preprocessing must survive."""
    run = tmp_path / "run"
    run.mkdir()
    for name in RUN_FILES:
        (run / name).write_text('{"old": true}\n')
    before = _snapshot(run)
    with pytest.raises(FileExistsError, match="--overwrite"):
        _train(data, run)
    assert _snapshot(run) == before


def test_an_empty_folder_is_fine(tmp_path, data):
    (tmp_path / "run").mkdir()
    assert list_checkpoints(_train(data, tmp_path / "run"))


def test_overwrite_replaces_the_run_files_only(tmp_path, data):
    run = _train(data, tmp_path / "run", overrides=_ov(reg=4))
    (run / "eval" / "test").mkdir(parents=True)
    (run / "eval" / "test" / "summary.json").write_text("{}")
    (run / "checkpoints" / "ckpt-00000099.pt").write_bytes(b"stale")
    (run / "checkpoints" / ".ckpt-00000005.pt.tmp4242").write_bytes(b"half")
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "README").write_text("mine too")
    _train(data, run, overwrite=True)
    assert (run / "notes.txt").read_text() == "mine" and (run / "checkpoints" / "README").read_text() == "mine too"
    assert not (run / "eval").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["README", "ckpt-00000002.pt"]
    steps = [json.loads(r)["global_step"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the old run's lines are gone, not appended to
    assert json.loads((run / "config.json").read_text())["train"]["steps"]["reg"] == 2


def test_overwrite_through_the_cli_and_its_exclusions(tmp_path, data, capsys):
    run = _train(data, tmp_path / "run")
    sets = [a for s in _ov(reg=1) for a in ("--set", s)]
    base = ["train", "--data", str(data), "--out", str(run), "--stage", "reg", "--no-progress"] + sets
    assert main(base + ["--overwrite"]) == 0
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000001.pt"]
    capsys.readouterr()
    before = _snapshot(run)
    assert main(base + ["--overwrite", "--resume"]) == 2
    assert "--resume" in capsys.readouterr().err and _snapshot(run) == before
    with pytest.raises(DeepAtlasError, match="resume"):
        _train(data, run, resume=True, overwrite=True)


def test_init_from_the_run_being_overwritten(tmp_path, data):
    """--init RUN --out RUN --overwrite: the weights are read before the folder is cleared."""
    run = _train(data, tmp_path / "run")
    src = torch.load(list_checkpoints(run)[-1], weights_only=True)
    with pytest.raises(FileExistsError):
        train(None, data, run, stage="seg", init=run, progress=False, overrides=_ov(reg=0, seg=1))
    train(None, data, run, stage="seg", init=run, overwrite=True, progress=False, overrides=_ov(reg=0, seg=1))
    new = torch.load(list_checkpoints(run)[-1], weights_only=True)
    assert new["plan"] == ["seg"] and all(torch.equal(src["reg"][k], new["reg"][k]) for k in src["reg"])


# -- a refused resume leaves the run as it was --------------------------------------------------
@pytest.fixture(scope="module")
def cut_run(tmp_path_factory, data):
    """A semi-da run interrupted at step 2 of 4 (its last checkpoint removed)."""
    run = tmp_path_factory.mktemp("cut") / "run"
    ov = tiny_overrides(**{"semi-da": 4}) + ["train.checkpoint_keep=0"]
    train(None, data, run, stage="semi-da", overrides=ov, progress=False)
    list_checkpoints(run)[-1].unlink()
    return run


@pytest.mark.parametrize("override, match", [
    ("model.reg_enc=[4,8,16]", "model.reg_enc"),
    ("model.seg_norm=instance", "model.seg_norm"),
    ("data.downsample=2", "data.downsample"),
    ("train.semi_da_train=reg", "semi-da"),
    ("train.steps.semi-da=1", "train.steps.semi-da"),
    ("train.lr_schedule=cosine", "train.lr_schedule"),
])
def test_incompatible_resume_is_refused_before_anything_is_written(cut_run, override, match):
    before = _snapshot(cut_run)
    with pytest.raises(ConfigError, match=match):
        train(None, None, cut_run, resume=True, overrides=[override], progress=False)
    assert _snapshot(cut_run) == before


def test_resume_on_another_grid_is_refused(tmp_path, data, cut_run):
    before = _snapshot(cut_run)
    for name, shape, affine in (("shape", (20, 16, 16), AFFINE), ("voxels", (16, 16, 16), AFFINE * [1.5, 1.5, 1.5, 1]),
                                ("origin", (16, 16, 16), AFFINE + np.pad(np.ones((3, 1)) * 4, ((0, 1), (3, 0))))):
        root = tmp_path / name
        items = []
        for k in range(3):
            img, lab = subject(shape, seed=k)
            save_nifti(root / f"i{k}.nii.gz", img, affine)
            save_nifti(root / f"l{k}.nii.gz", lab, affine)
            items.append({"image": f"i{k}.nii.gz", "label": f"l{k}.nii.gz"})
        (root / "dl.json").write_text(json.dumps({"training": items}))
        with pytest.raises(DataError, match="grid"):
            train(None, root / "dl.json", cut_run, resume=True, progress=False)
        assert _snapshot(cut_run) == before, name


# -- leftovers and warnings ---------------------------------------------------------------------
def test_resume_removes_temp_files_of_a_killed_write(tmp_path, data):
    run = _interrupted(data, tmp_path / "run")
    stale = [run / "checkpoints" / ".ckpt-00000004.pt.tmp999999", run / ".metrics.jsonl.tmp999999"]
    for p in stale:
        p.write_bytes(b"half written")
    _train(data, run, resume=True, overrides=())
    assert not any(p.exists() for p in stale)
    assert [p.name for p in list_checkpoints(run)][-1] == "ckpt-00000004.pt"


@pytest.mark.parametrize("content, why", [
    (b"", "empty"),
    (b"cut by a crash", "not a PyTorch checkpoint file"),
    ("torch", "not a deepatlas_fast checkpoint"),
])
def test_unreadable_checkpoint_warnings_say_which_file_and_why(tmp_path, content, why):
    save_checkpoint(tmp_path, {"format": CKPT_FORMAT, "global_step": 1})
    bad = tmp_path / "checkpoints" / "ckpt-00000002.pt"
    if content == "torch":
        torch.save({"weights": torch.zeros(2)}, bad)
    else:
        bad.write_bytes(content)
    with pytest.warns(DeepAtlasWarning) as rec:
        path, _ = latest_checkpoint(tmp_path)
    assert path.name == "ckpt-00000001.pt"
    msg = str(rec[0].message)
    assert str(bad) in msg and why in msg, msg
    for jargon in ("invalid load key", "PytorchStreamReader", "Ran out of input", "central directory"):
        assert jargon not in msg, msg


@pytest.mark.parametrize("damage", ["nan", "constant", "truncated"])
def test_a_bad_unlabelled_image_fails_before_the_first_step(tmp_path, damage):
    """The seg stage never draws the unlabelled images, yet a damaged one is refused before
    training starts (and before the run folder exists), naming the file."""
    dl = write_dataset(tmp_path / "data")
    bad = tmp_path / "data" / "img3.nii.gz"  # unlabelled (k = 3, 4 of write_dataset)
    assert "label" not in json.loads(Path(dl).read_text())["training"][3]
    img = np.zeros((24, 24, 24), np.float32)
    if damage == "nan":
        img[...] = 1.0
        img[3, 4, 5] = np.nan
        save_nifti(bad, img, AFFINE)
    elif damage == "constant":
        save_nifti(bad, img + 7.0, AFFINE)
    else:
        data_bytes = bad.read_bytes()
        bad.write_bytes(data_bytes[: len(data_bytes) // 2])
    with pytest.raises(DataError, match="img3"):
        train(None, dl, tmp_path / "run", stage="seg", overrides=_ov(seg=1), progress=False)
    assert not (tmp_path / "run").exists()


def test_an_out_folder_under_a_file_is_refused_before_work(tmp_path, capsys):
    dl = write_dataset(tmp_path / "data")
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--data", str(dl), "--out", str(tmp_path / "afile" / "run"), "--stage", "seg",
                 "--set", "train.steps.seg=1"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and err.count("\n") == 1
