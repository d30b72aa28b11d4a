"""Faults of a live fleet, each with real processes: what every side raises, and how long it took.

Each case kills or stops one process (a sender, a receiver, the trainer's rank 0 that hosts
the store) mid-push or between pushes, or leaves a receiver out. Every live side must end
in SyncError (SyncTimeout, TrainerGone and ControlPlaneLost are kinds of it) within 1.25 x
timeout_s, and a staged receiver keeps its last whole version. Each case prints a
``fault-table`` line; the README's table comes from them.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from fsdp_sync import SyncConfig, SyncError, WeightReceiver
from recipes.jobs import free_port, spawn_context, start_job
from tests import fleet_workers
from tests.timeouts import scaled

TIMEOUT_S = scaled(3)  # each case waits one timeout for its fault: 12 s at CI's scale
LIMIT_S = 1.25 * TIMEOUT_S


def _config(job: str) -> SyncConfig:
    return SyncConfig(control=f"127.0.0.1:{free_port()}", job=job, transport="shm", timeout_s=TIMEOUT_S,
                      connect_timeout_s=scaled(60), watermark_mb=0.005)


class Fleet:
    """A trainer job (``senders`` processes) and this process's staged receiver of rank 0."""

    def __init__(self, cfg: SyncConfig, *, senders: int = 2, versions=(1, 2), stall=None, receivers: int = 1,
                 extra_receiver: bool = False):
        self.cfg, self.ctx = cfg, spawn_context()
        self.results = self.ctx.Queue()
        self.trainer = start_job(self.ctx, fleet_workers.trainer, senders, self.results, cfg, list(versions),
                                 "go", stall)
        self.replica = self.ctx.Queue()
        self.other = None
        if extra_receiver:  # receiver rank 1, a process of its own
            self.other = self.ctx.Process(target=fleet_workers.lone_receiver, args=(cfg, 1, receivers, 9, self.replica))
            self.other.start()
        self.receiver = WeightReceiver(fleet_workers.model(), config=cfg, rank=0, world_size=receivers,
                                       commit="staged")

    def serve_version_1(self) -> None:
        assert self.receiver.wait_for(1, timeout=scaled(60)) == 1 and self.receiver.commit() == 1

    def assert_still_version_1(self) -> None:
        assert self.receiver.commit() == 1 and _values(self.receiver) == {1.0}

    def report_push_2(self, case: str, receiver_kind: str, receiver_s: float) -> None:
        """The table line for a fault trainer rank 0 survives: its push of version 2 failed too."""
        push_kind, push_s = _push_error(self.trainer_outcome()[0], 2)
        _report(case, f"rank 0: {push_kind}", receiver_kind, max(receiver_s, push_s))

    def wait_key(self, key: str) -> None:
        deadline = time.monotonic() + scaled(60)
        while not self.receiver.control.has(key):
            assert time.monotonic() < deadline, f"no {key}"
            time.sleep(0.01)

    def receiver_error(self, version: int) -> tuple[str, float]:
        """What this process's wait_for(version) raised, and after how long."""
        started = time.monotonic()
        with pytest.raises(SyncError) as info:
            self.receiver.wait_for(version, timeout=scaled(60))
        return type(info.value).__name__, time.monotonic() - started

    def trainer_outcome(self) -> dict[int, str]:
        """Trainer rank -> its report, from every rank that was not killed."""
        alive = [rank for rank, p in enumerate(self.trainer) if p.exitcode != -signal.SIGKILL]
        try:
            return fleet_workers.reports(self.trainer, self.results, scaled(120), ranks=alive)
        finally:
            self.close()

    def close(self) -> None:
        for p in self.trainer + ([self.other] if self.other else []):
            if p.is_alive():
                p.join(timeout=scaled(10))
            if p.is_alive():
                p.kill()
        self.receiver.close()


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()


def _push_error(outcome: str, version: int) -> tuple[str, float]:
    """(error type, seconds) of ``version``'s line in a trainer rank's report."""
    line = next(line for line in outcome.splitlines() if line.startswith(f"{version}: "))
    m = re.match(rf"{version}: (\w+): .*\[(\d+\.\d+)s\]$", line, re.S)
    assert m, line
    return m.group(1), float(m.group(2))


