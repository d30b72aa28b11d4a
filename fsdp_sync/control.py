"""The control plane: a torch.distributed TCPStore where the trainer and the engine meet.

The two jobs are separate torch.distributed worlds; they share only this store. Every
key lives under ``fsdp_sync/<job>/`` and every per-push key under ``push/<seq>/``, so
a repeated or restarted push can never read a stale key. Waits poll with a deadline
and watch error keys, so a dead or failed peer ends in an error, never a hang.

Values travel in ``wire``'s format: schema-checked JSON, never pickle, and with a
shared secret (``SyncConfig.secret`` or ``$FSDP_SYNC_SECRET``) each one is signed with
HMAC-SHA256 over its full key and payload. A value that does not decode or verify
raises ``ControlPlaneError`` naming its key, and is never acted on.

What is not signed, and why that is safe:

* Counters, written by ``TCPStore.add`` as plain ASCII integers, which the store
  itself increments, so no signature can ride along: ``recv/epoch`` (receiver
  registrations), ``push/failures`` (failed pushes: the transports' generation) and
  ``push/<seq>/failed``. A forged bump of the first makes the controller plan again
  from the (signed) registrations; of the second, makes the next push rebuild its
  transports (the generation every rank uses is the one in the signed ``go``); of the
  third, makes waits of that push read its (signed) error keys. None of them can make
  a receiver commit: that takes a signed ``go`` and every sender's signed done key.
* Existence alone, where a key only paces a wait: the controller waiting for senders to
  end a push before the next announcement, or the store host waiting for the others to
  close. Keys whose existence would let bytes move or a version land are read and
  verified (``wait_values``): done keys before a receiver commits, ready keys before a
  sender writes into gated buffers, acks, and the ``go`` itself.
* Torch's own rendezvous keys of the gloo/NCCL groups (under ``gloo/`` and ``nccl/``),
  and the data plane itself (gloo, NCCL, RDMA bytes): the secret does not cover them.
"""

from __future__ import annotations

import functools
import socket
import time
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch.distributed as dist

from .config import SyncConfig
from .doorbell import Doorbell, same_host
from .errors import ControlPlaneError, ControlPlaneLost, SyncError, SyncTimeout
from .wire import Signer, WireError, dumps, loads

# Waits poll with check(): a timed-out TCPStore.wait() can leave its late reply on the
# socket (and logs twice). Each poll hop of a push (done keys, acks) costs up to the
# interval between checks, so the interval backs off from 50 us only as far as the store
# can serve: all pollers together make about _CHECKS_PER_S checks, with the interval
# held between 0.25 ms (a few processes) and 5 ms (hundreds).
_POLL_MIN_S = 0.00005
_POLL_FLOOR_S = 0.00025
_POLL_MAX_S = 0.005
_CHECKS_PER_S = 100_000
# compare_set's answer for a missing key (it creates nothing when the expected value is not
# empty): no genuine value starts with a NUL byte (they are JSON, or signed JSON).
_MISSING = b"\x00fsdp_sync: no such key"


def listening(host: str, port: int, timeout_s: float) -> bool:
    """Whether something accepts connections at host:port within ``timeout_s``.

    Probed with plain sockets first: a TCPStore client that retries logs every failed try
    with pages of C++ frames, and a receiver waiting for its trainer to start is no error.
    """
    deadline = time.monotonic() + timeout_s
    pause = 0.05
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() + pause > deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 1.0)


