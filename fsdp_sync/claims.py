"""One holder per role: an atomic claim on the store, kept alive by a heartbeat.

Two processes registering one receiver rank would split every version between them:
senders write into whichever registered last, while the other keeps reporting versions
that its tensors do not hold. Two trainer jobs under one job name would mix two models in
one version. So a receiver claims its rank, and a trainer's rank 0 claims the job, with a
compare-and-set before anything is registered. A newcomer takes over a claim only once the
holder's heartbeat has stopped (the holder died without closing); a newcomer refused for a
live claim marks it contested, so the holder hears of the mistake too.
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


def claim_key(role: str) -> str:
    return f"claim/{role}"


def heartbeat_key(role: str) -> str:
    return f"claim/{role}/heartbeat"


def contested_key(role: str) -> str:
    return f"claim/{role}/contested"


def _who() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


class Claim:
    """Holds ``role`` of one job until ``release()``; raises SyncError if a live process holds it.

    ``what`` names the role in messages ("receiver rank 3"), ``hint`` says how to avoid the
    clash, and ``label`` is kept in the claim for whoever is refused (e.g. a trainer's run id).
    """

    def __init__(self, control: ControlPlane, role: str, *, what: str, hint: str, label: str = "",
                 stale_after_s: float = STALE_AFTER_S):
        self.control, self.role = control, role
        self.token = f"{uuid.uuid4().hex} {label or _who()}"
        store = control.store
        current = store.compare_set(claim_key(role), "", self.token).decode()
        if current != self.token:
            if self._holder_alive(stale_after_s):
                holder = current.partition(" ")[2]
                store.set(contested_key(role), f"{label or _who()} tried to take {what} too")
                raise SyncError(f"{what} of job {control.job!r} is already held by a live process ({holder}); {hint}")
            current = store.compare_set(claim_key(role), current, self.token).decode()
            if current != self.token:
                raise SyncError(f"{what} of job {control.job!r}: another process took over the stale claim at "
                                f"the same time ({current.partition(' ')[2]})")
        if store.check([contested_key(role)]):
            store.delete_key(contested_key(role))  # left by an earlier conflict: not about this holder
        store.add(heartbeat_key(role), 1)
        self.contested: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"fsdp_sync-claim-{role}", daemon=True)
        self._thread.start()

    def _holder_alive(self, stale_after_s: float) -> bool:
        """Whether the heartbeat moves within ``stale_after_s`` (a dead holder's does not)."""
        store = self.control.store
        first = store.add(heartbeat_key(self.role), 0)
        deadline = time.monotonic() + stale_after_s
        while time.monotonic() < deadline:
            time.sleep(HEARTBEAT_S / 2)
            if store.add(heartbeat_key(self.role), 0) != first:
                return True
        return False

    def _beat(self) -> None:
        store = self.control.store
        while not self._stop.wait(HEARTBEAT_S):
            try:
                store.add(heartbeat_key(self.role), 1)
                if self.contested is None and store.check([contested_key(self.role)]):
                    self.contested = store.get(contested_key(self.role)).decode()
                    store.delete_key(contested_key(self.role))
            except Exception:  # noqa: BLE001 - the store is gone; the holder's own loop reports that
                return

    def release(self) -> None:
        """Stop the heartbeat and give the role back (only if this process still holds it)."""
        self._stop.set()
        self._thread.join(timeout=2 * HEARTBEAT_S)
        try:
            # An empty claim is free: a newcomer's compare-and-set from "" takes it, as for a missing key.
            self.control.store.compare_set(claim_key(self.role), self.token, "")
        except Exception:  # noqa: BLE001 - the store is gone: so is the claim
            pass


def trainer_holder(control: ControlPlane) -> str:
    """Who holds the trainer role now ("" when nobody does): a new trainer job's claim differs."""
    store = control.store
    return store.get(claim_key("trainer")).decode() if store.check([claim_key("trainer")]) else ""


def receiver_held(control: ControlPlane, rank: int) -> bool:
    """Whether a process holds receiver rank ``rank`` now (one that closed gave it back)."""
    store = control.store
    key = claim_key(f"recv/{rank}")
    return store.check([key]) and store.get(key) != b""


def receiver_claim(control: ControlPlane, rank: int) -> Claim:
    return Claim(control, f"recv/{rank}", what=f"receiver rank {rank}",
                 hint="each process of the inference job needs its own rank (under torchrun they come from "
                      "RANK/WORLD_SIZE; else pass rank= and world_size=)")


def trainer_claim(control: ControlPlane, run_id: str) -> Claim:
    return Claim(control, "trainer", what="the trainer", label=f"trainer run {run_id} ({_who()})",
                 hint="another trainer job runs under this SyncConfig.job and control: stop it, or give this "
                      "job its own `job` (and port)")
