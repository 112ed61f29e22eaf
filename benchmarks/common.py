"""Shared benchmark machinery: timing, peak-memory measurement in a fresh process, tables.

A benchmark module (bench_*.py) defines CASES: {name: factory(shape) -> fn}, where the factory
builds the inputs and fn() runs one measured call, and GROUPS: a list of (title, ours, [others])
naming the cases whose ratio is reported, and optionally LEAST_BYTES: {our case: fn(shape) ->
bytes}, the memory traffic no implementation of that call can avoid (for the roofline table).
Time is the median of `repeat` runs after warm-up rounds, the cases of a group timed in interleaved
rounds; memory is the peak resident set added by one call, measured in a child process (so one case's
caches and allocator state cannot leak into another's).
"""
from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

DEFAULT_SHAPE = (160, 192, 224)  # the OASIS grid at 1 mm
MIB = 1 << 20
MMAP_THRESHOLD = 1 << 17  # glibc's default, made fixed in the memory child processes
# Untimed rounds before the timed ones: up to WARMUP_ROUNDS, stopping once WARMUP_SECONDS have
# passed (one round when the baselines are slow). A process's first calls, which fault in fresh
# memory, can run several times slower for a second or so; a single warm-up call would leave
# that inside the timing.
WARMUP_ROUNDS = 3
WARMUP_SECONDS = 2.0


