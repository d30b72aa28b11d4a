"""One process per receiver rank: an atomic claim on the store, kept alive by a heartbeat.

Two processes registering one rank would split every version between them: senders
write into whichever registered last, while the other keeps reporting versions that its
tensors do not hold. So a receiver claims its rank with a compare-and-set before it
registers. A newcomer takes over a claim only once the holder's heartbeat has stopped (the
holder died without closing); a newcomer refused for a live claim marks it contested, so
the holder's ``wait_for`` raises as well and both processes hear of the mistake.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from .control import ControlPlane
from .errors import SyncError

HEARTBEAT_S = 0.5  # how often a holder proves it is alive
STALE_AFTER_S = 4.0  # a claim whose heartbeat did not move for this long belongs to a dead process


def claim_key(rank: int) -> str:
    return f"recv/claim/{rank}"


def heartbeat_key(rank: int) -> str:
    return f"recv/heartbeat/{rank}"


def contested_key(rank: int) -> str:
    return f"recv/contested/{rank}"


def _who() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


class RankClaim:
    """Holds receiver rank ``rank`` of one job until ``release()``; raises SyncError if a live process holds it."""

    def __init__(self, control: ControlPlane, rank: int, *, stale_after_s: float = STALE_AFTER_S):
        self.control, self.rank = control, rank
        self.token = f"{uuid.uuid4().hex} {_who()}"
        store = control.store
        current = store.compare_set(claim_key(rank), "", self.token).decode()
        if current != self.token:
            if self._holder_alive(stale_after_s):
                holder = current.partition(" ")[2]
                store.set(contested_key(rank), f"{_who()} tried to register receiver rank {rank} too")
                raise SyncError(f"receiver rank {rank} of job {control.job!r} is already held by a live receiver "
                                f"({holder}); each process of the inference job needs its own rank (under torchrun "
                                f"they come from RANK/WORLD_SIZE; else pass rank= and world_size=)")
            current = store.compare_set(claim_key(rank), current, self.token).decode()
            if current != self.token:
                raise SyncError(f"receiver rank {rank} of job {control.job!r}: another process took over the "
                                f"stale claim at the same time ({current.partition(' ')[2]})")
        if store.check([contested_key(rank)]):
            store.delete_key(contested_key(rank))  # left by an earlier conflict: not about this holder
        store.add(heartbeat_key(rank), 1)
        self.contested: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"fsdp_sync-claim-{rank}", daemon=True)
        self._thread.start()

    def _holder_alive(self, stale_after_s: float) -> bool:
        """Whether the heartbeat moves within ``stale_after_s`` (a dead holder's does not)."""
        store = self.control.store
        first = store.add(heartbeat_key(self.rank), 0)
        deadline = time.monotonic() + stale_after_s
        while time.monotonic() < deadline:
            time.sleep(HEARTBEAT_S / 2)
            if store.add(heartbeat_key(self.rank), 0) != first:
                return True
        return False

    def _beat(self) -> None:
        store = self.control.store
        while not self._stop.wait(HEARTBEAT_S):
            try:
                store.add(heartbeat_key(self.rank), 1)
                if self.contested is None and store.check([contested_key(self.rank)]):
                    self.contested = store.get(contested_key(self.rank)).decode()
                    store.delete_key(contested_key(self.rank))
            except Exception:  # noqa: BLE001 - the store is gone; the receiver's loop reports that
                return

    def release(self) -> None:
        """Stop the heartbeat and give the rank back (only if this process still holds it)."""
        self._stop.set()
        self._thread.join(timeout=2 * HEARTBEAT_S)
        try:
            # An empty claim is free: a newcomer's compare-and-set from "" takes it, as for a missing key.
            self.control.store.compare_set(claim_key(self.rank), self.token, "")
        except Exception:  # noqa: BLE001 - the store is gone: so is the claim
            pass
