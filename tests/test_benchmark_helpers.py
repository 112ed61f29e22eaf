"""The benchmark runner's helpers that do not time anything (benchmarks/ is not installed:
it is imported from the source tree). A module of the project that fails to import fails
these tests; they import no optional package."""
import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_warp, common  # noqa: E402


def test_warp_bytes_counts_disp_image_and_output():
    assert bench_warp.warp_bytes((2, 3, 4)) == 5 * 24 * 4
    assert bench_warp.warp_bytes((2, 3, 4), channels=3, itemsize=2) == 9 * 24 * 2


def test_bandwidth_report_without_and_with_a_device():
    if not torch.cuda.is_available():
        assert bench_warp.cuda_bandwidth((8, 8, 8)) is None
    assert "not measured" in bench_warp.format_bandwidth(None)
    line = bench_warp.format_bandwidth({"device": "X", "bytes": 2**30, "warp_gbps": 500.0, "copy_gbps": 1000.0})
    assert "500 GB/s" in line and "1000 GB/s" in line and "50% of copy" in line and "1024 MiB" in line


@pytest.mark.parametrize("name", ["bench_warp", "bench_dice"])
def test_least_bytes_name_our_cases_and_count_whole_volumes(name):
    m = importlib.import_module(f"benchmarks.{name}")
    ours = {g[1] for g in m.GROUPS}
    assert set(m.LEAST_BYTES) == ours
    for case, f in m.LEAST_BYTES.items():
        assert f((4, 5, 6)) % (4 * 5 * 6) == 0 and f((4, 5, 6)) > 0
        assert f((8, 5, 6)) == 2 * f((4, 5, 6))  # proportional to the voxel count


def test_warp_least_bytes_in_volumes():
    vol = 4 * 24
    b = bench_warp.LEAST_BYTES
    assert b["deepatlas_fast.warp forward"]((2, 3, 4)) == 5 * vol
    assert b["deepatlas_fast.warp forward+backward"]((2, 3, 4)) == 14 * vol
    assert b["deepatlas_fast.warp forward+backward, disp grad only"]((2, 3, 4)) == 13 * vol


def test_roofline_rates_and_best_speedup(monkeypatch):
    monkeypatch.setattr(common, "copy_seconds", lambda nbytes, repeat: nbytes / 20e9)  # a 20 GB/s copy
    rows = [{"case": "ours", "seconds": 0.1}, {"case": "theirs", "seconds": 2.0}]
    groups = [("g", "ours", ["theirs"]), ("h", "other", [])]
    (e,) = common.roofline(rows, {"ours": lambda s: 1e9}, groups, (1, 1, 1), repeat=1)
    assert e["gbps"] == pytest.approx(10.0) and e["copy_gbps"] == pytest.approx(20.0)
    assert e["max_speedup_of"]["theirs"] == pytest.approx(40.0)  # 2 s over 0.05 s
    table = common.format_roofline([e])
    assert "10.0 GB/s" in table and "50%" in table and "40x over theirs" in table


def test_interleaved_times_calls_cases_in_rounds(monkeypatch):
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    t = common.interleaved_times(fns, repeat=3, warmup=2)
    assert calls == ["a", "b"] * 2 + ["a", "b"] * 3  # warm-up rounds, then one call of each per round
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())
    calls.clear()  # slow cases: the warm-up stops after the round that passes WARMUP_SECONDS
    monkeypatch.setattr(common, "WARMUP_SECONDS", 0.0)
    common.interleaved_times(fns, repeat=1, warmup=3)
    assert calls == ["a", "b"] * 2


def test_run_module_times_each_case_once_and_reports_ratios(monkeypatch):
    import types
    calls = []
    mod = types.SimpleNamespace(
        CASES={n: (lambda shape, n=n: (lambda: calls.append(n))) for n in ["ours", "base", "lone"]},
        GROUPS=[("g", "ours", ["base"])])
    monkeypatch.setattr(common.importlib, "import_module", lambda name: mod)
    rows = {r["case"]: r for r in common.run_module("fake", (2, 2, 2), repeat=2, memory=False, progress=lambda s: None)}
    rounds = common.WARMUP_ROUNDS + 2
    assert calls == ["ours", "base"] * rounds + ["lone"] * rounds
    assert set(rows) == {"ours", "base", "lone"} and "ours" in rows["base"]["speedup_of"]


def test_measure_peak_sees_buffers_the_warm_up_freed():
    # The LNCC forward's per-thread slab buffers (~0.45 volumes each, see ops/lncc.py) are freed
    # at the end of each call; with glibc's dynamic mmap threshold the measured call would reuse
    # the warm-up's and seem to take 0 MiB.
    shape = (160, 192, 224)
    peak = common.measure_peak("bench_lncc", "deepatlas_fast.lncc forward", shape)
    assert peak > 0.25 * 4 * 160 * 192 * 224