def smooth_displacement(shape, magnitude=3.0, seed=0, batch=1) -> torch.Tensor:
    """A smooth random displacement field in voxels, like a registration net's output."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, *[max(2, s // 16) for s in shape], generator=g) * magnitude
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True).contiguous()


def forward_backward(fn, *inputs, grad=None):
    """A measured call: fn(*inputs).backward(grad), then the inputs' gradients are dropped (so
    the peak-memory measurement counts them, and each call starts without them)."""
    def run():
        fn(*inputs).backward(grad)
        for t in inputs:
            t.grad = None

    return run


def median_time(fn, repeat=5, warmup=1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_here(fn) -> int:
    """Peak RSS added by fn(), in bytes: reset the high-water mark, run, compare."""
    fn()  # warm-up: one-time allocations (thread pools, caches) are not the op's memory
    # ... but the buffers our cache keeps from the warm-up would be: without this the measured
    # call would reuse them and seem to allocate nothing.
    if "deepatlas_fast" in sys.modules:
        sys.modules["deepatlas_fast"].empty_cpu_cache()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status("VmRSS")
    fn()
    return _status("VmHWM") - base


def measure_peak(module: str, case: str, shape) -> int:
    """Runs measure_peak_here for one case in a fresh interpreter."""
    code = (
        "import sys, torch; from benchmarks import common; import importlib;"
        f"torch.set_num_threads({torch.get_num_threads()});"
        f"m = importlib.import_module('benchmarks.{module}');"
        f"fn = m.CASES[{case!r}]({tuple(shape)!r});"
        "print(common.measure_peak_here(fn))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # A fixed mmap threshold (which also turns off glibc's dynamic one): every large buffer is
    # mapped on allocation and unmapped on free, so the resident set follows the live tensors.
    # With the dynamic threshold, a buffer freed by the warm-up call may stay resident and be
    # reused, and the measured call then seems to allocate nothing.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory run of {module}:{case} failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def interleaved_times(fns: dict, repeat: int, warmup: int = WARMUP_ROUNDS) -> dict:
    """Median seconds of each fn, measured in rounds that call every fn once: the cases of a
    comparison see the same machine state (a machine's speed and the allocator's state can
    drift within a run, and a case timed alone minutes apart from another would carry that
    drift into the ratio). The warm-up is rounds of the same kind (see WARMUP_ROUNDS)."""
    start = time.perf_counter()
    for _ in range(warmup):
        for fn in fns.values():
            fn()
        if time.perf_counter() - start > WARMUP_SECONDS:
            break
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def run_module(module: str, shape, repeat: int, memory: bool, progress=print) -> list[dict]:
    """Times (and optionally measures) every case of a module; returns rows with ratios. The
    cases of one group (ours and its baselines) are timed interleaved."""
    m = importlib.import_module(f"benchmarks.{module}")
    volume = 4 * shape[0] * shape[1] * shape[2]  # one float32 volume, in bytes
    batches = [[ours, *others] for _, ours, others in m.GROUPS]
    grouped = {c for b in batches for c in b}
    batches += [[c] for c in m.CASES if c not in grouped]
    seconds = {}
    for batch in batches:
        batch = [c for c in batch if c not in seconds]
        progress(f"  {module}: {', '.join(batch)} ...")
        fns = {name: m.CASES[name](tuple(shape)) for name in batch}
        seconds.update(interleaved_times(fns, repeat))
        del fns
    rows = {}
    for name in m.CASES:
        row = {"module": module, "case": name, "shape": list(shape), "seconds": seconds[name],
               "threads": torch.get_num_threads()}
        if memory:
            progress(f"  {module}: peak memory of {name} ...")
            peak = measure_peak(module, name, shape)
            row["peak_extra_mib"] = peak / MIB
            row["peak_extra_volumes"] = peak / volume
        rows[name] = row
    for title, ours, others in m.GROUPS:
        for other in others:
            rows[other].setdefault("speedup_of", {})[ours] = rows[other]["seconds"] / rows[ours]["seconds"]
            rows[ours].setdefault("group", title)
            rows[other].setdefault("group", title)
    return list(rows.values())


def format_table(rows: list[dict], groups) -> str:
    """Markdown table: one line per case, the ratio against our case of the same group; the
    peak-memory column only when some row has a measurement."""
    memory = any("peak_extra_mib" in r for r in rows)
    lines = ["| benchmark | implementation | median time | speed-up of ours |" + (" peak extra memory |" if memory else ""),
             "|---|---|---:|---:|" + ("---:|" if memory else "")]
    by_case = {r["case"]: r for r in rows}
    for title, ours, others in groups:
        for name in [ours, *others]:
            r = by_case[name]
            ratio = "" if name == ours else f"{r['speedup_of'][ours]:.1f}x"
            line = f"| {title} | {name} | {r['seconds'] * 1e3:.1f} ms | {ratio} |"
            if memory:
                line += (f" {r['peak_extra_mib']:.0f} MiB ({r['peak_extra_volumes']:.1f} vol) |"
                         if "peak_extra_mib" in r else " |")
            lines.append(line)
    return "\n".join(lines)


def dump_json(rows, path):
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.is_available()}
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


# ---- Memory roofline: how close our cases run to the machine's memory bandwidth, and what
# speed-up over the baseline that bandwidth allows at best (a goal above it cannot be met).

def copy_seconds(nbytes: int, repeat: int) -> float:
    """Median time of a CPU copy moving nbytes (half read, half written), warm buffers."""
    src = torch.ones(nbytes // 2, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    return median_time(lambda: dst.copy_(src), repeat=repeat)


def roofline(rows: list[dict], least_bytes: dict, groups, shape, repeat: int) -> list[dict]:
    """One row per case in least_bytes: its least traffic, achieved GB/s, a copy of the same
    bytes measured now, and the largest speed-up over each baseline of its group that a
    call running at copy speed would reach."""
    by_case = {r["case"]: r for r in rows}
    out = []
    for title, ours, others in groups:
        if ours not in least_bytes:
            continue
        nbytes = int(least_bytes[ours](tuple(shape)))
        copy_s = copy_seconds(nbytes, repeat)
        ours_s = by_case[ours]["seconds"]
        out.append({"group": title, "case": ours, "least_bytes": nbytes,
                    "gbps": nbytes / ours_s / 1e9, "copy_gbps": nbytes / copy_s / 1e9,
                    "copy_seconds": copy_s,
                    "max_speedup_of": {o: by_case[o]["seconds"] / copy_s for o in others}})
    return out


def format_roofline(entries: list[dict]) -> str:
    lines = ["| benchmark | least traffic | ours | a copy of as many bytes | "
             "ours, share of copy speed | best speed-up at copy speed |",
             "|---|---:|---:|---:|---:|---|"]
    for e in entries:
        best = ", ".join(f"{x:.0f}x over {o}" for o, x in e["max_speedup_of"].items())
        lines.append(f"| {e['group']} | {e['least_bytes'] / MIB:.0f} MiB | {e['gbps']:.1f} GB/s | "
                     f"{e['copy_gbps']:.1f} GB/s ({e['copy_seconds'] * 1e3:.1f} ms) | "
                     f"{e['gbps'] / e['copy_gbps']:.0%} | {best} |")
    return "\n".join(lines)


# ---- The Markdown page of a run (python -m benchmarks --markdown PATH): method, environment,
# and the tables above, rebuilt from the rows alone (so a --json file could be rendered too).

PAGE_COMMAND = "python -m benchmarks --markdown docs/performance.md"

# module -> (heading, what is compared)
SECTIONS = {
    "bench_warp": ("Warp", "`deepatlas_fast.warp` (trilinear, zeros padding) against VoxelMorph's "
                   "`SpatialTransformer` path (identity grid + displacement, normalised, `grid_sample`, "
                   "re-written in `benchmarks/bench_warp.py`). One-channel image, a smooth random "
                   "displacement (3 voxels, varying over 16 voxels). *disp only*: the image needs no "
                   "gradient, as in registration training."),
    "bench_dice": ("Soft Dice", "`deepatlas_fast.soft_dice` (5 classes, logits with the softmax fused, "
                   "int64 labels) against MONAI's `DiceLoss(softmax=True, to_onehot_y=True)`."),
    "bench_lncc": ("LNCC", "`deepatlas_fast.lncc` (window 9, gradients to both images) against MONAI's "
                   "`LocalNormalizedCrossCorrelationLoss(kernel_type=\"rectangular\")` and VoxelMorph's "
                   "conv3d NCC (re-written in `benchmarks/bench_lncc.py`)."),
    "bench_refine": ("Refinement", "Test-time refinement (`deepatlas_fast.training.refine.refine`, one level at the full grid, 3 Adam iterations per call) against the same loop written with VoxelMorph's `grid_sample` transformer and MONAI's LNCC (re-written in `benchmarks/bench_refine.py`): 1 - LNCC(window 5) + 3 x grad-L2; *diffeomorphic*: the correction exp(v) by 7 squarings, composed with a start field."),
    "bench_step": ("Training steps", "One DeepAtlas registration step and one segmentation step (forward, "
                   "losses, backward, Adam step; default nets, 28 classes, batch 1) against the same nets "
                   "with VoxelMorph's `grid_sample` transformer, MONAI's LNCC and Dice losses and torch's "
                   "cross-entropy in PyTorch's default memory format; beside them, our step with plain layers "
                   "(PyTorch's own convolution and batch-norm kernels, one-hot Dice targets: the step "
                   "before the slab convolutions and the channels-last batch norm) and our step under bf16 "
                   "autocast (`train.precision: bf16`); then each part of a step timed alone (see "
                   "`benchmarks/bench_step.py`). Peak memory for the whole steps only."),
    "bench_onnx": ("ONNX Runtime vs PyTorch eager", "The exported models (see [deployment](deployment.md)) in "
                   "ONNX Runtime's CPU provider against the same graphs in PyTorch eager: default-width nets, "
                   "random weights, 28 classes, batch 1, inference mode, as many ORT intra-op threads as "
                   "torch threads. *seg*: logits + argmax; *reg+warp*: displacement + the moving image "
                   "warped by it, the warp as one `GridSample` or as gathers (`--warp gather`). Time only."),
}

METHOD = """\
- **Rounds.** A comparison (our case and its baselines) is timed in interleaved rounds, one call
  of each case per round; the figure is the median over `--repeat` rounds (default 5), and a
  speed-up is the baseline's median divided by ours. A machine's speed and the allocator's
  state drift within a run, and a case timed alone, minutes away from its baseline, would carry
  that drift into the ratio; ratios are therefore only compared within one run.
