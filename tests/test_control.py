"""The control plane's waits and failure bookkeeping, on a real TCPStore."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from fsdp_sync.control import PUSH_FAILURES, ControlPlane, done_key, push_key, sender_error_key
from fsdp_sync.errors import SyncError, SyncTimeout
from recipes.jobs import free_port


@pytest.fixture
def control() -> ControlPlane:
    store = dist.TCPStore("127.0.0.1", free_port(), is_master=True, timeout=timedelta(seconds=10),
                          wait_for_workers=False)
    return ControlPlane(store, "control-test", timeout_s=5.0)


def test_wait_each_ends_when_every_rank_is_done_or_failed(control):
    entries = [(done_key(1, r), sender_error_key(1, r)) for r in range(3)]
    control.set(done_key(1, 0), True)
    control.set(sender_error_key(1, 1), "sender 1 failed")
    threading.Timer(0.05, lambda: control.set(done_key(1, 2), True)).start()
    started = time.monotonic()
    control.wait_each(entries)
    assert time.monotonic() - started < 2


def test_wait_each_names_the_entries_still_open(control):
    entries = [(done_key(1, r), sender_error_key(1, r)) for r in range(3)]
    control.set(done_key(1, 1), True)
    with pytest.raises(SyncTimeout, match=r"ranks \[0, 2\]"):
        control.wait_each(entries, timeout_s=0.1, describe=lambda open_: f"ranks {open_}")


def test_a_failure_is_counted_and_then_found(control):
    keys = [sender_error_key(4, r) for r in range(2)]
    assert control.failure_in(4, keys) is None
    control.record_failure(4)
    control.set(sender_error_key(4, 1), "sender 1 failed in push 4")
    assert control.failure_in(4, keys) == "sender 1 failed in push 4"
    assert control.failure_in(5, keys) is None  # another push's failure is not this one's
    control.record_failure(5)
    assert control.add(PUSH_FAILURES, 0) == 2


def test_a_wait_aborted_by_another_side_names_only_the_keys_still_missing(control):
    """Several keys are read only once all exist, so the ones already set were never read; the
    error must still name only the missing one (a sender waiting for two receivers' ready keys
    that fails on a live receiver's report must blame the dead one)."""
    keys = [f"ready/7/{r}" for r in range(3)]
    control.set(keys[0], True)
    control.set(keys[2], True)
    with pytest.raises(SyncError, match=r"receiver 0 gave up \(this side still waited for \['ready/7/1'\]\)"):
        control.wait_values(keys, accept=lambda v: v is True, describe=lambda ks: str(ks),
                            abort=lambda: "receiver 0 gave up")
    with pytest.raises(SyncTimeout, match=r"waiting for \['ready/7/1'\]"):
        control.wait_values(keys, timeout_s=0.05, describe=lambda ks: str(ks))


def test_get_many_reads_values_in_order_in_one_call(control):
    control.set_many({"a": ("go", 1), "b": "ok", "c": [3]})
    assert control.get_many(["c", "a", "b"]) == [[3], ("go", 1), "ok"]
    assert control.get_many([]) == []


def test_one_key_is_read_in_one_round_trip_and_a_missing_one_is_not_made(control):
    """A wait for one key (an ack, a done key, the announcement) reads it with compare_set,
    which answers a missing key without creating it."""
    assert control._try_get("ack") is None and not control.has("ack")
    assert control.announcement(7) is None and not control.has(push_key(7))
    control.set(push_key(7), ("go", 3, "fp", 0, None, False))
    assert control.announcement(7) == ("go", 3, "fp", 0, None, False)
    control.set("ack", "forged shape")  # refused by accept: as if not written yet
    threading.Timer(0.05, lambda: control.set("ack", ["ok"])).start()
    assert control.wait_values(["ack"], accept=lambda v: isinstance(v, list), timeout_s=5.0) == [["ok"]]
    with pytest.raises(SyncTimeout):
        control.wait_values(["never"], timeout_s=0.05)
    assert not control.has("never")


def test_ports_picked_before_any_is_bound_never_repeat():
    """A test picks its cases' control ports, then its jobs' rendezvous ports, before any
    server binds one: two equal picks failed a CI run with EADDRINUSE."""
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
