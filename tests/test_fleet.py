"""A fleet that lives through a long run: a second trainer job under one name, a dead replica
dropped and a restarted one joining. Real FSDP2 trainer processes, real receivers, a real TCPStore."""

from __future__ import annotations

import os
import queue
import signal
import time

import pytest

from fsdp_sync import SyncConfig, SyncError, WeightReceiver
from recipes.jobs import free_port, spawn_context, start_job
from tests import fleet_workers
from tests.timeouts import scaled


def _config(job: str, **kw) -> SyncConfig:
    return SyncConfig(control=f"127.0.0.1:{free_port()}", job=job, transport="shm", timeout_s=scaled(4),
                      connect_timeout_s=scaled(60), **kw)


def _start_trainer(cfg: SyncConfig, versions: list[int], ctx=None):
    ctx = ctx or spawn_context()
    results = ctx.Queue()
    return start_job(ctx, fleet_workers.trainer, 2, results, cfg, versions, "go"), results


def _finish(procs, results) -> dict[int, str]:
    return fleet_workers.reports(procs, results, scaled(120))


_values = fleet_workers.values


def test_a_second_trainer_job_under_the_same_name_is_refused_and_the_first_goes_on():
    cfg = _config("twice")
    first, first_results = _start_trainer(cfg, [1, 2])
    receiver = WeightReceiver(fleet_workers.model(), config=cfg, commit="staged")
    try:
        assert receiver.wait_for(1, timeout=scaled(60)) == 1
        second, second_results = _start_trainer(cfg, [7])
        refused = _finish(second, second_results)
        assert set(refused) == {0, 1}
        for rank, outcome in refused.items():
            assert "process error" in outcome and "SyncError" in outcome, (rank, outcome)
            assert "cannot host the control plane" in outcome and "another trainer job" in outcome, (rank, outcome)
        receiver.control.set("go/2", True)
        assert receiver.wait_for(2, timeout=scaled(60)) == 2
        assert receiver.commit() == 2 and _values(receiver) == {2.0}  # nothing of the second job's model
    finally:
        outcome = _finish(first, first_results)
        receiver.close()
    assert outcome == {0: "1: ok\n2: ok", 1: "1: ok\n2: ok"}


def _next(results, rank: int, timeout: float, process=None):
    """The next report of receiver ``rank``; on a timeout, says whether ``process`` still runs."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            item = results.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            state = "" if process is None else f" (its process: alive={process.is_alive()}, exitcode={process.exitcode})"
            raise AssertionError(f"no report from receiver rank {rank} within {timeout:.0f}s{state}") from None
        if item[0] == rank:
            return item


def test_a_dead_replica_is_dropped_the_push_goes_on_and_a_restarted_one_rejoins():
    """Receiver rank 1 of 2 is killed after version 1. Version 2 fails; version 3 lands on rank 0
    alone; a new rank-1 process takes over the dead one's claim and gets version 4 in full."""
    cfg = _config("elastic", on_receiver_failure="drop")
    ctx = spawn_context()
    trainer, trainer_results = _start_trainer(cfg, [1, 2, 3, 4], ctx)
    # Each replica process reports on a queue of its own: a process killed while its queue's
    # feeder thread holds the queue's write lock (just after the report the test acts on)
    # leaves that lock taken for good, and a restarted replica writing to the same queue
    # would block on it forever, unable even to exit.
    doomed_reports, restarted_reports = ctx.Queue(), ctx.Queue()
    doomed = ctx.Process(target=fleet_workers.lone_receiver, args=(cfg, 1, 2, 4, doomed_reports), daemon=True)
    restarted = ctx.Process(target=fleet_workers.lone_receiver, args=(cfg, 1, 2, 4, restarted_reports), daemon=True)
    doomed.start()
    receiver = WeightReceiver(fleet_workers.model(), config=cfg, rank=0, world_size=2, commit="staged")
    try:
        assert receiver.wait_for(1, timeout=scaled(60)) == 1
        assert _next(doomed_reports, 1, scaled(60), doomed) == (1, 1, [1.0])
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.join()
        receiver.control.set("go/2", True)
        with pytest.raises(SyncError):
            receiver.wait_for(2, timeout=scaled(60))
        receiver.control.set("go/3", True)
        assert receiver.wait_for(3, timeout=scaled(60)) == 3
        assert receiver.commit() == 3 and _values(receiver) == {3.0}
        restarted.start()
        deadline = time.monotonic() + scaled(60)
        # Two first registrations count one each; the restarted one replaces a meta and counts two.
        while receiver.control.add("recv/epoch", 0) < 4:
            assert time.monotonic() < deadline, "the restarted receiver did not register"
            time.sleep(0.1)
        receiver.control.set("go/4", True)
        assert receiver.wait_for(4, timeout=scaled(60)) == 4
        assert _next(restarted_reports, 1, scaled(60), restarted) == (1, 4, [4.0])
        restarted.join(timeout=scaled(30))
    finally:
        outcome = _finish(trainer, trainer_results)
        receiver.close()
        for process in (doomed, restarted):  # a failed assertion must not leave one behind
            if process.is_alive():
                process.kill()
    for rank in (0, 1):
        lines = outcome[rank].splitlines()
        assert lines[0] == "1: ok" and ("SyncTimeout" in lines[1] or "SyncError" in lines[1]), outcome
        assert lines[2:] == ["3: ok", "4: ok"], outcome
