"""kernels/ ships as fsdp_sync.kernels, never as a top-level `kernels` (a different PyPI package)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installed_package_maps_kernels_inside_the_library(tmp_path):
    # Run from an empty folder so the checkout itself is not on sys.path.
    code = ("import importlib.util, fsdp_sync.kernels as k, fsdp_sync.kernels.fp8_quant;"
            "print(k.__file__); print(importlib.util.find_spec('kernels') is None or "
            "'fsdp_sync' not in (importlib.util.find_spec('kernels').origin or ''))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    path, top_level_ok = out.stdout.split()
    assert path.endswith(os.path.join("kernels", "__init__.py"))
    assert top_level_ok == "True"


def test_a_source_checkout_takes_its_own_kernels():
    """Imported from a checkout, fsdp_sync.kernels is that checkout's kernels/ folder, also when
    the environment holds an editable install of another checkout (a git worktree's main one)."""
    code = "import fsdp_sync, fsdp_sync.kernels.fp8_quant as q; print(fsdp_sync.__file__); print(q.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    package, kernel = out.stdout.split()
    assert package == os.path.join(ROOT, "fsdp_sync", "__init__.py")
    assert kernel == os.path.join(ROOT, "kernels", "fp8_quant.py")


def test_wheel_contains_fsdp_sync_kernels_and_no_top_level_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), ROOT], check=True, capture_output=True)
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert {"fsdp_sync/kernels/fp8_quant.py", "fsdp_sync/kernels/fp8_grouped.py"} <= set(names)
    assert not [n for n in names if n.startswith("kernels/")]
