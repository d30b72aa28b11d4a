"""The staged executor: pack buckets on one thread while the previous ones transfer.

The producer (the caller's thread) runs gather/H2D and quantize+pack per bucket; a
transfer thread sends and then releases the bucket's memory. A byte budget (the
watermark) bounds temporary bytes in flight: a bucket waits until it fits, except when
nothing else is in flight, so one oversized bucket can still pass alone. With ``slots``
at most that many buckets are between the start of their packing and the end of their
transfer (the packer's staging slots, ``fsdp_sync.staging``).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, TypeVar

from .push_thread import PushThread
from .trace import Trace

Item = TypeVar("Item")
_DONE = object()


class ByteBudget:
    """Blocks acquirers while the bytes in flight would exceed the watermark."""

    def __init__(self, watermark_bytes: int):
        self.watermark = watermark_bytes
        self.in_flight = 0
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, stop: threading.Event) -> None:
        with self._cond:
            while self.in_flight and self.in_flight + nbytes > self.watermark and not stop.is_set():
                self._cond.wait(0.05)
            self.in_flight += nbytes
            self.peak = max(self.peak, self.in_flight)

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.in_flight -= nbytes
            self._cond.notify_all()


def _acquire(free: threading.Semaphore, stop: threading.Event) -> bool:
    """Take a slot, or give up (False) once ``stop`` is set."""
    while not free.acquire(timeout=0.05):
        if stop.is_set():
            return False
    return True


def run_pipeline(work: Iterable[Item], *, nbytes: Callable[[Item], int], produce: Callable[[Item], object],
                 transfer: Callable[[object], None], budget: ByteBudget, trace: Trace,
                 worker: PushThread | None = None, held: Callable[[object], int] | None = None,
                 slots: int | None = None) -> None:
    """Run ``produce`` then ``transfer`` on every item, the two stages overlapping.

    Each item reserves ``nbytes(item)`` of the budget while it is produced; ``held(packed)``
    (default: all of it) says how much of that its product still holds until transferred.
    Weights written straight into their destinations hold nothing: the next bucket's
    launches then need not wait for this one's transfer, and the GPU never idles between
    buckets for the want of memory that is not used.

    The transfers run on ``worker``, a long-lived thread (a fresh one if None: starting a
    thread costs ~0.1-0.8 ms, as the new thread takes the GIL before ``start`` returns).
    An error on either side stops the other and is raised here.

    ``slots``: the i-th item is produced only once item i - slots has been transferred.
    """
    handoff: queue.Queue = queue.Queue()
    stop = threading.Event()
    errors: list[BaseException] = []
    free = threading.Semaphore(slots) if slots else None

    def transfer_loop() -> None:
        while True:
            entry = handoff.get()
            if entry is _DONE:
                return
            packed, size = entry
            try:
                if not stop.is_set():
                    with trace.span("transfer"):
                        transfer(packed)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                errors.append(e)
                stop.set()
            finally:
                del packed
                with trace.span("release"):
                    budget.release(size)
                    if free is not None:
                        free.release()

    transfers_ended = threading.Event()
    own = worker is None
    if own:
        worker = PushThread("fsdp_sync-transfer")
    worker.submit(transfer_loop, transfers_ended)
    try:
        for item in work:
            if stop.is_set():
                break
            if free is not None and not _acquire(free, stop):
                break
            size = nbytes(item)
            budget.acquire(size, stop)
            try:
                packed = produce(item)
            except BaseException:
                budget.release(size)
                if free is not None:
                    free.release()
                raise
            if held is not None:
                keep = min(size, held(packed))
                budget.release(size - keep)
                size = keep
            handoff.put((packed, size))
    except BaseException as e:
        errors.append(e)
        stop.set()
    finally:
        handoff.put(_DONE)
        transfers_ended.wait()
        if own:
            worker.stop()
    if errors:
        raise errors[0]
