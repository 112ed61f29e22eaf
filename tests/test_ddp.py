"""DDP: 2 CPU processes (torchrun, gloo) with batch 1 each train like 1 process with batch 2.

Each step draws one global batch identically on all ranks and rank r takes its slice; DDP
averages the gradients, which equals the gradient of the mean loss over the global batch. So
the weights must match the single-process run up to floating-point reduction order (InstanceNorm:
BatchNorm statistics would legitimately differ per process)."""
import os
import subprocess
import sys

import torch

from _synth import tiny_overrides, write_dataset
from deepatlas_fast.training.checkpoint import list_checkpoints
from deepatlas_fast.training.trainer import train


def test_two_process_ddp_matches_single_process(tmp_path):
    dl = write_dataset(tmp_path / "data", shape=(16, 16, 16))
    common = tiny_overrides(seg=2, reg=2, da=3) + ["model.seg_norm=instance"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "deepatlas_fast.cli", "train", "--data", str(dl), "--out", str(tmp_path / "ddp"), "--no-progress"]
    cmd += [a for s in common + ["train.batch_size=1"] for a in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    train(None, dl, tmp_path / "single", overrides=common + ["train.batch_size=2"], progress=False)

    a = torch.load(list_checkpoints(tmp_path / "ddp")[-1], weights_only=True)
    b = torch.load(list_checkpoints(tmp_path / "single")[-1], weights_only=True)
    assert a["global_step"] == b["global_step"] == 7
    init_reg = None
    for net in ("reg", "seg"):
        for k in a[net]:
            assert torch.allclose(a[net][k], b[net][k], atol=1e-5, rtol=1e-4), (net, k)
    # and training did move the weights (the comparison is not between two untouched inits)
    torch.manual_seed(0)
    from deepatlas_fast.training.config import load_config
    from deepatlas_fast.nn.nets import build_nets
    init_reg, _ = build_nets(load_config(None, common)["model"], 4)
    assert not torch.allclose(init_reg.state_dict()["flow.weight"], a["reg"]["flow.weight"])
