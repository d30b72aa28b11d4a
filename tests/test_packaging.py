"""What a wheel built from this tree ships and declares: the library (its kernels as fsdp_sync.kernels, never
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
from tests.timeouts import scaled

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


def test_a_checkout_does_not_shadow_pypi_kernels():
    """Run from a checkout's root (as the README's commands are), ``import kernels`` must not
    find a folder of ours: transformers imports Hugging Face's ``kernels`` package whenever it
    is installed, and a shadow broke every import of a transformers model."""
    code = ("import importlib.util, fsdp_sync.kernels.fp8_quant as q; spec = importlib.util.find_spec('kernels');"
            "print(q.__file__); print('none' if spec is None else spec.origin)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    kernel, found = out.stdout.split()
    assert kernel == os.path.join(ROOT, "fsdp_sync", "kernels", "fp8_quant.py")
    assert not found.startswith(os.path.join(ROOT, "kernels") + os.sep), found


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


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked as a site directory (what pip install puts in site-packages, less the scripts)."""
    site = tmp_path_factory.mktemp("site")
    wheel.extractall(site)
    return site


def _run_installed(site: Path, code: str, *, cwd: Path) -> subprocess.CompletedProcess:
    # From an empty folder with the unpacked wheel first on the path: nothing comes from the checkout.
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=scaled(120))


