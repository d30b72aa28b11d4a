"""Host-local wake-ups for control-plane waits: a datagram tells a waiting peer to poll now.

Every wait of a push polls the store with a backoff (held at 0.25 ms with a few processes,
5 ms with hundreds; an idle receiver looks every 5 ms), so each hop of a push (the
announcement, each sender's done key, each receiver's ack) costs up to one poll interval.
A process that sets a key a peer on its host waits for also sends that peer a one-byte
datagram on a Unix socket in Linux's abstract namespace, and a waiter's pause between polls
is a ``select`` on its own socket: it polls at once.

The datagram carries nothing: the waiter still reads and verifies the key itself, so a
stray or forged one costs a poll and nothing else. Peers on other hosts, and systems
without abstract sockets, keep plain polling.
"""

from __future__ import annotations

import select
import socket
import sys
import threading
import time
import uuid
from typing import Iterable

_ringer: socket.socket | None = None
_ringer_lock = threading.Lock()


class Doorbell:
    """This process's wake-up socket; ``sleep`` is a pause that a ring ends early.

    Several threads of a process may pause at once (a sender's push thread and its caller),
    and a ring drained by one must still end the others' pauses: otherwise a thread that
    checked its key just before the ring, then found the socket emptied by another, would
    sleep its whole pause (up to a minute in tests that poll slowly, a flake). So one thread
    at a time selects on the socket, holding a lock; it counts the rings it drains; the
    others wait for the lock (as long as their own pause), and any thread whose count of
    rings seen is behind polls at once.
    """

    def __init__(self) -> None:
        self.address = f"fsdp_sync-{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind("\0" + self.address)
        except OSError:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        self._lock = threading.Lock()  # held by the one thread that selects on the socket
        self._rings = 0  # wake-ups drained so far (not datagrams: each drain counts once)
        self._seen = threading.local()  # per thread: ``_rings`` when its last pause ended

    @classmethod
    def open(cls) -> "Doorbell | None":
        """A new doorbell, or None where abstract Unix sockets are missing (not Linux)."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            return cls()
        except OSError:
            return None

    def sleep(self, seconds: float) -> None:
        """Pause up to ``seconds``; a ring ends it, and so does one that came since this
        thread's last pause (also when another thread drained it)."""
        seen = getattr(self._seen, "rings", -1)  # a thread's first pause counts every ring as new
        deadline = time.monotonic() + seconds
        if not self._lock.acquire(timeout=max(seconds, 0.0)):  # another thread selects; its wake frees it
            self._seen.rings = self._rings
            return
        try:
            remaining = deadline - time.monotonic()
            if self._rings == seen and remaining > 0:
                try:
                    ready, _, _ = select.select([self._sock], [], [], remaining)
                except (OSError, ValueError):  # closed under us: a plain pause
                    time.sleep(remaining)
                    return
                if ready:
                    self._drain()
                    self._rings += 1
        finally:
            self._seen.rings = self._rings
            self._lock.release()

    def _drain(self) -> None:
        while True:
            try:
                self._sock.recv(16)
            except OSError:  # BlockingIOError once empty
                return

    def close(self) -> None:
        self._sock.close()


def ring(addresses: Iterable[str]) -> None:
    """Wake the doorbells at ``addresses``; never blocks, never raises (a gone or busy peer
    polls on its own)."""
    global _ringer
    if _ringer is None:
        with _ringer_lock:
            if _ringer is None:
                try:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                except OSError:
                    return
                sock.setblocking(False)
                _ringer = sock
    for address in addresses:
        try:
            _ringer.sendto(b"!", "\0" + address)
        except OSError:
            pass


def same_host(bells: Iterable[object], host: str) -> list[str]:
    """The addresses among published ``(host, address)`` values that live on ``host``; a
    value of another shape (none published, an older peer) is skipped."""
    return [b[1] for b in bells if isinstance(b, tuple) and len(b) == 2 and b[0] == host and isinstance(b[1], str)
            and b[1]]
