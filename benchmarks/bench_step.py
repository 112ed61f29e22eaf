"""Training steps: one DeepAtlas registration step and one segmentation step, ours against the
same nets with torch/MONAI ops, with a breakdown by part.

    python -m benchmarks --only step [--repeat 5] [--no-memory]

Runs at the 2 mm demo grid (80x96x112) and at 1 mm (160x192x224) in one run (``--shape`` of the
runner is not used); at 1 mm without the two variants of our step and with at most 3 rounds. Nets of the default widths (``config.DEFAULTS``: F_R 16/32/32/32/32, F_S
8/16/32/64 with BatchNorm), the demo's 28 classes, batch 1, float32 unless a case says bf16.

- *registration step* (``Trainer.reg_step`` for a pair of labelled images, default loss
  weights): u = F_R(m, t); 1 - LNCC(m o u, t; window 9) + |grad u|^2 + soft Dice loss of the
  warped one-hot moving labels against the target's; backward; Adam step on F_R.
- *segmentation step* (``Trainer.seg_pretrain_step``): soft Dice + cross-entropy of F_S's logits
  against the labels; backward; Adam step on F_S.

Implementations: *deepatlas_fast* (the package's nets and fused ops, as training runs them);
*deepatlas_fast, plain layers* (the same with PyTorch's own convolution and batch-norm kernels,
i.e. without the slab convolutions and the channels-last batch norm of ``nn.nets``, and with
one-hot Dice targets built through an int64 one-hot: the step as the package ran it before
those);
*deepatlas_fast, bf16* (``train.precision=bf16``: autocast); *torch/MONAI* (the same nets in
PyTorch's default memory format, with VoxelMorph's grid_sample transformer, MONAI's
LocalNormalizedCrossCorrelationLoss and DiceLoss, torch's cross-entropy: what the method
costs written with those libraries). The parts are timed alone, forward and backward, on inputs
of the step's shapes.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.bench_warp import VoxelMorphTransformer

SHAPES = {"2 mm demo": (80, 96, 112), "1 mm": (160, 192, 224)}
NUM_CLASSES = 28  # background + the demo's 27 structures
WINDOW = 9
# the cases whose peak memory is measured (the whole steps; the parts are time only)
MEMORY_CASES = ("reg step: deepatlas_fast", "reg step: torch/MONAI", "seg step: deepatlas_fast",
                "seg step: torch/MONAI")


def _nets(kind: str):
    from deepatlas_fast.nn.nets import BatchNorm3d, Conv3d, build_nets
    from deepatlas_fast.training.config import DEFAULTS
    torch.manual_seed(0)
    cfg = dict(DEFAULTS["model"], channels_last=kind != "torch")
    reg, seg = build_nets(cfg, NUM_CLASSES)
    if kind in ("torch", "plain layers"):  # PyTorch's own convolution and batch-norm kernels
        for m in (*reg.modules(), *seg.modules()):
            if isinstance(m, Conv3d):
                m.slabs = False
            if isinstance(m, BatchNorm3d):
                m.rows = False
    return reg, seg


def _data(shape):
    g = torch.Generator().manual_seed(0)
    m = F.avg_pool3d(torch.rand(1, 1, *shape, generator=g), 3, 1, 1)
    t = F.avg_pool3d(torch.rand(1, 1, *shape, generator=g), 3, 1, 1)
    lm = torch.randint(0, NUM_CLASSES, (1, 1, *shape), generator=g)
    lt = torch.randint(0, NUM_CLASSES, (1, 1, *shape), generator=g)
    return m, t, lm, lt


class _Ops:
    """The loss pieces of a step, ours or torch/MONAI's."""

    def __init__(self, kind: str, shape):
        from deepatlas_fast.nn import losses
        from deepatlas_fast.ops import warp
        self.regulariser = losses.gradient_l2  # plain torch on both sides
        if kind == "torch":
            from monai.losses import DiceLoss, LocalNormalizedCrossCorrelationLoss
            self.warp = VoxelMorphTransformer(shape)
            self.similarity = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=WINDOW,
                                                                  kernel_type="rectangular")
            self.anatomy = DiceLoss()
            dice = DiceLoss(softmax=True, to_onehot_y=True)
            self.supervised = lambda logits, y: dice(logits, y) + F.cross_entropy(logits, y[:, 0])
        else:
            self.warp = warp
            self.similarity = lambda a, b: losses.lncc_loss(a, b, window=WINDOW)
            self.one_hot = lambda y: losses.one_hot(y, NUM_CLASSES)
            self.target = lambda y: y  # soft_dice reads integer labels as one-hot
            self.anatomy = losses.dice_loss
            self.supervised = losses.segmentation_loss
        if kind in ("torch", "plain layers"):  # an int64 one-hot converted, as one-hot targets
            self.one_hot = lambda y: F.one_hot(y[:, 0], NUM_CLASSES).movedim(-1, 1).float()
            self.target = self.one_hot