def _report(case: str, trainer: str, receiver: str, seconds: float) -> None:
    print(f"fault-table | {case} | {trainer} | {receiver} | {seconds / TIMEOUT_S:.2f}")
    assert seconds <= LIMIT_S, f"{case}: {seconds:.1f}s > 1.25 x timeout_s ({LIMIT_S:.1f}s)"


_values = fleet_workers.values


def test_a_push_job_that_raises_leaves_the_push_thread_serving_and_its_handle_failing():
    """Work after a push's own error handling (its trace, its result) can still raise: the
    long-lived thread must run the next push, and the handle must fail, not hang or KeyError."""

    from fsdp_sync.push_thread import PushThread
    from fsdp_sync.sender import PushHandle

    thread, ran = PushThread("test-push"), []
    broken, later = PushHandle(1, 1), PushHandle(2, 2)

    def fails() -> None:
        raise OSError("trace_dir is not writable")

    def lands() -> None:
        later._outcome["result"] = "pushed"
        ran.append(2)

    thread.submit(fails, broken._finished)
    thread.submit(lands, later._finished)
    assert later._finished.wait(timeout=10) and ran == [2]
    with pytest.raises(SyncError, match="version 1 ended without a result"):
        broken.wait(timeout=10)
    assert later.wait(timeout=10) == "pushed"
    thread.stop()


def test_a_push_whose_acks_failed_raises_at_once_when_waited_for_again():
    """close() waits for the push in flight: after the acks timed out in wait(), it must get
    that error back, not wait a second timeout for the same acks (a trainer's close after a
    dead receiver took 2 x timeout_s)."""
    from fsdp_sync.errors import SyncTimeout
    from fsdp_sync.sender import PushHandle

    calls = []

    def acks() -> None:
        calls.append(1)
        raise SyncTimeout("timed out after 4.0s waiting for receivers [1] to commit version 2")

    handle = PushHandle(2, 2, _after=acks)
    handle._outcome["result"] = object()
    handle._finished.set()  # the push thread ran it
    for _ in range(2):
        with pytest.raises(SyncTimeout, match="receivers \\[1\\]"):
            handle.wait()
    assert calls == [1]


def test_killed_sender_mid_push():
    fleet = Fleet(_config("kill-sender-mid"), stall=(1, 2))
    fleet.serve_version_1()
    fleet.receiver.control.set("go/2", True)
    fleet.wait_key("stalled/1")
    _kill(fleet.trainer[1])
    kind, seconds = fleet.receiver_error(2)
    fleet.assert_still_version_1()
    fleet.report_push_2("sender killed mid-push", kind, seconds)


def test_killed_sender_between_pushes():
    fleet = Fleet(_config("kill-sender-idle"))
    fleet.serve_version_1()
    _kill(fleet.trainer[1])
    fleet.receiver.control.set("go/2", True)
    kind, seconds = fleet.receiver_error(2)
    fleet.assert_still_version_1()
    fleet.report_push_2("sender killed between pushes", kind, seconds)


def test_stopped_sender_mid_push():
    fleet = Fleet(_config("stop-sender"), stall=(1, 2))
    fleet.serve_version_1()
    fleet.receiver.control.set("go/2", True)
    fleet.wait_key("stalled/1")
    os.kill(fleet.trainer[1].pid, signal.SIGSTOP)
    try:
        kind, seconds = fleet.receiver_error(2)
        fleet.assert_still_version_1()
    finally:
        os.kill(fleet.trainer[1].pid, signal.SIGCONT)
        fleet.receiver.control.set("release/1", True)
    fleet.report_push_2("sender stopped (SIGSTOP) mid-push", kind, seconds)


def test_killed_store_host_mid_push():
    fleet = Fleet(_config("kill-host-mid"), stall=(0, 2))
    fleet.serve_version_1()
    fleet.receiver.control.set("go/2", True)
    fleet.wait_key("stalled/0")
    _kill(fleet.trainer[0])
    kind, seconds = fleet.receiver_error(2)
    fleet.assert_still_version_1()
    outcome = fleet.trainer_outcome()
    assert "ControlPlaneLost" in outcome[1] or "SyncError" in outcome[1] or "SyncTimeout" in outcome[1], outcome
    _report("store host (trainer rank 0) killed mid-push", "rank 1: " + _first_error(outcome[1]), kind, seconds)