def test_wheel_ships_recipes_conf_and_the_simulator_runs_inside_the_library(wheel):
    names = set(wheel.namelist())
    for path in [*(ROOT / "recipes").glob("*.py"), *(ROOT / "recipes").glob("*/*.py")]:
        assert f"fsdp_sync/recipes/{path.relative_to(ROOT / 'recipes').as_posix()}" in names
    conf = [p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")]
    assert len(conf) > 10
    assert {f"fsdp_sync/recipes/conf/{p}" for p in conf} <= names
    assert not [n for n in names if n.split("/")[0] in ("recipes", "conf", "bench_results")]


def test_console_scripts_point_at_callables_of_the_installed_wheel(wheel, unpacked, tmp_path):
    declared = _pyproject()["project"]["scripts"]
    assert set(declared) == {"fsdp-sync-demo", "fsdp-sync-bench", "fsdp-sync-simulate", "fsdp-sync-grpo"}
    assert "[console_scripts]" in _dist_info(wheel, "entry_points.txt")
    code = ("import importlib.metadata as m, fsdp_sync, fsdp_sync.recipes as r, fsdp_sync.recipes.simulate as s\n"
            f"(dist,) = m.distributions(path=[{str(unpacked)!r}])\n"
            "for ep in dist.entry_points.select(group='console_scripts'):\n"
            "    fn = ep.load()\n"
            "    assert callable(fn), ep\n"
            "    print(ep.name, ep.value, fn.__module__)\n"
            "print('version', fsdp_sync.__version__, dist.version)\n"
            "print('conf', r.data_path('conf'))\n"
            "print('runs', s.BENCH_RUN.is_file() and s.KERNEL_RUN.is_file(), s.BENCH_RUN)\n")
    out = _run_installed(unpacked, code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    for name, target in declared.items():
        assert lines[name].split() == [target, target.split(":")[0]]
    installed, meta = lines["version"].split()
    assert installed == meta == fsdp_sync.__version__
    assert lines["conf"] == str(unpacked / "fsdp_sync" / "recipes" / "conf")
    found, run = lines["runs"].split()
    assert found == "True" and Path(run).parent == unpacked / "fsdp_sync" / "recipes" / "bench_results"


def test_installed_grpo_composes_its_config_from_the_wheel(unpacked, tmp_path):
    code = ("import sys; sys.argv = ['fsdp-sync-grpo', '--cfg', 'job', 'quant=fp8_block']\n"
            "from fsdp_sync.recipes.grpo import cli; cli()")
    out = _run_installed(unpacked, code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "quant: fp8_block" in out.stdout
    assert not list(tmp_path.iterdir()), "printing the config writes nothing"


# Imported by the recipes but installed by another requirement of the same extra.
COMES_WITH = {"omegaconf": "hydra-core"}
LOCAL = {"fsdp_sync", "recipes", "tests", "__future__"}
# Imported inside a function that the command never calls: recipes.simulate takes CASES from
# recipes.bench, whose environment record imports triton.
NOT_CALLED = {"simulate": {"triton"}}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """Top-level third-party modules ``path`` imports, and the sibling recipes it imports relatively."""
    import ast

    third, siblings = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            third |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            siblings |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            third.add(node.module.split(".")[0])
    return {m for m in third if m not in sys.stdlib_module_names and m not in LOCAL}, siblings


def _recipe_imports(module: str) -> set[str]:
    seen, todo, third = set(), [module], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if (ROOT / "recipes" / name).is_dir():  # a subpackage (recipes/sim): every module of it
            paths = sorted((ROOT / "recipes" / name).glob("*.py"))
        elif (ROOT / "recipes" / f"{name}.py").exists():
            paths = [ROOT / "recipes" / f"{name}.py"]
        else:
            continue
        for path in paths:
            found, siblings = _imports(path)
            third |= found
            todo += [s.split(".")[0] for s in siblings]
    return third


def _provided(requirements: list[str]) -> set[str]:
    import re

    names = {re.split(r"[ <>=!;\[]", r, maxsplit=1)[0].lower() for r in requirements}
    return names | {m for m, dist in COMES_WITH.items() if dist in names}


def _distribution(module: str) -> str:
    return {"hydra": "hydra-core"}.get(module, module).lower()


@pytest.mark.parametrize("extra, module", [("demo", "demo"), ("bench", "bench"), ("simulate", "simulate"),
                                           ("grpo", "grpo")])
def test_each_commands_extra_installs_what_its_recipe_imports(extra, module):
    project = _pyproject()["project"]
    provided = _provided(project["dependencies"] + project["optional-dependencies"][extra])
    missing = {m for m in _recipe_imports(module) - NOT_CALLED.get(extra, set()) if _distribution(m) not in provided}
    assert not missing, f"recipes.{module} imports {sorted(missing)}, which .[{extra}] does not install"


def test_the_test_extra_installs_what_tests_and_recipes_import():
    project = _pyproject()["project"]
    provided = _provided(project["dependencies"] + project["optional-dependencies"]["test"])
    needed = set()
    for path in [*(ROOT / "tests").glob("*.py"), *(ROOT / "recipes").glob("**/*.py"), *(ROOT / "fsdp_sync" / "kernels").glob("*.py")]:
        needed |= _imports(path)[0]
    missing = {m for m in needed if _distribution(m) not in provided}
    assert not missing, f"the tests import {sorted(missing)}, which .[test] does not install"


def test_editable_install_maps_kernels_recipes_and_conf_to_the_checkout(tmp_path):
    # PEP 660's editable wheel, unpacked; its finder replaces the one this venv's own editable
    # install registered, so every name below resolves through the new mapping alone.
    build = f"from setuptools import build_meta; build_meta.build_editable({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", build], cwd=ROOT, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    (finder,) = [p.stem for p in site.glob("__editable___*_finder.py")]
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path\n"
            "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n"
            f"sys.modules.pop({finder!r}, None)\n"
            f"sys.path.insert(0, {str(site)!r})\n"
            f"import {finder}; {finder}.install()\n"
            "import fsdp_sync.kernels, fsdp_sync.recipes as r, fsdp_sync.recipes.demo\n"
            "import fsdp_sync.recipes.simulate as s\n"
            "print(fsdp_sync.kernels.__file__, fsdp_sync.recipes.demo.__file__, r.data_path('conf'), s.BENCH_RUN)\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run([sys.executable, "-c", code], cwd=empty, capture_output=True, text=True, timeout=scaled(120))
    assert out.returncode == 0, out.stderr[-3000:]
    kernels, demo, conf, run = map(Path, out.stdout.split())
    assert (kernels, demo, conf) == (ROOT / "fsdp_sync" / "kernels" / "__init__.py", ROOT / "recipes" / "demo.py", ROOT / "conf")
    assert run.parent == ROOT / "bench_results" and run.is_file()