def _store_errors(method: Callable) -> Callable:
    """Turn the store's own failures (its host exited, the socket broke) into ControlPlaneLost,
    with the first line of torch's message: the rest of it is C++ frames."""

    @functools.wraps(method)
    def guarded(self: "ControlPlane", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (SyncError, ValueError, TypeError, KeyError):
            raise
        except (RuntimeError, OSError) as e:  # DistNetworkError, DistStoreError, a broken socket
            first = (str(e).strip().splitlines() or [""])[0]
            raise ControlPlaneLost(f"lost the control plane of job {self.job!r}: {type(e).__name__}: {first}") from e

    return guarded


class ControlPlane:
    """Typed helpers over one namespaced store."""

    def __init__(self, store: dist.Store, job: str, timeout_s: float, *, secret: str | None = None):
        self.root = store
        self.job = job
        self.prefix = f"fsdp_sync/{job}/"
        self.store = dist.PrefixStore(self.prefix, store)
        self.timeout_s = timeout_s
        self.poll_max_s = _POLL_MAX_S
        self.signer = Signer(secret, self.prefix)
        self.signed = self.signer.signed
        self.doorbell: Doorbell | None = None  # when set, a peer's ring ends a wait's pause early

    def pause(self, seconds: float) -> None:
        """The sleep between polls: cut short by a ring on this process's doorbell."""
        if self.doorbell is not None:
            self.doorbell.sleep(seconds)
        else:
            time.sleep(seconds)

    def set_pollers(self, count: int) -> None:
        """How many processes (senders and receivers) poll this store: sets the longest poll interval."""
        self.poll_max_s = min(_POLL_MAX_S, max(_POLL_FLOOR_S, count / _CHECKS_PER_S))

    @classmethod
    def connect(cls, config: SyncConfig, *, serve: bool, connect_timeout_s: float | None = None) -> "ControlPlane":
        """Open the store at ``config.control``; ``serve`` hosts it (the trainer's rank 0).

        A client retries for ``connect_timeout_s`` (default ``SyncConfig.connect_timeout_s``)."""
        timeout = config.connect_timeout_s if connect_timeout_s is None else connect_timeout_s
        if not serve and not listening(config.control_host, config.control_port, timeout):
            raise SyncError(f"cannot reach the control plane at {config.control} (SyncConfig.control) within "
                            f"{timeout:.0f}s: nothing listens there (is the trainer running, with the same control?)")
        try:
            store = dist.TCPStore(config.control_host, config.control_port, is_master=serve,
                                  timeout=timedelta(seconds=timeout), wait_for_workers=False)
        except (RuntimeError, dist.DistStoreError) as e:
            role = "host" if serve else "reach"
            first = (str(e).strip().splitlines() or [""])[0]  # the rest is C++ frames
            hint = (" (is another trainer job running with this control? give each job its own port, or set "
                    "host_control=False to join a store that runs there)") if serve else ""
            raise SyncError(f"cannot {role} the control plane at {config.control} "
                            f"(SyncConfig.control) within {timeout:.0f}s: {first}{hint}") from e
        return cls(store, config.job, config.timeout_s, secret=config.resolved_secret())

    # -- values -------------------------------------------------------------------------
    def _dumps(self, key: str, value: Any) -> bytes:
        try:
            return dumps(value, key=key, signer=self.signer)
        except WireError as e:
            raise TypeError(f"control key {key!r}: {e}") from None

    def _loads(self, key: str, raw: bytes, expect: type | tuple[type, ...] | None = None) -> Any:
        try:
            value = loads(raw, key=key, signer=self.signer)
        except WireError as e:
            raise ControlPlaneError(f"control key {self.prefix}{key} refused: {e}", key=key) from None
        if expect is not None and not isinstance(value, expect):
            names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
            raise ControlPlaneError(f"control key {self.prefix}{key} refused: it holds a {type(value).__name__}, "
                                    f"expected {names}", key=key)
        return value

    @_store_errors
    def set(self, key: str, value: Any) -> None:
        self.store.set(key, self._dumps(key, value))

    @_store_errors
    def set_many(self, values: dict[str, Any]) -> None:
        """Several keys in one round trip to the store."""
        self.store.multi_set(list(values), [self._dumps(k, v) for k, v in values.items()])

    @_store_errors
    def counters(self, keys: Sequence[str]) -> list[int]:
        """Values of counters (keys written by ``add``, which must exist), in one round trip."""
        out = []
        for key, raw in zip(keys, self.store.multi_get(list(keys))):
            if not (raw.isdigit() or raw[:1] == b"-" and raw[1:].isdigit()):
                raise ControlPlaneError(f"control key {self.prefix}{key} refused: a counter holds "
                                        f"{raw[:12]!r}, not an integer", key=key)
            out.append(int(raw))
        return out

    @_store_errors
    def get_many(self, keys: Sequence[str], *, expect: type | tuple[type, ...] | None = None) -> list[Any]:
        """The values of keys known to exist, in one round trip; ControlPlaneError for one refused
        (or, with ``expect``, not of that type)."""
        keys = list(keys)
        return [self._loads(k, raw, expect) for k, raw in zip(keys, self.store.multi_get(keys))] if keys else []

    @_store_errors
    def _try_get(self, key: str) -> bytes | None:
        """The raw value under ``key`` or None, in one round trip (check then get is two)."""
        raw = self.store.compare_set(key, _MISSING, _MISSING)
        return None if raw == _MISSING else raw

    @_store_errors
    def get(self, key: str, *, expect: type | tuple[type, ...] | None = None) -> Any:
        """The value of a key that is known to exist (check or wait first); ControlPlaneError if
        it is refused (or, with ``expect``, not of that type)."""
        return self._loads(key, self.store.get(key), expect)

    @_store_errors
    def has(self, key: str) -> bool:
        return self.store.check([key])

    @_store_errors
    def add(self, key: str, amount: int) -> int:
        return self.store.add(key, amount)

    # -- waiting ------------------------------------------------------------------------
    @_store_errors
    def wait(self, keys: Sequence[str], *, timeout_s: float | None = None,
             describe: Callable[[list[str]], str] | None = None,
             abort: Callable[[], str | None] | None = None) -> None:
        """Wait until every key exists.

        Raises SyncTimeout naming what is missing (``describe`` turns keys into words)
        after ``timeout_s``, and SyncError as soon as ``abort`` returns a reason.
        """
        keys = list(keys)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        pause = _POLL_MIN_S
        while True:
            if not keys or self.store.check(keys):
                return
            if abort is not None and (reason := abort()):
                # Another side failed first; what this one still waited for may name the culprit.
                missing = [k for k in keys if not self.store.check([k])]
                raise SyncError(reason + (f" (this side still waited for {describe(missing)})" if describe else ""))
            if time.monotonic() > deadline:
                missing = [k for k in keys if not self.store.check([k])]
                what = describe(missing) if describe else f"keys {missing}"
                raise SyncTimeout(f"timed out after {timeout_s or self.timeout_s:.1f}s waiting for {what}")
            self.pause(pause)
            pause = min(pause * 2, self.poll_max_s)

    @_store_errors
    def wait_values(self, keys: Sequence[str], *, accept: Callable[[Any], bool] | None = None,
                    what: str = "a value", timeout_s: float | None = None,
                    describe: Callable[[list[str]], str] | None = None,
                    abort: Callable[[], str | None] | None = None) -> list[Any]:
        """Wait until every key holds a value that verifies (and that ``accept`` takes); return them.

        For keys whose mere existence would let something happen (a commit, a write): a
        refused value counts as not written yet, so a forged one never triggers anything,
        and a genuine writer's later value replaces it. One round trip per poll once all
        keys exist. At the deadline, a ControlPlaneError names the refused keys and why;
        SyncTimeout if none was refused.
        """
        keys = list(keys)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        values: dict[str, Any] = {}
        refused: dict[str, str] = {}
        pending = keys
        pause = _POLL_MIN_S

        def open_keys() -> list[str]:
            """Named on failure: the keys still missing (or refused), not those merely read in no
            poll yet (with several pending, a poll reads them only once all exist)."""
            return [k for k in pending if k in refused or not self.store.check([k])] or pending

        while True:
            if not pending:
                return [values[k] for k in keys]
            if len(pending) == 1:  # one key (an ack, a done key, the go): one round trip
                raw = self._try_get(pending[0])
                found = [raw] if raw is not None else None
            else:
                found = self.store.multi_get(pending) if self.store.check(pending) else None
            if found is not None:
                for key, raw in zip(pending, found):
                    try:
                        value = self._loads(key, raw)
                    except ControlPlaneError as e:
                        refused[key] = str(e)
                        continue
                    if accept is not None and not accept(value):
                        refused[key] = f"control key {self.prefix}{key} refused: it holds {value!r:.80}, not {what}"
                        continue
                    values[key] = value
                    refused.pop(key, None)
                pending = [k for k in pending if k not in values]
                if not pending:
                    continue
            if abort is not None and (reason := abort()):
                # Another side failed first; what this one still waited for may name the culprit.
                still = f" (this side still waited for {describe(open_keys())})" if describe else ""
                raise SyncError(reason + still)
            if time.monotonic() > deadline:
                waited = f"{timeout_s or self.timeout_s:.1f}s"
                missing = open_keys()
                what_open = describe(missing) if describe else f"keys {missing}"
                if refused:
                    raise ControlPlaneError(f"gave up after {waited} waiting for {what_open}: "
                                            + "; ".join(refused.values()), key=next(iter(refused)))
                raise SyncTimeout(f"timed out after {waited} waiting for {what_open}")
            self.pause(pause)
            pause = min(pause * 2, self.poll_max_s)

    @_store_errors
    def wait_done(self, seq: int, senders: Sequence[int], *, timeout_s: float | None = None,
                  abort: Callable[[], str | None] | None = None) -> None:
        """Wait until each of ``senders`` marked push ``seq`` done, each mark read and verified:
        the receiver commits on these, so a key that merely exists is not enough."""
        self.wait_values([done_key(seq, s) for s in senders], accept=lambda v: v is True, what="True",
                         timeout_s=timeout_s, abort=abort,
                         describe=lambda keys: f"senders {sorted(int(k.rsplit('/', 1)[1]) for k in keys)} "
                         f"to finish push {seq}")

    @_store_errors
    def announcement(self, seq: int) -> tuple | None:
        """Push ``seq``'s announcement, checked: ("go", version, fingerprint, generation, base,
        verify) where ``base`` is the version a delta push applies to (None: a full push) and
        ``verify`` says whether both sides hash the destinations after it, or
        ("error", message) for a refused plan, or ("refused", message) for a refused control value;
        None while it is not there (one round trip either way)."""
        key = push_key(seq)
        raw = self._try_get(key)
        if raw is None:
            return None
        value = self._loads(key, raw)
        if not is_announcement(value):
            raise ControlPlaneError(f"control key {self.prefix}{key} refused: {value!r:.80} is no push "
                                    "announcement", key=key)
        return value

    def record_failure(self, seq: int) -> None:
        """Count push ``seq`` as failed, before any error or ack says so: whoever hears of the
        failure then also finds it counted (the next push rebuilds transports on that count)."""
        self.add(PUSH_FAILURES, 1)
        self.add(push_failed_key(seq), 1)

    @_store_errors
    def failure_in(self, seq: int, keys: Sequence[str]) -> str | None:
        """Once push ``seq`` has a recorded failure, the first existing value among ``keys``.

        One request per poll while nothing failed, however many keys could hold the error.
        """
        return self.first_error(keys) if self.has(push_failed_key(seq)) else None

    @_store_errors
    def has_all(self, keys: Sequence[str]) -> bool:
        return not keys or self.store.check(list(keys))

    @_store_errors
    def wait_each(self, alternatives: Sequence[Sequence[str]], *, timeout_s: float | None = None,
                  describe: Callable[[list[int]], str] | None = None) -> None:
        """Wait until each entry of ``alternatives`` has one of its keys; ``describe`` gets the
        indices of the entries still open when it times out."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        pending = list(range(len(alternatives)))
        pause = _POLL_MIN_S
        while True:
            pending = [i for i in pending if not any(self.store.check([k]) for k in alternatives[i])]
            if not pending:
                return
            if time.monotonic() > deadline:
                what = describe(pending) if describe else f"one of each of {[alternatives[i] for i in pending]}"
                raise SyncTimeout(f"timed out after {timeout_s or self.timeout_s:.1f}s waiting for {what}")
            self.pause(pause)
            pause = min(pause * 2, self.poll_max_s)

    def bells(self, role: str, ranks: Sequence[int], host: str) -> list[str]:
        """The doorbell addresses of ``role`` ranks on ``host``, to ring after setting a key
        they wait for; those that published none (or a value that does not verify) are left
        to their polling."""
        keys = [bell_key(role, r) for r in ranks]
        try:
            if not self.has_all(keys):
                keys = [k for k in keys if self.has(k)]
            return same_host(self.get_many(keys), host)
        except ControlPlaneError:
            return []

    @_store_errors
    def first_error(self, keys: Sequence[str]) -> str | None:
        """The value of the first existing error key among ``keys``, if any; an ack key
        holding "ok" is no error. A refused value is an error too, saying why it was refused."""
        for key in keys:
            if self.store.check([key]):
                try:
                    value = self.get(key, expect=str)
                except ControlPlaneError as e:
                    return str(e)
                if value != "ok":
                    return value
        return None


def is_announcement(value: Any) -> bool:
    """Whether ``value`` has the shape of a push announcement (see ``ControlPlane.announcement``)."""
    if type(value) is not tuple or not value:
        return False
    if value[0] == "go":
        return (len(value) == 6 and type(value[1]) is int and type(value[2]) is str and type(value[3]) is int
                and (value[4] is None or type(value[4]) is int) and type(value[5]) is bool)
    if value[0] == CLOSED:
        return len(value) == 1
    return value[0] in ("error", "refused") and len(value) == 2 and type(value[1]) is str


# Key names, in one place so both sides agree.
def recv_meta_key(rank: int) -> str:
    return f"recv/meta/{rank}"


RECV_COUNT = "recv/count"
RECV_EPOCH = "recv/epoch"
PUSH_LATEST = "push/latest"
CLOSED = "closed"  # announced as a push by a closing trainer: its receivers stop waiting for it
PUSH_FAILURES = "push/failures"  # pushes that failed somewhere: transports are rebuilt after one


def sender_host_key(rank: int) -> str:
    return f"send/host/{rank}"


def bell_key(role: str, rank: int) -> str:
    """A sender's or receiver's (host, doorbell address); ("", "") where it has none."""
    return f"bell/{role}/{rank}"


def sender_closed_key(rank: int) -> str:
    return f"send/closed/{rank}"


def plan_sender_key(fp: str, rank: int) -> str:
    return f"plan/{fp}/send/{rank}"


def plan_receiver_key(fp: str, rank: int) -> str:
    return f"plan/{fp}/recv/{rank}"


def push_key(seq: int) -> str:
    return f"push/{seq}"


def done_key(seq: int, sender: int) -> str:
    return f"push/{seq}/done/{sender}"


def sender_error_key(seq: int, sender: int) -> str:
    return f"push/{seq}/error/{sender}"


def ready_key(seq: int, receiver: int) -> str:
    return f"push/{seq}/ready/{receiver}"


def push_failed_key(seq: int) -> str:
    return f"push/{seq}/failed"


def verify_key(seq: int, sender: int) -> str:
    return f"push/{seq}/verify/{sender}"


def ack_key(seq: int, receiver: int) -> str:
    return f"push/{seq}/ack/{receiver}"
