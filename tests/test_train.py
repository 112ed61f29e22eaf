"""Training: run directory, stages and loss terms, exact resume, SIGKILL safety, config."""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from _synth import tiny_overrides, tiny_run, write_dataset
from deepatlas_fast.training.config import load_config
from deepatlas_fast.data.datasets import VolumeDataset, read_data
from deepatlas_fast.errors import ConfigError, DeepAtlasWarning
from deepatlas_fast.training.checkpoint import CKPT_FORMAT, latest_checkpoint, list_checkpoints, save_checkpoint
from deepatlas_fast.training.trainer import Trainer, build_preprocessing, train


def _load(p):
    return torch.load(p, map_location="cpu", weights_only=True)


def test_train_all_writes_a_complete_run_dir(tmp_path_factory):
    dl, run = tiny_run(tmp_path_factory.getbasetemp())
    for f in ("config.json", "run.json", "preprocessing.json", "metrics.jsonl", "curves.png"):
        assert (run / f).is_file(), f
    assert json.loads((run / "preprocessing.json").read_text())["label_values"] == [0, 7, 42, 100]
    assert json.loads((run / "run.json").read_text())["plan"] == ["seg", "reg", "da"]
    # checkpoint_every=2 over seg 2, reg 2, da 3 -> global 2, 4, 6, 7; the 3 newest are kept
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["ckpt-00000004.pt", "ckpt-00000006.pt", "ckpt-00000007.pt"]
    last = _load(ckpts[-1])
    assert last["completed"] == ["seg", "reg", "da"] and last["global_step"] == 7
    assert set(last["optim"]) == {"reg", "seg"} and "rng" in last
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in recs] == list(range(1, 8))
    assert [r["stage"] for r in recs] == ["seg"] * 2 + ["reg"] * 2 + ["da"] * 3
    assert "L_sp" in recs[0] and "L_i" in recs[2] and "L_r" in recs[2]
    # da with k_reg=2, k_seg=1: reg, reg, seg
    assert [("loss_seg" in r) for r in recs[4:]] == [False, False, True]


def test_existing_run_needs_resume(tmp_path_factory):
    dl, run = tiny_run(tmp_path_factory.getbasetemp())
    with pytest.raises(FileExistsError, match="--resume"):
        train(None, dl, run, overrides=tiny_overrides(), progress=False)


def _state(run):
    ck = _load(list_checkpoints(run)[-1])
    return ck


