"""The vLLM weight-transfer backend's wire dataclasses and checks, without vLLM (CI).

The backend itself, inside real vLLM, is tests/test_vllm_transfer_live.py (``-m vllm``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

from fsdp_sync import SyncConfig
from fsdp_sync.engines import vllm_transfer
from fsdp_sync.engines.vllm_transfer import (BACKEND, EngineInitInfo, TrainerInitInfo, UpdateInfo, check_landed,
                                             module_of, update_payload)

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_backend_module_pulls_no_vllm():
    code = ("import sys, fsdp_sync, fsdp_sync.engines.vllm_transfer, fsdp_sync.engines.vllm_worker; "
            "print(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_the_plugin_entry_point_names_register():
    """vLLM loads ``vllm.general_plugins`` in every process; ours must resolve to register()."""
    points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    module, _, attr = points[BACKEND].partition(":")
    assert (module, attr) == ("fsdp_sync.engines.vllm_transfer", "register")
    assert callable(getattr(vllm_transfer, attr))
    # and the engine classes it registers by path are where it says (that module needs vLLM)
    source = (ROOT / (vllm_transfer.ENGINE_MODULE.replace(".", "/") + ".py")).read_text()
    assert f"class {vllm_transfer.ENGINE_CLASS}(" in source and f"class {vllm_transfer.TRAINER_CLASS}(" in source


def test_register_without_vllm_registers_nothing_and_does_not_raise():
    """vLLM calls general plugins unguarded: on a vLLM without the 0.33 API (or none) it must return."""
    code = ("import sys; sys.modules['vllm'] = None; from fsdp_sync.engines.vllm_transfer import register; "
            "print(register())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_the_trainer_payload_is_what_the_workers_parse():
    config = SyncConfig(control="10.0.0.1:29600", job="rl", quant="fp8_block", transport="nccl", secret="s3cret")
    info = TrainerInitInfo(config=config, rank=0, update_timeout_s=30.0)
    assert TrainerInitInfo.backend == BACKEND and info.is_sender and not TrainerInitInfo(config=config, rank=1).is_sender
    payload = info.engine_init_payload()
    assert json.loads(json.dumps(payload)) == payload  # vLLM's HTTP route posts it as JSON
    assert "secret" not in payload["config"] and "s3cret" not in json.dumps(payload)
    parsed = EngineInitInfo(**payload)  # what the worker's parse_init_info does
    assert (parsed.commit, parsed.rank, parsed.world_size) == ("staged", None, None)
    got = parsed.sync_config()
    assert got.shared_settings() == config.shared_settings() and got.secret is None
    assert (got.control, got.job, got.transport, got.links, got.quant_skip) == (
        config.control, config.job, config.transport, config.links, config.quant_skip)


@pytest.mark.parametrize("bad, message", [
    (dict(commit="in_place"), "commits staged only"),
    (dict(config={"control": "h:1", "nonsense": 1}), "fields SyncConfig does not: ['nonsense']"),
    (dict(config={"control": "h:1", "secret": "x"}), "must not carry SyncConfig.secret"),
    (dict(config={"control": "h:1", "quant": "fp4"}), "SyncConfig.quant='fp4'"),
])
def test_bad_init_info_is_refused_on_the_worker(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        EngineInitInfo(**{"config": {"control": "h:1"}, **bad})


def test_trainer_init_info_refusals():
    with pytest.raises(ValueError, match="commits staged only"):
        TrainerInitInfo(config=SyncConfig(), rank=0, commit="in_place")
    with pytest.raises(ValueError, match="must be a SyncConfig"):
        TrainerInitInfo(config={"control": "h:1"}, rank=0)


def test_update_info():
    assert update_payload(3) == {"version": 3, "timeout_s": None}
    assert UpdateInfo(**update_payload(4, 2.5)) == UpdateInfo(version=4, timeout_s=2.5)
    for bad in (0, -1, True, 1.0, "2"):
        with pytest.raises(ValueError, match="version must be an int >= 1"):
            UpdateInfo(version=bad)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        UpdateInfo(version=1, timeout_s=0)


def test_check_landed():
    check_landed(None, None)  # no update_weights call this round: nothing to confirm
    check_landed(3, 3)
    check_landed(3, 4)  # a newer version landed meanwhile: commit makes the newest live
    for live in (None, 2):
        with pytest.raises(RuntimeError, match="version 3 was confirmed landed"):
            check_landed(3, live)


def test_module_of_vllm_sources():
    model = nn.Linear(2, 2)

    class ModuleSourceLike:  # vLLM's ModuleSource keeps its module private
        def __init__(self, module):
            self._module = module

    class Public:
        module = model

    assert module_of(model) is model and module_of(ModuleSourceLike(model)) is model and module_of(Public()) is model
    with pytest.raises(TypeError, match="pass source=ModuleSource"):
        module_of([("w", torch.zeros(2))])
