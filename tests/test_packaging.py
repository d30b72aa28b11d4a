"""What a wheel built from this tree ships and declares: the library (kernels/ as fsdp_sync.kernels, never
a top-level `kernels`, a different PyPI package), its version, its license."""

from __future__ import annotations

import email
import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fsdp_sync

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(out), str(ROOT)], check=True, capture_output=True)
    (name,) = [f for f in os.listdir(out) if f.endswith(".whl")]
    return zipfile.ZipFile(out / name)


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if n.endswith(".dist-info/" + name)]
    return wheel.read(path).decode()


def test_installed_package_maps_kernels_inside_the_library(tmp_path):
    # Run from an empty folder so the checkout itself is not on sys.path.
    code = ("import importlib.util, fsdp_sync.kernels as k, fsdp_sync.kernels.fp8_quant;"
            "print(k.__file__); print(importlib.util.find_spec('kernels') is None or "
            "'fsdp_sync' not in (importlib.util.find_spec('kernels').origin or ''))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    path, top_level_ok = out.stdout.split()
    assert path.endswith(os.path.join("kernels", "__init__.py"))
    assert top_level_ok == "True"


def test_wheel_contains_fsdp_sync_kernels_and_no_top_level_kernels(wheel):
    names = wheel.namelist()
    assert {"fsdp_sync/kernels/fp8_quant.py", "fsdp_sync/kernels/fp8_grouped.py"} <= set(names)
    assert not [n for n in names if n.startswith("kernels/")]


def test_version_has_one_source():
    # pyproject reads the version from fsdp_sync/_version.py; the installed metadata must agree
    # (it does not after a version bump until the package is installed again).
    assert fsdp_sync.__version__ == importlib.metadata.version("fsdp_sync")


def test_wheel_declares_its_version_and_apache_license(wheel):
    meta = email.message_from_string(_dist_info(wheel, "METADATA"))
    assert meta["Version"] == fsdp_sync.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    shipped = _dist_info(wheel, "licenses/LICENSE")
    assert shipped == (ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in shipped
    assert "Copyright 2026 The fsdp_sync authors" in shipped
