"""The staged executor's byte budget: a product that holds nothing does not hold up the next.

Transfers here block until the test lets them go, so what the producer may start meanwhile
is observed directly, with no timing.
"""

from __future__ import annotations

import threading
import time

import pytest

from fsdp_sync.pipeline import ByteBudget, run_pipeline
from fsdp_sync.push_thread import PushThread
from fsdp_sync.trace import Trace


def _run(held, produced: list[int], gate: threading.Event, *, worker=None) -> ByteBudget:
    budget = ByteBudget(watermark_bytes=100)

    def transfer(item: int) -> None:
        if not gate.wait(timeout=30):
            raise TimeoutError("the test never opened the gate")

    run_pipeline(range(4), nbytes=lambda i: 60, produce=lambda i: produced.append(i) or i, transfer=transfer,
                 budget=budget, trace=Trace(0), worker=worker, held=held)
    return budget


def test_products_written_in_place_let_every_bucket_start_before_the_first_transfer_ends():
    produced: list[int] = []
    gate = threading.Event()
    worker = PushThread("test-transfer")
    try:
        done = threading.Thread(target=lambda: _run(lambda item: 0, produced, gate, worker=worker))
        done.start()
        deadline = time.monotonic() + 30
        while len(produced) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        # All four were produced while the first transfer still waited: nothing was held.
        assert produced == [0, 1, 2, 3] and not gate.is_set()
        gate.set()
        done.join(timeout=30)
        assert not done.is_alive()
    finally:
        worker.stop()


@pytest.mark.parametrize("held", [None, lambda item: 60])
def test_products_that_hold_their_bytes_wait_for_the_budget(held):
    produced: list[int] = []
    gate = threading.Event()
    box: list[ByteBudget] = []
    done = threading.Thread(target=lambda: box.append(_run(held, produced, gate)))
    done.start()
    done.join(timeout=0.5)
    # 60 + 60 > 100: the second waits until the first transfer releases its bytes.
    assert produced == [0] and done.is_alive()
    gate.set()
    done.join(timeout=30)
    assert produced == [0, 1, 2, 3] and box[0].peak <= 100 and box[0].in_flight == 0


def test_slots_let_an_item_start_only_once_the_one_that_many_before_it_is_transferred():
    """Staging slots (fsdp_sync.staging): item i reuses item i - 2's memory, so it must not be
    produced before that transfer ended, even when the byte budget would let it."""
    produced: list[int] = []
    transferred: list[int] = []
    seen: list[tuple[int, list[int]]] = []  # (item, what was transferred when its production began)
    gates = [threading.Event() for _ in range(5)]

    def produce(i: int) -> int:
        seen.append((i, list(transferred)))
        produced.append(i)
        return i

    def transfer(i: int) -> None:
        if not gates[i].wait(timeout=30):
            raise TimeoutError("the test never opened the gate")
        transferred.append(i)

    done = threading.Thread(target=lambda: run_pipeline(
        range(5), nbytes=lambda i: 1, produce=produce, transfer=transfer, budget=ByteBudget(watermark_bytes=100),
        trace=Trace(0), slots=2))
    done.start()
    deadline = time.monotonic() + 30
    while len(produced) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # room for a wrong third start to show
    assert produced == [0, 1]
    for i in range(5):
        gates[i].set()
        deadline = time.monotonic() + 30
        while len(transferred) <= i and time.monotonic() < deadline:
            time.sleep(0.01)
    done.join(timeout=30)
    assert not done.is_alive() and transferred == [0, 1, 2, 3, 4]
    assert all(i < 2 or i - 2 in before for i, before in seen), seen


def test_slots_do_not_hang_a_failed_transfer():
    """A transfer error ends the pipeline with that error when items wait for slots (a smoke
    test: the transfer loop frees each slot whatever happens, so the producer never waits
    on a slot that will not come back)."""
    def transfer(i: int) -> None:
        raise RuntimeError(f"transfer {i} failed")

    with pytest.raises(RuntimeError, match="transfer 0 failed"):
        run_pipeline(range(6), nbytes=lambda i: 1, produce=lambda i: i, transfer=transfer,
                     budget=ByteBudget(watermark_bytes=100), trace=Trace(0), slots=1)
