"""The sender's long-lived threads: one runs every push in turn, another the pipeline's transfers.

A fresh ``threading.Thread`` per push cost the trainer ~0.8 ms inside ``push()``:
``Thread.start`` waits until the new thread runs, and that thread then holds the GIL.
Handing a job to a waiting thread through a queue returns at once.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

log = logging.getLogger("fsdp_sync")


class PushThread:
    """Runs submitted callables one after another; ``finished`` is set when each one returns."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], finished: threading.Event) -> None:
        self._jobs.put((job, finished))

    def stop(self) -> None:
        """Ends the thread once the jobs already submitted ran."""
        self._jobs.put(None)

    def _serve(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, finished = item
            try:
                job()  # reports its own outcome (the sender's _run catches its push's errors)
            except BaseException:  # noqa: BLE001 - a dead thread would leave every later push waiting
                log.exception("fsdp_sync: a push job raised outside its push")
            finally:
                finished.set()