def _tool(name):
    """tools/NAME.py as a module (tools/ is not a package)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_warp_block_stats_on_a_constant_shift():
    tool = _tool("warp_block_stats")
    # +0.5 voxel everywhere on 6x6x24: locations z + 0.5 are strictly inside (0, 5) for z < 5,
    # the same along y, and along x for w < 23: per interior row two run blocks, the third holds
    # w = 23; 25 of the 36 rows are interior.
    s = tool.block_stats(torch.full((1, 3, 6, 6, 24), 0.5, dtype=torch.float64))
    assert s["blocks: one run of cells (vector loads)"] == pytest.approx(50 / 108)
    assert s["blocks: interior, corner pairs"] == 0
    assert s["blocks: with a non-interior voxel"] == pytest.approx(58 / 108)
    assert s["distinct (z, y) cell rows per block (mean)"] == 1
    assert s["runs per interior block (mean)"] == 1
    assert s["voxels not strictly interior"] == pytest.approx(1 - 25 * 23 / (36 * 24))
    # every other voxel shifted by 0.6 along x: cells repeat, no block is a run any more
    d = torch.zeros(1, 3, 6, 6, 24, dtype=torch.float64) + 0.5
    d[:, 2, ..., 1::2] += 0.6
    s = tool.block_stats(d)
    assert s["blocks: one run of cells (vector loads)"] == 0
    assert s["runs per interior block (mean)"] == 8  # x cells w, w + 2, w + 2, w + 4, ...: no lane joins


def test_warp_memory_probe_keeps_every_voxel_on_the_same_stencil():
    import deepatlas_fast as da
    tool = _tool("warp_memory_probe")
    shape, period = (20, 18, 24), tool.PERIOD
    disp = common.smooth_displacement(shape, magnitude=2.0).double()
    folded = tool.wrapped(disp)
    # An image periodic in d and h (period 13), and the 16 x 16-row image holding one period
    # shifted by one row: the folded field must sample the small image where the original
    # samples the periodic one (same cells up to the period, same fractions).
    base = torch.randn(1, 1, period, period, shape[2], dtype=torch.float64)
    big = base[:, :, torch.arange(shape[0]) % period][:, :, :, torch.arange(shape[1]) % period]
    rows = (torch.arange(period + 3) - 1) % period
    small = base[:, :, rows][:, :, :, rows]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    loc, loc2 = grid + disp[0], grid + folded[0]
    top = torch.tensor([s - 1 for s in shape], dtype=torch.float64).view(3, 1, 1, 1)
    interior = ((loc > 0) & (loc < top)).all(0)
    assert ((loc2[:2] > 0) & (loc2[:2] < period + 1)).all()  # strictly inside the small image
    assert torch.equal(loc2[2], loc[2])
    assert interior.float().mean() > 0.5
    out, out2 = da.warp(big, disp), da.warp(small, folded)
    torch.testing.assert_close(out2[0, 0][interior], out[0, 0][interior], rtol=1e-9, atol=1e-9)


def test_warp_simd_levels_times_every_level_and_checks_their_bits(monkeypatch):
    tool = _tool("warp_simd_levels")
    t = tool.time_levels((16, 6, 24), ["0", "avx2", "1"], rounds=2, warmup=1)
    assert set(t) == set(tool.CASES) and all(set(row) == {"0", "avx2", "1"} for row in t.values())
    assert all(v > 0 for row in t.values() for v in row.values())
    monkeypatch.setattr(tool.torch, "equal", lambda a, b: False)  # a level that differs is reported
    with pytest.raises(AssertionError, match="differs"):
        tool.time_levels((16, 6, 24), ["0", "1"], rounds=1, warmup=0)


def _synthetic_rows():
    """Rows as the runner collects them (no timing): warp with memory and a roofline, soft Dice
    without memory, ONNX at two grids."""
    w = "bench_warp"
    warp = [
        {"module": w, "case": "ours fwd", "shape": [16, 16, 16], "seconds": 0.0159, "group": "warp forward",
         "peak_extra_mib": 28.0, "peak_extra_volumes": 1.1},
        {"module": w, "case": "theirs fwd", "shape": [16, 16, 16], "seconds": 0.3529, "group": "warp forward",
         "speedup_of": {"ours fwd": 22.2}, "peak_extra_mib": 236.0, "peak_extra_volumes": 9.0},
        {"module": w, "case": "lone", "shape": [16, 16, 16], "seconds": 0.001},
        {"module": w, "roofline": True, "group": "warp forward", "case": "ours fwd", "least_bytes": 131 << 20,
         "gbps": 8.6, "copy_gbps": 29.6, "copy_seconds": 0.0046, "max_speedup_of": {"theirs fwd": 76.0}},
    ]
    dice = [
        {"module": "bench_dice", "case": "ours dice", "shape": [16, 16, 16], "seconds": 0.0144, "group": "dice"},
        {"module": "bench_dice", "case": "monai dice", "shape": [16, 16, 16], "seconds": 0.1426, "group": "dice",
         "speedup_of": {"ours dice": 9.9}},
    ]
    onnx = [{"module": "bench_onnx", "case": c, "shape": list(s), "grid": g, "seconds": t, "group": "seg",
             **({"speedup_of": {"seg: ONNX Runtime": t / 0.654}} if "eager" in c else {})}
            for g, s in (("2 mm demo", (80, 96, 112)), ("1 mm", (160, 192, 224)))
            for c, t in (("seg: ONNX Runtime", 0.654), ("seg: PyTorch eager", 1.872))]
    return warp + dice + onnx


def test_markdown_page_has_method_environment_and_every_table():
    env = {"date": "2026-11-26", "CPU": "Some CPU (2 logical CPUs, x86_64)", "threads": "2", "torch": "2.14.1"}
    page = common.markdown_page(_synthetic_rows(), env, notes="A closing remark.")
    lines = page.splitlines()
    assert lines[0] == "# Performance" and common.PAGE_COMMAND in page
    heads = [l for l in lines if l.startswith("#")]
    assert heads == ["# Performance", "## Method", "## Environment", "## Warp", "### 16x16x16, float32, batch 1",
                     "## Soft Dice", "### 16x16x16, float32, batch 1", "## ONNX Runtime vs PyTorch eager",
                     "### 2 mm demo (80x96x112), float32, batch 1", "### 1 mm (160x192x224), float32, batch 1"]
    for word in ("interleaved rounds", "median", "Warm-up", "fresh Python process", "Memory roofline", "copy speed"):
        assert word in page, word
    assert "| CPU | Some CPU (2 logical CPUs, x86_64) |" in page and "| torch | 2.14.1 |" in page
    # the runner's tables: ratios, memory where measured, the lone case, the roofline
    assert "| warp forward | theirs fwd | 352.9 ms | 22.2x | 236 MiB (9.0 vol) |" in page
    assert "| lone | lone | 1.0 ms |  | |" in page
    assert "| warp forward | 131 MiB | 8.6 GB/s | 29.6 GB/s (4.6 ms) | 29% | 76x over theirs fwd |" in page
    dice = page.split("## Soft Dice")[1].split("## ONNX")[0]
    assert "| dice | monai dice | 142.6 ms | 9.9x |" in dice and "peak extra memory" not in dice
    assert "Peak memory not measured" in dice
    onnx = page.split("## ONNX Runtime vs PyTorch eager")[1]
    assert onnx.count("| seg | seg: PyTorch eager | 1872.0 ms | 2.9x |") == 2 and "not measured" not in onnx
    assert page.rstrip().endswith("A closing remark.")


def test_groups_of_rebuilds_the_comparisons_from_the_rows():
    rows = _synthetic_rows()
    warp = [r for r in rows if r["module"] == "bench_warp" and not r.get("roofline")]
    assert common.groups_of(warp) == [("warp forward", "ours fwd", ["theirs fwd"]), ("lone", "lone", [])]


def test_runner_writes_the_markdown_page(tmp_path, monkeypatch):
    """--markdown through the runner's own argument parsing, with the timing replaced."""
    import benchmarks.__main__ as runner
    rows = [dict(r) for r in _synthetic_rows() if r["module"] == "bench_warp" and not r.get("roofline")]
    monkeypatch.setattr(common, "run_module", lambda module, shape, repeat, memory, progress: [dict(r) for r in rows])
    monkeypatch.setattr(common, "copy_seconds", lambda nbytes, repeat: 1e-3)
    monkeypatch.setattr(bench_warp, "LEAST_BYTES", {"ours fwd": lambda s: 1 << 20})
    monkeypatch.setattr(bench_warp, "GROUPS", [("warp forward", "ours fwd", ["theirs fwd"])])
    out = tmp_path / "perf.md"
    assert runner.main(["--only", "warp", "--shape", "16", "16", "16", "--repeat", "1", "--no-memory",
                        "--markdown", str(out)]) == 0
    page = out.read_text()
    assert "## Environment" in page and "## Warp" in page and "Memory roofline" in page
    assert "`python -m benchmarks --only warp --shape 16 16 16 --repeat 1 --no-memory --markdown " in page
    env = common.environment((16, 16, 16), 1)
    assert set(env) >= {"date", "commit", "CPU", "threads", "torch", "shape", "rounds (median of)"}
    assert env["shape"].startswith("16x16x16") and env["threads"] == str(torch.get_num_threads())