- **Warm-up.** Up to 3 untimed rounds first, fewer once 2 s have passed: a process's first calls,
  which fault in fresh memory, can be several times slower.
- **What a call is.** Forward: one call of the op or loss. Forward+backward:
  `fn(*inputs).backward(grad)`, after which the inputs' gradients are dropped, so every call
  allocates its gradients as a training step does. Inputs are float32, batch 1.
- **Peak extra memory.** The peak resident set added by one call, measured for each case in a
  fresh Python process after one warm-up call, with the package's CPU cache emptied before the
  measured call and glibc's mmap threshold fixed (`MALLOC_MMAP_THRESHOLD_=131072`), so that
  buffers freed by the warm-up are not silently reused; the high-water mark is reset through
  `/proc/self/clear_refs`. Given in MiB and in float32 volumes of the benchmark's shape.
- **Memory roofline.** For each of our cases with a `LEAST_BYTES` entry (warp, soft Dice), the
  least memory traffic any implementation of that call must move (e.g. the warp forward reads
  the displacement and the image and writes the output: 5 volumes; the Dice backward must read
  the logits and labels again once the whole-volume sums exist, and write the gradient). The
  table gives our achieved GB/s, the speed of a plain CPU copy of as many bytes timed in the same
  run, and the baseline's time divided by that copy time: the largest speed-up over the baseline
  that any implementation running at copy speed could reach on that machine at that moment.
  LNCC has no such row: its box sums make it compute-bound.
