"""Staged commit: the engine never sees a mixture of versions, and a failed push never reaches it."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from fsdp_sync import SyncConfig
from recipes.jobs import free_port, spawn_context, start_job, unpack
from tests import commit_workers
from tests.timeouts import scaled


def _run(transport: str, num_versions: int, kill_at: int | None, *, gpu: bool = False, trainers: int = 2,
         engine=commit_workers.engine, trainer=commit_workers.trainer, timeout_s: float = 10.0,
         watermark_mb: float = 256.0) -> dict:
    """With ``gpu``, trainer rank r runs on GPU r and the engine on the last GPU."""
    cfg = SyncConfig(control=f"127.0.0.1:{free_port()}", job=f"torn-{transport}", transport=transport,
                     timeout_s=scaled(timeout_s), watermark_mb=watermark_mb, connect_timeout_s=scaled(60))
    ctx = spawn_context()
    results = ctx.Queue()
    procs = start_job(ctx, trainer, trainers, results, cfg, num_versions, kill_at, gpu,
                      gpu_offset=0 if gpu else None)
    procs += start_job(ctx, engine, 1, results, cfg, num_versions, kill_at, gpu,
                       gpu_offset=-1 if gpu else None)
    deadline = time.monotonic() + scaled(240)
    try:
        while time.monotonic() < deadline:
            try:
                name, rank, status, payload = results.get(timeout=0.5)
            except queue.Empty:
                continue
            if name == engine.__name__:
                assert status == "ok", payload
                return unpack(payload)
            if status == "error" and not kill_at:
                raise AssertionError(f"{name} rank {rank}: {payload}")
        raise TimeoutError(f"the engine did not finish within {scaled(240):.0f}s")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


@pytest.mark.parametrize("transport,num_versions", [("shm", 200), ("gloo", 100)])
def test_reader_never_sees_a_mixture_over_many_pushes(transport, num_versions):
    """An engine loop commits and reads as fast as it can while the pushes land; commit() never
    waits for a push (it returns the live version while one writes the shadow)."""
    out = _run(transport, num_versions=num_versions, kill_at=None)
    print(f"{transport}: {out['reads']} reads over {num_versions} pushes, {len(out['torn'])} torn, "
          f"longest commit() {out['longest_commit_s'] * 1e3:.2f} ms (copying a landed version live), "
          f"{out['longest_nothing_new_s'] * 1e3:.2f} ms (returning at once during a push)")
    assert out["torn"] == [], out["torn"][:3]
    assert out["seen"][-1] == num_versions and out["reads"] >= 5 * num_versions
    assert out["longest_commit_s"] < scaled(0.25)  # a wait for a push would take the push's time


def test_failed_push_leaves_live_weights_at_last_version():
    # The dead sender's push fails after timeout_s: 3 s (scaled), as the timed-out pushes below.
    out = _run("shm", num_versions=5, kill_at=6, timeout_s=3.0)
    print(f"longest commit() while a dead sender's push fails: {out['longest_commit_failing_s'] * 1e3:.2f} ms")
    assert out["longest_commit_failing_s"] < scaled(0.25)  # it waited for timeout_s before (3 s here)
    assert out["torn"] == []
    assert "Sync" in out["after_kill"], out["after_kill"]
    assert out["version_after_kill"] == 5
    assert out["live_after_kill"] == [5.0]


def test_failed_in_place_push_reports_no_version_and_keeps_the_engine_paused():
    out = _run("shm", num_versions=3, kill_at=4, engine=commit_workers.paused_engine, timeout_s=3.0)
    assert out["version_before_kill"] == 3 and out["calls_before_kill"] == 6  # pause + resume per push
    assert "stays paused" in out["after_kill"], out["after_kill"]
    assert out["version_after_kill"] is None
    assert out["calls"] == ["pause", "resume"] * 3 + ["pause"]


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_push_after_a_timed_out_push_lands(transport):
    """A push that outlives the receivers' timeout fails on both sides; the next one lands whole."""
    out = _run(transport, num_versions=4, kill_at=3, trainers=1, engine=commit_workers.recovering_engine,
               trainer=commit_workers.slow_trainer, timeout_s=2.0)
    assert "Sync" in out["slow"], out["slow"]
    assert out["last"] == 4 and out["values"] == [4.0]


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_push_after_a_sender_error_mid_push_lands(transport):
    """The sender fails after its first bucket; that push fails everywhere and the next one lands whole."""
    out = _run(transport, num_versions=4, kill_at=3, trainers=1, engine=commit_workers.recovering_engine,
               trainer=commit_workers.slow_trainer, timeout_s=3.0, watermark_mb=0.01)
    assert "Sync" in out["slow"], out["slow"]
    assert out["last"] == 4 and out["values"] == [4.0]


needs_two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                    reason="needs 2 GPUs")


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("transport,trainers", [("cuda_ipc", 2), ("nccl", 1)])
def test_gpu_reader_never_sees_a_mixture_over_100_pushes(transport, trainers):
    """IPC writes land in the engine's GPU shadow copy while its reader loop runs; NCCL likewise.

    (NCCL refuses two ranks on one GPU, so its trainer is GPU0 alone.)
    """
    out = _run(transport, num_versions=100, kill_at=None, gpu=True, trainers=trainers)
    assert out["torn"] == [], out["torn"][:3]
    assert out["seen"][-1] == 100 and out["reads"] >= 100
