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
# passed (one round when the baselines are slow). On this VM a process's first calls that fault
# in fresh memory run several times slower for a second or so (seen: warp backwards 2-3x slower
# for the first ~10 calls, then steady); a single warm-up call left that inside the timing.
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
    comparison see the same machine state (this VM's speed and its allocator's state drift
    within a run, and a case timed alone minutes apart from another would carry that drift
    into the ratio). The warm-up is rounds of the same kind (see WARMUP_ROUNDS)."""
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
    """Markdown table: one line per case, the ratio against our case of the same group."""
    lines = ["| benchmark | implementation | median time | speed-up of ours | peak extra memory |",
             "|---|---|---:|---:|---:|"]
    by_case = {r["case"]: r for r in rows}
    for title, ours, others in groups:
        for name in [ours, *others]:
            r = by_case[name]
            ratio = "" if name == ours else f"{r['speedup_of'][ours]:.1f}x"
            mem = (f"{r['peak_extra_mib']:.0f} MiB ({r['peak_extra_volumes']:.1f} vol)"
                   if "peak_extra_mib" in r else "")
            lines.append(f"| {title} | {name} | {r['seconds'] * 1e3:.1f} ms | {ratio} | {mem} |")
    return "\n".join(lines)


def dump_json(rows, path):
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.is_available()}
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


# ---- Memory roofline: how close our cases run to this machine's memory bandwidth, and what
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
