"""Runnable recipes: the demo, the benchmarks, the simulator and GRPO.

From a checkout they run as ``python -m recipes.<name>``. Installed, this folder is
``fsdp_sync.recipes`` (console scripts ``fsdp-sync-demo`` and friends), not a top-level
``recipes``: PyPI already has a package of that name, and other wheels (torchtune's)
install one too. So recipes import each other relatively, and find the folders they read
(``conf/``, the calibration runs in ``bench_results/``) through ``data_path``.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def data_path(name: str) -> Path:
    """The folder ``name``: inside the installed package (the wheel maps it there), else beside ``recipes/``."""
    for base in (_HERE, _HERE.parent):
        if (base / name).is_dir():
            return base / name
    raise FileNotFoundError(f"no {name}/ in {_HERE} or {_HERE.parent}: run the recipes from a checkout "
                            "or an installed wheel")
