"""What the installed extension deepatlas_fast._C registers: every op of the package, and none
of the test-only emulated ops (tests/_emulator.py builds those from csrc/emulator)."""
import json
import subprocess
import sys


OPS = {"warp", "warp_backward", "warp_with_loc_grad", "warp_backward_with_loc_grad", "lncc", "lncc_backward",
       "soft_dice_sums", "soft_dice_sums_backward", "cpu_cache_bytes", "empty_cpu_cache"}


def test_installed_extension_has_the_ops_and_no_emulated_op(tmp_path):
    # A fresh process (this one may have loaded the emulated ops), outside the source tree.
    code = ("import json, torch, deepatlas_fast; "
            "print(json.dumps(sorted(s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith('deepatlas'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    names = json.loads(out.stdout.strip().splitlines()[-1])
    assert {n.split("::")[1] for n in names if n.startswith("deepatlas_fast::")} == OPS
    assert [n for n in names if not n.startswith("deepatlas_fast::")] == []
