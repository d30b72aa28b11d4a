"""Doorbells: a peer on the host that sets a key another waits for wakes it at once.

Unit tests of the socket itself, then a real trainer process pushing to a receiver in
this process whose polls were made 60 s long: its pushes land within a 15 s timeout only
because each announcement and done key rings the receiver's doorbell.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from fsdp_sync import SyncConfig, WeightReceiver
from fsdp_sync import control as control_module
from fsdp_sync import receiver as receiver_module
from fsdp_sync.control import ControlPlane, bell_key
from fsdp_sync.doorbell import Doorbell, ring, same_host
from recipes.jobs import free_port, spawn_context, start_job
from tests import wire_workers
from tests.commit_workers import _model


def test_a_ring_ends_a_pause_and_a_ring_before_it_too():
    bell = Doorbell.open()
    assert bell is not None  # Linux: abstract Unix sockets
    try:
        bell.sleep(0.0)  # a thread's first pause ends at once (it cannot know which rings it saw)
        threading.Timer(0.2, ring, args=([bell.address],)).start()
        started = time.monotonic()
        bell.sleep(30.0)
        assert time.monotonic() - started < 20.0, "the ring did not end the pause"
        ring([bell.address])  # rung while nobody waits: the next pause ends at once
        started = time.monotonic()
        bell.sleep(30.0)
        assert time.monotonic() - started < 20.0
        bell.sleep(0.01)  # drained: a plain pause again, not an endless early return
    finally:
        bell.close()
    ring([bell.address, "fsdp_sync-nobody-listens-here"])  # gone or never there: no error
    bell.sleep(0.01)  # closed: a plain pause


def test_a_ring_another_thread_drained_still_ends_this_threads_next_pause():
    """Two threads of one process pause on one doorbell. A ring that the other thread drains
    (as it would between this thread's look at its key and its pause) must not leave this
    thread asleep for its whole pause."""
    bell = Doorbell.open()
    assert bell is not None
    try:
        bell.sleep(0.0)  # this thread's first pause: now it has seen every ring so far
        # The other thread's first pause ends at once too; its second selects on the socket.
        other = threading.Thread(target=lambda: (bell.sleep(0.0), bell.sleep(30.0)))
        other.start()
        time.sleep(0.2)
        ring([bell.address])
        other.join(timeout=20)
        assert not other.is_alive(), "the ring did not end the other thread's pause"
        assert bell._rings == 1  # the other thread drained it: this one never saw the datagram
        started = time.monotonic()
        bell.sleep(30.0)  # the ring came after this thread's last pause: poll at once
        assert time.monotonic() - started < 20.0, "a ring drained by another thread was lost to this one"
        started = time.monotonic()
        bell.sleep(0.05)  # seen: a plain pause again
        assert time.monotonic() - started >= 0.04
    finally:
        bell.close()


def test_a_ring_ends_the_pauses_of_every_thread_waiting_on_it():
    bell = Doorbell.open()
    assert bell is not None
    try:
        for _ in range(2):
            bell.sleep(0.0)
        ended: list[float] = []
        threads = [threading.Thread(target=lambda: (bell.sleep(0.0), bell.sleep(30.0), ended.append(time.monotonic())))
                   for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.3)  # one selects, two wait for its lock
        rung = time.monotonic()
        ring([bell.address])
        for t in threads:
            t.join(timeout=20)
        assert len(ended) == 3 and max(ended) - rung < 10.0, ended
    finally:
        bell.close()


def test_only_published_bells_on_this_host_are_rung():
    here = socket.gethostname()
    values = [(here, "a"), ("other-host", "b"), ("", ""), (here, ""), "forged shape", (here, 7)]
    assert same_host(values, here) == ["a"]


def test_pushes_land_through_doorbells_when_polling_alone_would_miss_the_timeout(monkeypatch, tmp_path):
    # The receiver's polls (idle, and waiting for done keys) pause 60 s; the push timeout is 15 s.
    monkeypatch.setattr(receiver_module, "_IDLE_POLL_S", 60.0)
    monkeypatch.setattr(receiver_module, "_IDLE_POLL_MIN_S", 60.0)
    monkeypatch.setattr(control_module, "_POLL_MIN_S", 60.0)
    monkeypatch.setattr(control_module, "_POLL_FLOOR_S", 60.0)
    monkeypatch.setattr(control_module, "_POLL_MAX_S", 60.0)
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    cfg = SyncConfig(control=f"127.0.0.1:{port}", job="bells", transport="shm", host_control=False, timeout_s=15.0,
                     trace_dir=str(tmp_path))
    ctx = spawn_context()
    results, commands = ctx.Queue(), ctx.Queue()
    procs = start_job(ctx, wire_workers.trainer, 1, results, [cfg], commands, results)
    recv = None
    try:
        recv = WeightReceiver(_model(), config=cfg)
        for version in (1, 2, 3):
            commands.put(version)
            item = results.get(timeout=60)
            assert item[:3] == ("pushed", "bells", version) and item[3] == "ok", item
            assert recv.wait_for(version, timeout=30) == version
        sender_bell = ControlPlane(store, "bells", 5.0).get(bell_key("sender", 0))
        assert recv._ring == [sender_bell[1]] and sender_bell[0] == recv.host
        # Each push's Chrome trace holds its steps, announcing and acks included.
        events = json.loads((tmp_path / "push3.rank0.trace.json").read_text())["traceEvents"]
        assert {"scan", "plan", "go", "handoff", "done", "acks"} <= {e["name"] for e in events if e.get("ph") == "X"}
        commands.put("next")
    finally:
        if recv is not None:
            recv.close()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