def _precision(kind):
    from deepatlas_fast.nn.precision import autocast
    return autocast("bf16" if kind == "bf16" else "fp32", "cpu")


def _train_step(kind: str, net, loss):
    """One step: loss() under the kind's precision, backward, Adam."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def run():
        with _precision(kind):
            value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    return run


def reg_step(kind: str, shape):
    reg, _ = _nets(kind)
    ops = _Ops(kind, shape)
    m, t, lm, lt = _data(shape)

    def loss():
        u = reg(m, t)
        return (ops.similarity(ops.warp(m, u), t) + ops.regulariser(u)
                + ops.anatomy(ops.warp(ops.one_hot(lm), u), ops.target(lt)))
    return _train_step(kind, reg, loss)


def seg_step(kind: str, shape):
    _, seg = _nets(kind)
    ops = _Ops(kind, shape)
    m, _, lm, _ = _data(shape)
    return _train_step(kind, seg, lambda: ops.supervised(seg(m), lm))


# ---- the parts of a step, each timed alone (forward + backward)

def _net_part(which: str, kind: str, shape):
    reg, seg = _nets(kind)
    m, t, _, _ = _data(shape)
    net, args = (reg, (m, t)) if which == "reg" else (seg, (m,))

    def run():
        with _precision(kind):
            out = net(*args)
        out.backward(torch.ones_like(out))
        net.zero_grad(set_to_none=True)
    return run


def _loss_part(part: str, kind: str, shape):
    ops = _Ops(kind, shape)
    m, t, lm, lt = _data(shape)
    u = common.smooth_displacement(shape).requires_grad_(True)
    if part == "warp":  # the image and the one-hot labels, gradients to u
        onehot = ops.one_hot(lm)
        fn = lambda: ops.warp(m, u).sum() + ops.warp(onehot, u).sum()  # noqa: E731
    elif part == "similarity":
        a = m.clone().requires_grad_(True)
        fn = lambda: ops.similarity(a, t)  # noqa: E731
    elif part == "anatomy Dice":
        probs = ops.one_hot(lm).requires_grad_(True)
        target = ops.target(lt)
        fn = lambda: ops.anatomy(probs, target)  # noqa: E731
    elif part == "regulariser":
        fn = lambda: ops.regulariser(u)  # noqa: E731
    elif part == "supervised Dice + CE":
        logits = torch.randn(1, NUM_CLASSES, *shape, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        fn = lambda: ops.supervised(logits, lm)  # noqa: E731
    else:
        raise ValueError(part)

    def run():
        fn().backward()
    return run


def _optimiser_part(which: str, shape):
    reg, seg = _nets("ours")
    net = reg if which == "reg" else seg
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    return opt.step


CASES = {
    "reg step: deepatlas_fast": lambda s: reg_step("ours", s),
    "reg step: torch/MONAI": lambda s: reg_step("torch", s),
    "reg step: deepatlas_fast, plain layers": lambda s: reg_step("plain layers", s),
    "reg step: deepatlas_fast, bf16": lambda s: reg_step("bf16", s),
    "seg step: deepatlas_fast": lambda s: seg_step("ours", s),
    "seg step: torch/MONAI": lambda s: seg_step("torch", s),
    "seg step: deepatlas_fast, plain layers": lambda s: seg_step("plain layers", s),
    "seg step: deepatlas_fast, bf16": lambda s: seg_step("bf16", s),
    "F_R forward+backward: deepatlas_fast": lambda s: _net_part("reg", "ours", s),
    "F_R forward+backward: torch": lambda s: _net_part("reg", "torch", s),
    "F_S forward+backward: deepatlas_fast": lambda s: _net_part("seg", "ours", s),
    "F_S forward+backward: torch": lambda s: _net_part("seg", "torch", s),
    "warp (image + one-hot labels): deepatlas_fast": lambda s: _loss_part("warp", "ours", s),
    "warp (image + one-hot labels): grid_sample": lambda s: _loss_part("warp", "torch", s),
    "similarity (LNCC): deepatlas_fast": lambda s: _loss_part("similarity", "ours", s),
    "similarity (LNCC): MONAI": lambda s: _loss_part("similarity", "torch", s),
    "anatomy Dice: deepatlas_fast": lambda s: _loss_part("anatomy Dice", "ours", s),
    "anatomy Dice: MONAI": lambda s: _loss_part("anatomy Dice", "torch", s),
    "supervised Dice + CE: deepatlas_fast": lambda s: _loss_part("supervised Dice + CE", "ours", s),
    "supervised Dice + CE: MONAI + torch": lambda s: _loss_part("supervised Dice + CE", "torch", s),
    "regulariser (gradient L2)": lambda s: _loss_part("regulariser", "ours", s),
    "optimiser (Adam, F_R)": lambda s: _optimiser_part("reg", s),
    "optimiser (Adam, F_S)": lambda s: _optimiser_part("seg", s),
}
GROUPS = [
    ("registration step", "reg step: deepatlas_fast",
     ["reg step: torch/MONAI", "reg step: deepatlas_fast, plain layers", "reg step: deepatlas_fast, bf16"]),
    ("segmentation step", "seg step: deepatlas_fast",
     ["seg step: torch/MONAI", "seg step: deepatlas_fast, plain layers", "seg step: deepatlas_fast, bf16"]),
    ("part: F_R", "F_R forward+backward: deepatlas_fast", ["F_R forward+backward: torch"]),
    ("part: F_S", "F_S forward+backward: deepatlas_fast", ["F_S forward+backward: torch"]),
    ("part: warp", "warp (image + one-hot labels): deepatlas_fast", ["warp (image + one-hot labels): grid_sample"]),
    ("part: similarity", "similarity (LNCC): deepatlas_fast", ["similarity (LNCC): MONAI"]),
    ("part: anatomy Dice", "anatomy Dice: deepatlas_fast", ["anatomy Dice: MONAI"]),
    ("part: supervised loss", "supervised Dice + CE: deepatlas_fast", ["supervised Dice + CE: MONAI + torch"]),
    ("part: regulariser", "regulariser (gradient L2)", []),
    ("part: optimiser, F_R", "optimiser (Adam, F_R)", []),
    ("part: optimiser, F_S", "optimiser (Adam, F_S)", []),
]


# At 1 mm (a step there takes tens of seconds) the variants are left out and the rounds capped.
ONLY_AT_2MM = {c for c in CASES if "plain layers" in c or "bf16" in c}
REPEAT_1MM = 3


def groups(label: str) -> list:
    if label == "2 mm demo":
        return GROUPS
    return [(t, ours, [o for o in others if o not in ONLY_AT_2MM]) for t, ours, others in GROUPS]


def main(args) -> list[dict]:
    """Entry point of ``python -m benchmarks`` (args: repeat, no_memory); one table per grid."""
    rows = []
    for label, shape in SHAPES.items():
        grid_groups = groups(label)
        repeat = args.repeat if label == "2 mm demo" else min(args.repeat, REPEAT_1MM)
        seconds = {}
        for _, ours, others in grid_groups:
            batch = [ours, *others]
            print(f"  step: {label}: {', '.join(batch)} ...", file=sys.stderr)
            fns = {name: CASES[name](shape) for name in batch}
            seconds.update(common.interleaved_times(fns, repeat))
            del fns
        by_case = {}
        for name in seconds:
            row = {"module": "bench_step", "case": name, "shape": list(shape), "grid": label,
                   "seconds": seconds[name], "threads": torch.get_num_threads()}
            if not args.no_memory and name in MEMORY_CASES:
                print(f"  step: {label}: peak memory of {name} ...", file=sys.stderr)
                peak = common.measure_peak("bench_step", name, shape)
                row["peak_extra_mib"] = peak / common.MIB
                row["peak_extra_volumes"] = peak / (4 * shape[0] * shape[1] * shape[2])
            by_case[name] = row
        for title, ours, others in grid_groups:
            by_case[ours]["group"] = title
            for other in others:
                by_case[other]["group"] = title
                by_case[other].setdefault("speedup_of", {})[ours] = by_case[other]["seconds"] / by_case[ours]["seconds"]
        print(f"\n### step: {label} ({'x'.join(map(str, shape))}, batch 1, {NUM_CLASSES} classes)\n")
        print(common.format_table(list(by_case.values()), grid_groups))
        rows += by_case.values()
    return rows
