"""Processes for the staged-commit tests: every version fills every weight with its own number."""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
from torch import nn

from fsdp_sync import SyncConfig, WeightReceiver, WeightSender
from recipes.jobs import pack


ENGINE_LIVE = "test/engine-serves-the-last-version"


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64)).to(torch.bfloat16)


def _device(gpu: bool) -> torch.device:
    """The GPU recipes.jobs.start_job gave this process, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")


def trainer(rank: int, world_size: int, cfg: SyncConfig, num_versions: int, kill_at: int | None,
            gpu: bool = False) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = _device(gpu)
    model = fully_shard(_model().to(device), mesh=init_device_mesh(device.type, (world_size,)))

    def die_mid_push(done: int, total: int) -> None:
        if rank == 1 and sender.version == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    sender = WeightSender(model, cfg, progress=die_mid_push)
    for v in range(1, num_versions + (1 if kill_at else 0) + 1):
        if v == kill_at:
            # A staged version that landed but was never committed is lost when the next push
            # starts writing the shadow and then fails: wait until the engine serves the last.
            while not sender.control.has(ENGINE_LIVE):
                time.sleep(0.01)
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().fill_(v)
        sender.push(v).wait()
    sender.close()


def engine(rank: int, world_size: int, cfg: SyncConfig, num_versions: int, kill_at: int | None,
           gpu: bool = False) -> bytes:
    """Reads its live weights in a loop, committing between reads, as an engine between steps."""
    model = _model().to(_device(gpu))
    recv = WeightReceiver(model, config=cfg, commit="staged")
    seen, reads, torn = set(), 0, []
    longest_commit = longest_nothing_new = 0.0
    writes_during_reads = threading.Event()
    deadline = time.monotonic() + cfg.timeout_s * 10
    while recv.version != num_versions:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the engine serves version {recv.version}, not {num_versions} (landed "
                               f"{recv.landed_version}) after {cfg.timeout_s * 10:.0f}s")
        before = recv.version
        started = time.perf_counter()
        recv.commit()
        took = time.perf_counter() - started
        longest_commit = max(longest_commit, took)
        if recv.version == before:  # nothing new made live: a push in flight, or none landed yet
            longest_nothing_new = max(longest_nothing_new, took)
        values = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
        reads += 1
        if recv.version is None:
            continue
        if not bool((values == recv.version).all()):
            torn.append((recv.version, sorted(set(values.tolist()))[:5]))
        seen.add(recv.version)
        if recv.landed_version != recv.version:
            writes_during_reads.set()
    outcome = {"seen": sorted(seen), "reads": reads, "torn": torn, "longest_commit_s": longest_commit,
               "longest_nothing_new_s": longest_nothing_new}
    if kill_at:
        recv.control.set(ENGINE_LIVE, True)
        # An engine thread keeps committing through the push that fails: it must never wait.
        failing, stop = [0.0], threading.Event()

        def keep_committing() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                recv.commit()
                failing[0] = max(failing[0], time.perf_counter() - started)
                time.sleep(0.001)

        committer = threading.Thread(target=keep_committing)
        committer.start()
        try:
            recv.wait_for(kill_at, timeout=cfg.timeout_s * 3)
            outcome["after_kill"] = "no error"
        except Exception as e:  # noqa: BLE001 - the test inspects it
            outcome["after_kill"] = f"{type(e).__name__}: {e}"
        stop.set()
        committer.join()
        outcome["longest_commit_failing_s"] = failing[0]
        time.sleep(0.2)
        recv.commit()
        outcome["live_after_kill"] = sorted({float(x) for p in model.parameters() for x in p.detach().float().reshape(-1)})
        outcome["version_after_kill"] = recv.version
    recv.close()
    return pack(outcome)


def paused_engine(rank: int, world_size: int, cfg: SyncConfig, num_versions: int, kill_at: int | None,
                  gpu: bool = False) -> bytes:
    """An in_place engine that pauses for each push; reports its pause/resume calls around a failed push."""
    calls: list[str] = []
    model = _model().to(_device(gpu))
    recv = WeightReceiver(model, config=cfg, commit="in_place", pause=lambda: calls.append("pause"),
                          resume=lambda: calls.append("resume"))
    recv.wait_for(num_versions)
    outcome = {"version_before_kill": recv.version, "calls_before_kill": len(calls)}
    recv.control.set(ENGINE_LIVE, True)
    try:
        recv.wait_for(kill_at, timeout=cfg.timeout_s * 3)
        outcome["after_kill"] = "no error"
    except Exception as e:  # noqa: BLE001 - the test inspects it
        outcome["after_kill"] = f"{type(e).__name__}: {e}"
    outcome.update(version_after_kill=recv.version, calls=calls)
    recv.close()
    return pack(outcome)


def slow_trainer(rank: int, world_size: int, cfg: SyncConfig, num_versions: int, slow_at: int,
                 gpu: bool = False) -> None:
    """Pushes versions 1..num_versions; version ``slow_at`` stalls past the receivers' timeout."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(_model().to(_device(gpu)), mesh=init_device_mesh(_device(gpu).type, (world_size,)))

    def stall(done: int, total: int) -> None:
        if sender.version == slow_at and done == 1:
            if cfg.watermark_mb < 0.1:  # small buckets: fail mid-push instead, after the first
                raise RuntimeError("injected sender failure")
            time.sleep(cfg.timeout_s + 1.0)

    sender = WeightSender(model, cfg, progress=stall)
    for v in range(1, num_versions + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().fill_(v)
        try:
            sender.push(v).wait()
        except Exception:  # noqa: BLE001 - the slow push fails on every side; the next must land
            if v != slow_at:
                raise
    sender.close()


def recovering_engine(rank: int, world_size: int, cfg: SyncConfig, num_versions: int, slow_at: int,
                      gpu: bool = False) -> bytes:
    """Waits through the slow push's error, then for the last version; reports what it saw."""
    model = _model().to(_device(gpu))
    recv = WeightReceiver(model, config=cfg)
    recv.wait_for(slow_at - 1)
    outcome = {}
    try:
        recv.wait_for(slow_at, timeout=cfg.timeout_s * 3)
        outcome["slow"] = "no error"
    except Exception as e:  # noqa: BLE001 - the test inspects it
        outcome["slow"] = f"{type(e).__name__}: {e}"
    outcome["last"] = recv.wait_for(num_versions, timeout=cfg.timeout_s * 3)
    outcome["values"] = sorted({float(x) for p in model.parameters() for x in p.detach().float().reshape(-1)})
    recv.close()
    return pack(outcome)