def test_resume_continues_exactly(tmp_path):
    dl = write_dataset(tmp_path / "data", shape=(16, 16, 16))
    # augmentation on: its transforms are drawn from the per-step generator, so a resumed run
    # draws the same ones (step 3 is a segmentation step, after the cut)
    ov = tiny_overrides(da=5) + ["train.checkpoint_every=1", "train.checkpoint_keep=0", "model.seg_norm=batch",
                                 "augment.enabled=true", "augment.lr_pairs=[[7,42]]", "augment.flip=0.5"]
    full = train(None, dl, tmp_path / "full", stage="da", overrides=ov, progress=False)
    # an interrupted copy: only the checkpoints up to step 2 (mid-cycle: reg, reg | seg ...)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for p in list_checkpoints(cut):
        if int(p.stem.split("-")[1]) > 2:
            p.unlink()
    train(None, None, cut, resume=True, progress=False)
    a, b = _state(full), _state(cut)
    assert a["global_step"] == b["global_step"] == 5
    for net in ("reg", "seg"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    for net in ("reg", "seg"):
        sa, sb = a["optim"][net]["state"], b["optim"][net]["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    drop_time = lambda r: {k: v for k, v in json.loads(r).items() if k != "time"}  # noqa: E731
    ma = [drop_time(r) for r in (full / "metrics.jsonl").read_text().splitlines()]
    mb = [drop_time(r) for r in (cut / "metrics.jsonl").read_text().splitlines()]
    assert ma == mb


def test_sigkill_loses_no_completed_checkpoint(tmp_path):
    dl = write_dataset(tmp_path / "data", shape=(16, 16, 16))
    run = tmp_path / "run"
    sets = tiny_overrides(reg=500) + ["train.checkpoint_every=1", "train.checkpoint_keep=0"]
    cmd = [sys.executable, "-m", "deepatlas_fast.cli", "train", "--data", str(dl), "--out", str(run),
           "--stage", "reg", "--no-progress"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while len(list_checkpoints(run)) < 4:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "training produced no checkpoints"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to clean up
        proc.wait()
        proc.stderr.close()
    before = {p.name: _load(p)["global_step"] for p in list_checkpoints(run)}
    assert len(before) >= 4 and all(int(n[5:13]) == s for n, s in before.items())
    last = max(before.values())
    train(None, None, run, resume=True, overrides=[f"train.steps.reg={last + 2}"], progress=False)
    after = {p.name: _load(p)["global_step"] for p in list_checkpoints(run)}
    assert before.items() <= after.items()  # every completed checkpoint survived, unchanged
    assert max(after.values()) == last + 2
    steps = [json.loads(r)["global_step"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == last + 2


def test_unreadable_checkpoint_is_skipped_with_a_warning(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, {"format": CKPT_FORMAT, "global_step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    (tmp_path / "checkpoints" / "ckpt-00000003.pt").write_bytes(b"cut by a crash")
    with pytest.warns(DeepAtlasWarning, match="skipping unreadable checkpoint .*ckpt-00000003.pt"):
        path, ckpt = latest_checkpoint(tmp_path)
    assert path.name == "ckpt-00000002.pt" and ckpt["global_step"] == 2


def test_a_plotting_failure_warns_and_training_goes_on(tmp_path, monkeypatch):
    from deepatlas_fast.training import figures

    def broken(*args, **kwargs):
        raise RuntimeError("no backend")

    monkeypatch.setattr(figures, "plot_curves", broken)
    tr = _trainer(tmp_path)
    tr.plan, tr.completed = ["seg"], ["seg"]
    with pytest.warns(DeepAtlasWarning, match="could not plot training curves: no backend"):
        tr.save("seg", 1, 0, {}, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000001.pt"]


def _trainer(tmp_path, overrides=()):
    dl = write_dataset(tmp_path / "data", shape=(16, 16, 16))
    cfg = load_config(None, tiny_overrides() + list(overrides))
    entries = read_data(dl)["training"]
    prep = build_preprocessing(cfg, entries, (tuple([16] * 3), None, (2.0,) * 3))
    tr = Trainer(cfg, prep, VolumeDataset(entries, prep), None, tmp_path, progress=False)
    return tr


def _only(tr, kind):
    tr.sampler.weights = {k: float(k == kind) for k in tr.sampler.weights}


def test_loss_terms_follow_pair_labels(tmp_path):
    tr = _trainer(tmp_path)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    reg, seg = tr.nets["reg"], tr.nets["seg"]
    # registration: L_a with manual labels only (stage reg), F_S standing in when allowed (da)
    _only(tr, "LL")
    assert "L_a" in tr.reg_step(reg, g(), use_seg=False)[1]
    _only(tr, "LU")
    assert "L_a" not in tr.reg_step(reg, g(), use_seg=False)[1]
    assert "L_a" in tr.reg_step(reg, g(), use_seg=True)[1]
    _only(tr, "UU")
    assert "L_a" in tr.reg_step(reg, g(), use_seg=True)[1]
    # segmentation: L_a only when exactly one image is labelled, and it trains F_S, not F_R
    _only(tr, "LL")
    assert set(tr.seg_step(seg, g())[1]) == {"L_sp"}
    for kind in ("LU", "UL"):
        _only(tr, kind)
        reg.zero_grad(set_to_none=True)
        seg.zero_grad(set_to_none=True)
        loss, logs = tr.seg_step(seg, g())
        assert set(logs) == {"L_sp", "L_a"}
        loss.backward()
        assert all(p.grad is None for p in reg.parameters())
        assert seg.head.weight.grad.abs().sum() > 0
    _only(tr, "UU")  # no F_S loss exists for two unlabelled images: such pairs are never drawn
    with pytest.raises(ValueError, match="no image pair"):
        tr.seg_step(seg, g())


def test_semi_da_freezes_the_other_net_and_init_loads_weights(tmp_path_factory):
    dl, run = tiny_run(tmp_path_factory.getbasetemp())
    src = _state(run)
    out = tmp_path_factory.mktemp("semi")
    train(None, dl, out / "r", stage="semi-da", init=run, progress=False,
          overrides=tiny_overrides() + ["train.semi_da_train=seg"])
    new = _state(out / "r")
    assert all(torch.equal(src["reg"][k], new["reg"][k]) for k in src["reg"])  # frozen
    assert not all(torch.equal(src["seg"][k], new["seg"][k]) for k in src["seg"])  # trained


def test_config_files_overrides_and_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 3e-4\n  steps: {da: 7}\nloss:\n  similarity: ncc\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.batch_size=2", "data.pairs.UU=0"])
    assert cfg["train"]["lr"] == 3e-4 and cfg["train"]["steps"]["da"] == 7 and cfg["train"]["steps"]["seg"] == 1000
    assert cfg["loss"]["similarity"] == "ncc" and cfg["train"]["batch_size"] == 2 and cfg["data"]["pairs"]["UU"] == 0
    with pytest.raises(KeyError, match="train.lrr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ValueError, match="similarity"):
        load_config(None, ["loss.similarity=mse"])
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ValueError, match="stage"):
        train(None, None, tmp_path / "x", stage="pretrain")


@pytest.mark.parametrize("override, message", [
    ("loss.window=9.5", r"loss.window must be an odd integer in \[3, 15\], got 9.5"),
    ("loss.window=9e0", "loss.window must be an odd integer"),  # YAML 1.1 reads a string: 9.0
    ("loss.window=true", "loss.window must be an odd integer"),
    ("loss.window=8", "loss.window must be an odd integer"),
    ("loss.window=1", "loss.window must be an odd integer"),
    ("loss.window=17", "loss.window must be an odd integer"),
    ("train.checkpoint_keep=-1", "train.checkpoint_keep must be an integer >= 0, got -1"),
    ("train.checkpoint_keep=2.5", "train.checkpoint_keep must be an integer >= 0"),
    ("train.val_every=-100", "train.val_every must be an integer >= 0"),
    ("train.val_every=0.5", "train.val_every must be an integer >= 0"),
    ("train.val_every=true", "train.val_every must be an integer >= 0"),
    ("train.val_pairs=-1", "train.val_pairs must be an integer >= 0"),
    ("train.val_pairs=1.5", "train.val_pairs must be an integer >= 0"),
    ("train.batch_size=true", "train.batch_size must be a positive integer"),
    ("loss.lambda_r=nan", "loss.lambda_r must be a finite number >= 0"),
    ("loss.lambda_a=.nan", "loss.lambda_a must be a finite number >= 0"),
    ("loss.lambda_a_seg=.inf", "loss.lambda_a_seg must be a finite number >= 0"),
    ("loss.lambda_sp=-.inf", "loss.lambda_sp must be a finite number >= 0"),
    ("loss.lambda_ce=inf", "loss.lambda_ce must be a finite number >= 0"),
    ("loss.anatomy_confidence=.nan", "loss.anatomy_confidence must be a finite number >= 0"),
    ("train.precision=fp16", "train.precision must be one of fp32, bf16, got 'fp16'"),
    ("train.precision=32", "train.precision must be one of fp32, bf16"),
])
def test_bad_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_zero_and_edge_values_are_valid():
    cfg = load_config(None, ["train.checkpoint_keep=0", "train.val_every=0", "train.val_pairs=0", "loss.window=15"])
    assert (cfg["train"]["checkpoint_keep"], cfg["train"]["val_every"], cfg["train"]["val_pairs"]) == (0, 0, 0)
    assert load_config(None, ["loss.window=3"])["loss"]["window"] == 3


@pytest.mark.parametrize("stage", ["seg", "reg"])
def test_bf16_training_runs_in_bf16_is_finite_and_its_loss_falls(tmp_path, stage):
    steps = 60
    tr = _trainer(tmp_path, ["train.precision=bf16", f"train.steps.{stage}={steps}", "train.checkpoint_every=1000",
                             "train.lr=3e-3"])
    _only(tr, "LL")  # registration: one kind of pair, so that the loss terms stay comparable
    net = tr.nets[stage]
    first_conv = net.enc[0][0] if stage == "reg" else net.down[0][0]
    dtypes, out_dtypes = [], []
    first_conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    net.register_forward_hook(lambda m, i, o: out_dtypes.append(o.dtype))
    tr.plan = [stage]
    tr.run_stage(stage, 0)
    assert set(dtypes) == {torch.bfloat16}  # the convolutions ran in bf16 ...
    assert set(out_dtypes) == {torch.float32}  # ... and the net's output is float32
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["L_sp" if stage == "seg" else "L_i"] for r in recs]
    assert len(losses) == steps and all(0 <= v < 10 for v in losses)
    assert sum(losses[-10:]) < 0.95 * sum(losses[:10])


def test_bf16_step_loss_matches_fp32_to_bf16_rounding(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        tr = _trainer(tmp_path / precision, [f"train.precision={precision}"])
        _only(tr, "LL")
        from deepatlas_fast.nn.precision import autocast
        with autocast(precision, "cpu"):
            losses[precision] = tr.reg_step(tr.nets["reg"], torch.Generator().manual_seed(0), use_seg=False)[1]
    for k in ("L_i", "L_r", "L_a"):
        assert losses["bf16"][k] == pytest.approx(losses["fp32"][k], rel=3e-2, abs=1e-4), k
    assert losses["bf16"] != losses["fp32"]  # bf16 did change something