- **Allocation cost.** The baselines allocate several volume-sized temporaries per call; with
  glibc's defaults each large buffer is mapped afresh and page-faulted at first touch, which is
  a sizeable part of their time. Our volume-sized outputs come from the package's cache of freed
  outputs ([ops](ops.md#cpu-memory-cache)). Where allocation is cheap (e.g. glibc's
  `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` raised), the baselines get faster and
  the ratios smaller.
"""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def git_commit(root: str | None = None) -> str | None:
    """Short commit of the checkout at root ("+ local changes" when tracked files differ), or None."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + (" + local changes" if dirty else "")


def environment(shape, repeat: int, argv=None, onnx: bool = False) -> dict:
    """What a run's figures depend on, as {label: value} in the order of the page's table."""
    import datetime
    import platform

    from deepatlas_fast.ops import _library
    import deepatlas_fast

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit() or "unknown (not a git checkout)",
        "CPU": f"{cpu_model()} ({os.cpu_count()} logical CPUs, {platform.machine()})",
        "instruction sets the kernels use": ", ".join(sorted(_library.cpu_instruction_sets)) or "none (scalar code)",
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "deepatlas_fast": f"{deepatlas_fast.__version__} (CUDA kernels built: {'yes' if _library.with_cuda else 'no'})",
        "CUDA device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (no CUDA figure measured)",
        "shape": "x".join(map(str, shape)) + (" (ONNX: its own two grids)" if onnx else ""),
        "rounds (median of)": str(repeat),
    }
    if os.environ.get("DEEPATLAS_FAST_SIMD"):
        env["DEEPATLAS_FAST_SIMD"] = os.environ["DEEPATLAS_FAST_SIMD"]
    if argv is not None:
        env["command"] = "`" + " ".join(["python -m benchmarks", *argv]) + "`"
    return env


def groups_of(rows: list[dict]) -> list[tuple]:
    """(title, ours, [others]) of a section's rows, from their speedup_of entries, in row order;
    a case in no comparison is a group of its own."""
    groups = {}
    for r in rows:
        for ours in r.get("speedup_of", {}):
            groups.setdefault(ours, (r.get("group", ours), ours, []))[2].append(r["case"])
    named = set(groups) | {c for _, _, others in groups.values() for c in others}
    order = []
    for r in rows:
        if r["case"] in groups:
            order.append(groups[r["case"]])
        elif r["case"] not in named:
            order.append((r.get("group", r["case"]), r["case"], []))
    return order


def _sections(rows: list[dict]) -> list[tuple]:
    """[(module, grid or None, rows)] in the order of the rows."""
    out = {}
    for r in rows:
        out.setdefault((r["module"], r.get("grid")), []).append(r)
    return [(m, g, rs) for (m, g), rs in out.items()]


def markdown_page(rows: list[dict], env: dict, notes: str = "") -> str:
    """The complete Markdown page of a run: method, environment (env), one section per
    benchmark module with its tables (as the runner prints them), and `notes` at the end."""
    lines = ["# Performance", "",
             f"Measured by the benchmark runner; this page is regenerated by `{PAGE_COMMAND}` "
             "(run from the repository root after `pip install --no-build-isolation \".[bench]\"`; "
             "add `--only`, `--shape`, `--repeat` as needed). No GPU figure is given unless the "
             "environment below names a CUDA device.", "",
             "## Method", "", METHOD.rstrip(), "",
             "## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    seen = set()
    for module, grid, section in _sections(rows):
        heading, about = SECTIONS.get(module, (module, ""))
        if module not in seen:
            seen.add(module)
            lines += ["", f"## {heading}", ""] + ([about, ""] if about else [])
        main = [r for r in section if not r.get("roofline") and r.get("case") != "cuda bandwidth"]
        roof = [r for r in section if r.get("roofline")]
        cuda = [r for r in section if r.get("case") == "cuda bandwidth"]
        if main:
            shape = "x".join(map(str, main[0].get("shape", [])))
            where = f"{grid} ({shape})" if grid else shape
            dtype = "float32 unless a row says bf16" if module == "bench_step" else "float32"
            lines += ([""] if lines[-1] else []) + [f"### {where}, {dtype}, batch 1", "",
                                                    format_table(main, groups_of(main))]
            if not any("peak_extra_mib" in r for r in main) and module != "bench_onnx":
                lines += ["", "Peak memory not measured in this run (`--no-memory`)."]
        if roof:
            lines += ["", "Memory roofline (same run):", "", format_roofline(roof)]
        for c in cuda:
            from benchmarks import bench_warp
            lines += ["", bench_warp.format_bandwidth(c)]
    if notes.strip():
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def write_markdown(rows: list[dict], env: dict, path, notes: str = "") -> None:
    with open(path, "w") as f:
        f.write(markdown_page(rows, env, notes))
