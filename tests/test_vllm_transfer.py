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


# --- the engine classes, on a stand-in for vLLM's two base classes ---------------------------
# The real bases run in tests/test_vllm_transfer_live.py; here only the call order and checks.

class _Bases:
    class WeightTransferEngine:
        def __class_getitem__(cls, _):
            return cls

        def __init__(self, config, vllm_config, device, model):
            self.config, self.vllm_config, self.device, self.model = config, vllm_config, device, model

        def parse_update_info(self, update_dict):
            return self.update_info_cls(**update_dict)

    class TrainerWeightTransferEngine:
        def __class_getitem__(cls, _):
            return cls

        def __init__(self, *, client, source=None, is_sender=True, rank=0):
            self.client, self.source, self.is_sender, self.rank = client, source, is_sender, rank


@pytest.fixture
def engine_module(monkeypatch):
    import importlib
    import types

    base = types.ModuleType("vllm.distributed.weight_transfer.base")
    base.WeightTransferEngine = _Bases.WeightTransferEngine
    base.TrainerWeightTransferEngine = _Bases.TrainerWeightTransferEngine
    for name in ("vllm", "vllm.distributed", "vllm.distributed.weight_transfer"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, base.__name__, base)
    monkeypatch.delitem(sys.modules, "fsdp_sync.engines.vllm_transfer_engine", raising=False)
    module = importlib.import_module("fsdp_sync.engines.vllm_transfer_engine")
    yield module
    sys.modules.pop("fsdp_sync.engines.vllm_transfer_engine", None)


class _Attached:
    def __init__(self, live_after_commit):
        self.calls, self.live = [], live_after_commit
        self.receiver = type("R", (), {"close": lambda _: self.calls.append("close")})()

    def wait_for(self, version, timeout):
        self.calls.append(("wait_for", version, timeout))
        return version

    def commit(self):
        self.calls.append("commit")
        return self.live


def test_worker_engine_waits_in_update_and_commits_in_finish(engine_module, monkeypatch):
    attached = _Attached(live_after_commit=2)
    got = {}

    def fake_attach(vllm_config, model, config, **kw):
        got.update(kw, config=config)
        return attached

    monkeypatch.setattr(engine_module, "attach", fake_attach)
    engine = engine_module.FsdpSyncWeightTransferEngine(None, None, torch.device("cpu"), nn.Linear(1, 1))
    with pytest.raises(RuntimeError, match="not initialized"):
        engine.start_weight_update()
    payload = TrainerInitInfo(config=SyncConfig(job="rl"), rank=0).engine_init_payload()
    engine.init_transfer_engine(EngineInitInfo(**payload))
    assert got["commit"] == "staged" and got["config"].job == "rl" and got["rank"] is None
    engine.start_weight_update()
    engine.update_weights(update_payload(2, 5.0))
    engine.finish_weight_update()
    assert attached.calls == [("wait_for", 2, 5.0), "commit"]
    engine.start_weight_update()
    engine.update_weights(update_payload(3))
    with pytest.raises(RuntimeError, match="version 3 was confirmed landed, but commit made 2 live"):
        engine.finish_weight_update()
    engine.shutdown()
    assert attached.calls[-1] == "close" and engine.attached is None


def test_trainer_engine_pushes_then_makes_vllms_three_calls(engine_module):
    class Sender:
        def push(self, version):
            calls.append(("push", version))
            return type("H", (), {"wait": lambda _: type("Result", (), {"version": 7})()})()

    class Client:
        def __getattr__(self, name):
            return lambda *args, **kwargs: calls.append((name, args, kwargs))

    calls = []
    info = TrainerInitInfo(config=SyncConfig(), rank=0, update_timeout_s=9.0)
    engine = engine_module.FsdpSyncTrainerWeightTransferEngine(client=Client(), source=None, sender=Sender(),
                                                               init_info=info)
    assert engine.send_weights().version == 7
    assert calls == [("push", None), ("start_weight_update", (), {}),
                     ("update_weights", ({"version": 7, "timeout_s": 9.0},), {}),
                     ("finish_weight_update", (), {"weight_version": "7"})]
    calls.clear()  # a rank other than 0 pushes only
    other = engine_module.FsdpSyncTrainerWeightTransferEngine(
        client=Client(), source=None, sender=Sender(), init_info=TrainerInitInfo(config=SyncConfig(), rank=1))
    other.send_weights(7)
    assert calls == [("push", 7)]


def test_trainer_init_needs_the_trainers_process_group(engine_module):
    with pytest.raises(ValueError, match="must be this process's rank in the trainer's default process group"):
        engine_module.FsdpSyncTrainerWeightTransferEngine.trainer_init(
            TrainerInitInfo(config=SyncConfig(), rank=0), client=None, source=nn.Linear(1, 1))