def test_killed_store_host_between_pushes():
    fleet = Fleet(_config("kill-host-idle"), senders=1)
    fleet.serve_version_1()
    started = time.monotonic()
    _kill(fleet.trainer[0])
    kind, _ = fleet.receiver_error(2)
    seconds = time.monotonic() - started
    assert kind == "TrainerGone"
    fleet.assert_still_version_1()
    fleet.close()
    _report("store host killed between pushes", "(dead)", kind, seconds)


def test_killed_receiver_mid_push():
    fleet = Fleet(_config("kill-recv-mid"), senders=1, receivers=2, extra_receiver=True, stall=(0, 2))
    fleet.serve_version_1()
    fleet.receiver.control.set("go/2", True)
    fleet.wait_key("stalled/0")
    _kill(fleet.other)
    fleet.receiver.control.set("release/0", True)
    outcome = fleet.trainer_outcome()
    push_kind, push_s = _push_error(outcome[0], 2)
    _report("receiver killed mid-push", f"rank 0: {push_kind}", "receiver 0 lands it (its bytes all came)", push_s)


def test_killed_receiver_between_pushes():
    # The live receiver's timeout and the sender's wait for the dead one race; either way the
    # trainer's error names receiver 1, the one that never opened its buffers.
    fleet = Fleet(_config("kill-recv-idle"), senders=1, receivers=2, extra_receiver=True)
    fleet.serve_version_1()
    assert fleet.replica.get(timeout=scaled(60))[:2] == (1, 1)
    _kill(fleet.other)
    fleet.receiver.control.set("go/2", True)
    kind, seconds = fleet.receiver_error(2)
    fleet.assert_still_version_1()
    outcome = fleet.trainer_outcome()
    push_kind, push_s = _push_error(outcome[0], 2)
    assert "receivers [1]" in outcome[0], outcome
    _report("receiver killed between pushes", f"rank 0: {push_kind}", kind, max(seconds, push_s))


def test_a_receiver_that_never_starts():
    cfg = _config("never")
    fleet = Fleet(cfg, senders=1, receivers=2, versions=(1,))
    kind, seconds = fleet.receiver_error(1)
    outcome = fleet.trainer_outcome()
    push_kind, push_s = _push_error(outcome[0], 1)
    assert "receiver ranks [1] to register" in outcome[0], outcome
    _report("a receiver never starts", f"rank 0: {push_kind}", kind, max(seconds, push_s))


def _first_error(outcome: str) -> str:
    m = re.search(r"(ControlPlaneLost|SyncTimeout|SyncError|TrainerGone)", outcome)
    return m.group(1) if m else outcome[:80]


def test_a_push_trace_is_written_once_its_acks_are_in(tmp_path):
    """With trace_dir, the Chrome trace holds the push's every span, the acks' too, and is
    written once, however often the handle is waited for; a failed push's trace as well."""
    import json

    from fsdp_sync.sender import PushHandle, PushResult
    from fsdp_sync.trace import Trace

    trace = Trace(3)
    with trace.span("scan"):
        pass
    handle = PushHandle(7, 5, _after=lambda: time.sleep(0.01), _trace=trace, _trace_dir=str(tmp_path))
    handle._outcome["result"] = PushResult(7, 5, 0.1, 0, {}, 0)
    handle._finished.set()
    result = handle.wait(timeout=10)
    assert result.trace_path == str(tmp_path / "push5.rank3.trace.json") and result.acks_seconds >= 0.01
    names = {e["name"] for e in json.loads(open(result.trace_path).read())["traceEvents"] if e.get("ph") == "X"}
    assert names == {"scan", "acks"}
    open(result.trace_path, "w").close()
    assert handle.wait(timeout=10) is result and open(result.trace_path).read() == ""  # not written again

    failed = PushHandle(8, 6, _trace=Trace(3), _trace_dir=str(tmp_path))
    failed._outcome["error"] = SyncError("push 6 failed on sender 3")
    failed._finished.set()
    with pytest.raises(SyncError, match="push 6 failed"):
        failed.wait(timeout=10)
    assert (tmp_path / "push6.rank3.trace.json").exists()
