"""Staged commit: the engine never sees a mixture of versions, and a failed push never reaches it."""

from __future__ import annotations

import queue
import time

import pytest

from fsdp_sync import SyncConfig
from recipes.jobs import free_port, spawn_context, start_job, unpack
from tests import commit_workers


def _run(transport: str, num_versions: int, kill_at: int | None) -> dict:
    cfg = SyncConfig(control=f"127.0.0.1:{free_port()}", job=f"torn-{transport}", transport=transport, timeout_s=10.0)
    ctx = spawn_context()
    results = ctx.Queue()
    procs = start_job(ctx, commit_workers.trainer, 2, results, cfg, num_versions, kill_at)
    procs += start_job(ctx, commit_workers.engine, 1, results, cfg, num_versions, kill_at)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            try:
                name, rank, status, payload = results.get(timeout=0.5)
            except queue.Empty:
                continue
            if name == "engine":
                assert status == "ok", payload
                return unpack(payload)
            if status == "error" and not kill_at:
                raise AssertionError(f"{name} rank {rank}: {payload}")
        raise TimeoutError("the engine did not finish")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_reader_never_sees_a_mixture_over_100_pushes(transport):
    out = _run(transport, num_versions=100, kill_at=None)
    assert out["torn"] == [], out["torn"][:3]
    assert out["seen"][-1] == 100 and out["reads"] >= 100


def test_failed_push_leaves_live_weights_at_last_version():
    out = _run("shm", num_versions=5, kill_at=6)
    assert out["torn"] == []
    assert "Sync" in out["after_kill"], out["after_kill"]
    assert out["version_after_kill"] == 5
    assert out["live_after_kill"] == [5.0]
