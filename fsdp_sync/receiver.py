"""The engine's side: ``WeightReceiver`` registers destination tensors and lands versions.

A background thread follows the pushes the trainer announces. For each one it waits
until every expected arrival landed; only then does the version count as landed. A
failed or timed-out push leaves the version where it was and is raised by the next
``wait_for``. Two commit modes decide when the engine sees a landed version:

* ``in_place``: pushes write the live tensors. If ``pause``/``resume`` callbacks are
  given, the engine is paused from before the first byte of a push until it landed.
* ``staged``: pushes write a shadow copy; ``commit()``, called where the engine chooses
  (between forward passes), copies the newest landed version into the live tensors.
  A failed or partial push never touches the live tensors.

In both gated cases (staged, or paused) senders write only after the receiver says
"ready" for that push, so no byte lands while the engine reads or commits.

A delta push (``SyncConfig.delta``) names its base version: it is correct only on top
of exactly that version, so the receiver takes one only while the buffers it writes
(staging, or the live tensors in place) hold that version whole, and refuses it
otherwise, which fails the push and makes the next one full.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
import uuid
from typing import Callable

import torch
from torch import nn

from .claims import Claim, receiver_claim, trainer_holder
from .config import SyncConfig
from .control import (CLOSED, PUSH_LATEST, RECV_COUNT, RECV_EPOCH, ControlPlane, ack_key, bell_key,
                      plan_receiver_key, plan_sender_key, ready_key, recv_meta_key, verify_key, listening)
from .delta import digest
from .doorbell import Doorbell, ring
from .delta_plan import DELTA_KINDS
from .errors import ControlPlaneError, PlanError, SyncError, SyncTimeout, TrainerGone
from .meta import LayoutSpec, ReceiverMeta, as_layout_spec, clean_name, dest_tensors, device_id, with_tp_defaults
from .plan import ReceiverPlan
from .transport import get_transport
from .world import job_rank_and_size

log = logging.getLogger(__name__)
_IDLE_POLL_S = 0.005  # how late an idle receiver may notice a push
_IDLE_POLL_MIN_S = 0.00005  # right after a push it looks again soon: back-to-back pushes
_RECONNECT_MIN_S, _RECONNECT_MAX_S = 0.2, 5.0  # backoff while no trainer hosts the control plane
_CLOSE_GRACE_S = 5.0  # after a trainer closed, a store still up this long outlives its trainers
COMMIT_MODES = ("in_place", "staged")


class WeightReceiver:
    """Receives pushed weights into ``module_or_tensors`` (an nn.Module or a dict of named tensors)."""

    def __init__(self, module_or_tensors: nn.Module | dict[str, torch.Tensor], *, config: SyncConfig,
                 layout: str | LayoutSpec = "identity", layout_kwargs: dict | None = None, rank: int | None = None,
                 world_size: int | None = None, host: str | None = None, commit: str = "in_place",
                 pause: Callable[[], None] | None = None, resume: Callable[[], None] | None = None):
        if commit not in COMMIT_MODES:
            raise ValueError(f"WeightReceiver commit={commit!r} is not one of {list(COMMIT_MODES)}")
        if (pause is None) != (resume is None):
            raise ValueError("WeightReceiver needs both pause and resume, or neither")
        self.config = config
        self.commit_mode = commit
        self._pause, self._resume = pause, resume
        self.rank, self.world_size = job_rank_and_size(rank, world_size)
        self.layout = with_tp_defaults(as_layout_spec(layout, layout_kwargs), self.rank, self.world_size)
        self.host = host or socket.gethostname()
        live = _named_tensors(module_or_tensors)
        if config.transport == "auto":
            from .transport import auto

            prepare = auto.prepare
        else:
            prepare = get_transport(config.transport)[1].prepare
        if commit == "staged":
            # Pushes land in a shadow copy; only commit() touches the live tensors.
            staging, info = prepare({n: t.clone() for n, t in live.items()}, job=config.job, rank=self.rank)
        else:
            staging, info = prepare(live, job=config.job, rank=self.rank)
            if staging is not live and isinstance(module_or_tensors, nn.Module):
                _rebind(module_or_tensors, staging)
            live = staging
        self.tensors = live  # what the engine reads
        self._staging = staging  # what transports write
        self._transport_info = info
        gated = commit == "staged" or pause is not None
        devices = {t.device for t in staging.values()}
        self.meta = ReceiverMeta(self.rank, self.host, dest_tensors(staging.items()),
                                 self.layout, config.quant, info, gated,
                                 device_id(next(iter(devices))) if len(devices) == 1 else "",
                                 config.shared_settings())
        self.control: ControlPlane | None = None
        self._claim: Claim | None = None
        self._bell = Doorbell.open()  # the senders ring it after announcing and after their done keys
        self._ring: list[str] = []  # the senders' doorbells on this host: rung after an ack or ready key
        self._register(ControlPlane.connect(config, serve=False))
        self._gone: str | None = None  # why no trainer is there now (closed, or its store went away)
        self._backoff = _RECONNECT_MIN_S
        self._closed_by: tuple[str, float | None] | None = None  # (claim, when) of a trainer that closed
        self.version: int | None = None  # the version the engine sees in self.tensors
        self.landed_version: int | None = None  # the newest version whose every byte landed
        self._buffer_version: int | None = None  # the version the buffers pushes write hold whole: a delta's base
        self._staging_lock = threading.Lock()  # held while a push writes or commit() reads staging
        self._staging_valid = True  # staging holds a whole landed version
        self._paused = False  # in_place: pause() was called and resume() not yet
        self._plan: ReceiverPlan | None = None
        self._transport = None
        self._generation = 0  # of the transport: the PUSH_FAILURES count it was built under
        self._error: BaseException | None = None
        self._refused: str | None = None  # why the next push's announcement was last refused
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"fsdp_sync-recv-{self.rank}", daemon=True)
        self._thread.start()

    def _register(self, control: ControlPlane) -> None:
        """Claim this rank on ``control`` and publish the metadata the controller plans from."""
        claim = receiver_claim(control, self.rank)
        self.control, self._claim = control, claim
        control.doorbell = self._bell
        control.set(bell_key("receiver", self.rank), (self.host, self._bell.address) if self._bell else ("", ""))
        self._seq = control.get(PUSH_LATEST) if control.has(PUSH_LATEST) else 0
        self._publish_meta()
        if self.rank == 0:
            control.set(RECV_COUNT, self.world_size)

    def _publish_meta(self) -> None:
        """A new registration: the controller plans again, with this receiver in (a full push)."""
        self.meta = dataclasses.replace(self.meta, registration=uuid.uuid4().hex)
        # Epoch first: once the controller sees every meta, every epoch bump is counted.
        self.control.add(RECV_EPOCH, 1)
        replaces = self.control.has(recv_meta_key(self.rank))
        self.control.set(recv_meta_key(self.rank), self.meta)
        if replaces:
            # A controller that read the bump above before this meta planned with the old one
            # (a dropped receiver's): a second bump, after the new meta, makes it plan again.
            self.control.add(RECV_EPOCH, 1)

    def wait_for(self, version: int | None = None, timeout: float | None = None) -> int:
        """The newest landed version once it is at least ``version``; with no ``version``, the
        newest landed one, waiting only until a first version landed.

        In ``in_place`` mode a landed version is the one the engine sees; in ``staged``
        mode call ``commit()`` to make it so. Raises the error of a failed push (the
        version did not move), TrainerGone at once while no trainer is there to push the
        version asked for, or SyncTimeout after ``timeout`` (default ``SyncConfig.timeout_s``).
        """
        timeout = self.config.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                if self._claim is not None and self._claim.contested:
                    contested, self._claim.contested = self._claim.contested, None
                    raise SyncError(f"receiver rank {self.rank} of job {self.config.job!r} was refused to a second "
                                    f"process ({contested}): give each process of the inference job its own rank")
                current = self.landed_version
                if current is not None and (version is None or current >= version):
                    return current
                want = "a first version" if version is None else f"version {version}"
                if self._gone is not None:
                    raise TrainerGone(f"receiver {self.rank}: no {want}: {self._gone} (have {current})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SyncTimeout(f"receiver {self.rank}: no {want} within {timeout:.1f}s (have {current})")
                self._cond.wait(min(left, 0.1))

    def commit(self) -> int | None:
        """Staged mode: make the newest landed version the live one; returns the live version.

        Never waits for a push: while one writes the shadow copy (what it holds is then
        partial), the live version stays and is returned at once; the next call after
        that push landed makes it live. Safe to call between every pair of forward passes.
        """
        if self.commit_mode != "staged":
            raise RuntimeError("commit() is for commit='staged'; in_place versions are live once landed")
        if not self._staging_lock.acquire(blocking=False):
            return self.version
        try:
            landed = self.landed_version
            if self._staging_valid and landed is not None and (self.version is None or landed > self.version):
                for name, live in self.tensors.items():
                    live.copy_(self._staging[name])
                with self._cond:
                    self.version = landed
                    self._cond.notify_all()
        finally:
            self._staging_lock.release()
        return self.version

    def close(self) -> None:
        self._stop.set()
        if self._bell is not None:
            ring([self._bell.address])  # out of a pause at once
        self._thread.join(timeout=5)
        if self._bell is not None:
            self._bell.close()
        if self._transport is not None:
            self._transport.close()
        if self._claim is not None:
            self._claim.release()
        from .transport.shm import remove_files

        remove_files(self._transport_info)

    # -- the background loop -----------------------------------------------------------
    def _loop(self) -> None:
        pause = _IDLE_POLL_MIN_S
        while not self._stop.is_set():
            if self.control is None:
                self._reconnect()
                continue
            seq = self._seq + 1
            try:
                try:
                    announced = self.control.announcement(seq)
                except ControlPlaneError as e:
                    self._refuse(e)
                    time.sleep(_IDLE_POLL_S)
                    continue
                if announced is None:
                    self.control.pause(pause)
                    pause = min(pause * 2, _IDLE_POLL_S)
                    continue
                self._refused = None
                pause = _IDLE_POLL_MIN_S
                self._seq = seq
                self._land(seq, announced)
            except BaseException as e:  # noqa: BLE001 - handed to wait_for
                if self._stop.is_set():
                    return
                if not self._control_alive():
                    self._lose_control(e)
                    continue
                log.error("fsdp_sync receiver %d: %s", self.rank, _first_line(e))
                try:
                    if not isinstance(e, PlanError):  # a refused plan moved no bytes
                        self.control.record_failure(seq)
                    self._answer(ack_key(seq, self.rank), f"receiver {self.rank}: {e}")
                except Exception:  # noqa: BLE001 - the store itself may be gone
                    pass
                with self._cond:
                    self._error = e
                    self._cond.notify_all()

    def _refuse(self, error: ControlPlaneError) -> None:
        """A value under the next push key that does not verify: no push of ours (a forgery, garbage,
        or a trainer without our secret). Hand it to wait_for once, and keep waiting on that key:
        the trainer's real announcement of this push replaces it. No ack: nobody runs this push."""
        if str(error) == self._refused:
            return
        self._refused = str(error)
        log.error("fsdp_sync receiver %d: %s", self.rank, error)
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def _control_alive(self) -> bool:
        try:
            self.control.has(PUSH_LATEST)
            return True
        except Exception:  # noqa: BLE001 - any failure means the store is unreachable
            return False

    def _lose_control(self, error: BaseException) -> None:
        """The store went away: keep the last version, drop what belonged to that trainer, and
        look for the next one. A push cut short by it fails like any other."""
        with self._cond:
            if self._gone is None:
                self._gone = f"the trainer's control plane at {self.config.control} went away ({_first_line(error)})"
                log.warning("fsdp_sync receiver %d: %s; serving version %s and reconnecting", self.rank,
                            self._gone, self.version)
            self._cond.notify_all()
        self._drop_trainer()

    def _drop_trainer(self) -> None:
        if self._transport is not None:
            try:
                self._transport.close()
            except Exception:  # noqa: BLE001 - its peers are gone
                pass
            self._transport = None
        if self._claim is not None:
            self._claim.release()
        self._plan, self._claim, self.control = None, None, None
        self._backoff = _RECONNECT_MIN_S

    def _hear_close(self, seq: int) -> None:
        """The trainer closed (push ``seq``): let go of its store at once, before its exit takes
        the store down under a poll (which torch reports with pages of C++ frames), and wait for
        a new trainer. The ack of the close comes last: its host may exit as soon as it reads it."""
        try:
            holder = trainer_holder(self.control)
        except Exception:  # noqa: BLE001 - already gone: any claim found later is a new trainer's
            holder = ""
        with self._cond:
            self._gone = f"the trainer closed (job {self.config.job!r})"
            self._cond.notify_all()
        log.info("fsdp_sync receiver %d: %s; serving version %s", self.rank, self._gone, self.version)
        control = self.control
        self._drop_trainer()
        self._closed_by = (holder, time.monotonic())
        try:
            control.set(ack_key(seq, self.rank), "closed")
            ring(self._ring)  # the store's host waits for this before it exits
        except Exception:  # noqa: BLE001 - it went already
            pass

    def _closing_store_settled(self) -> bool:
        """After a close: whether to look at the store again. Its host may still be exiting, so
        only a plain socket probes it, until it went down or stayed up past the grace period
        (a store that outlives its trainers)."""
        holder, since = self._closed_by
        if not listening(self.config.control_host, self.config.control_port, 0.0):
            self._closed_by = (holder, None)  # it went down: whoever serves it next is a new trainer
            return False
        return since is None or time.monotonic() - since > _CLOSE_GRACE_S

    def _reconnect(self) -> None:
        """Once a trainer hosts the control plane again, claim this rank and register there."""
        if self._stop.wait(self._backoff):
            return
        self._backoff = min(self._backoff * 2, _RECONNECT_MAX_S)
        if self._closed_by is not None and not self._closing_store_settled():
            return
        try:
            control = ControlPlane.connect(self.config, serve=False, connect_timeout_s=self._backoff)
        except SyncError:
            return  # nobody hosts it yet
        if self._closed_by is not None:
            try:
                holder = trainer_holder(control)
            except Exception:  # noqa: BLE001 - it went down between the probe and the read
                return
            if holder in ("", self._closed_by[0]):
                return  # still the closed trainer's store, and no new trainer on it: look again later
            self._closed_by = None
        try:
            self._register(control)
        except Exception as e:  # noqa: BLE001 - a duplicate rank, or the store went away again
            log.error("fsdp_sync receiver %d: could not register again: %s", self.rank, _first_line(e))
            with self._cond:
                self._error = e if isinstance(e, SyncError) else TrainerGone(f"receiver {self.rank}: {e}")
                self._cond.notify_all()
            return
        self._generation = 0
        log.info("fsdp_sync receiver %d: registered with the trainer at %s again", self.rank, self.config.control)
        with self._cond:
            self._gone = None
            self._cond.notify_all()

    def _land(self, seq: int, announced: tuple) -> None:
        if announced[0] == CLOSED:
            self._hear_close(seq)
            return
        if announced[0] == "error":
            raise PlanError(announced[1])
        if announced[0] == "refused":
            raise ControlPlaneError(announced[1])
        _, version, fp, generation, base, verify = announced
        if not self.control.has(plan_receiver_key(fp, self.rank)) and self.control.has(plan_sender_key(fp, 0)):
            # A published plan that leaves this rank out: the trainer dropped it after a failed
            # push (it looked dead). Registering again puts it back into the next plan, as a
            # full push. (A go naming no published plan at all is refused by _load_plan.)
            log.warning("fsdp_sync receiver %d: push %d's plan leaves this rank out (on_receiver_failure='drop'); "
                        "registering again to rejoin at the next push, serving version %s", self.rank, seq, self.version)
            self._publish_meta()
            return
        if (self._plan is None or self._plan.fingerprint != fp or generation != self._generation
                or self._transport is None):
            # A new plan, or a push failed since this transport was built: build it again.
            if self._plan is None or self._plan.fingerprint != fp:
                self._plan = self._load_plan(seq, fp)
                self.control.set_pollers(self._plan.num_senders + self._plan.num_receivers)
                self._ring = self.control.bells("sender", range(self._plan.num_senders), self.host)
            if self._transport is not None:
                self._transport.close()
                self._transport = None  # a failed build below leaves none, and the next push builds again
            self._transport = get_transport(self._plan.transport)[1](self.control, self._plan, self._staging,
                                                                     self.config, generation=generation)
            self._generation = generation
        if self.landed_version is not None and version <= self.landed_version:
            raise SyncError(f"receiver {self.rank}: push {seq} announces version {version}, "
                            f"not newer than landed version {self.landed_version}")
        if base is not None and base != self._buffer_version:
            self._refuse_delta(seq, base)
        if self.commit_mode == "staged":
            with self._staging_lock:
                self._staging_valid = False  # partial until this push lands; a failure leaves it so
                self._buffer_version = None
                with self._cond:  # the shadow no longer holds the landed version: only the live one is left
                    self.landed_version = self.version
                self._answer(ready_key(seq, self.rank), True)
                self._receive(seq, delta=base is not None, verify=verify)
                self._landed(version, live=False)
                self._staging_valid = True
        else:
            self._land_in_place(seq, version, delta=base is not None, verify=verify)
        self._answer(ack_key(seq, self.rank), "ok")

    def _answer(self, key: str, value: object) -> None:
        """Set a key the senders wait for (an ack, a ready key), and ring their doorbells."""
        self.control.set(key, value)
        ring(self._ring)

    def _load_plan(self, seq: int, fp: str) -> ReceiverPlan:
        key = plan_receiver_key(fp, self.rank)
        if not self.control.has(key):  # the controller writes plans before it announces them
            raise ControlPlaneError(f"receiver {self.rank}: push {seq} names plan {fp}, which is not on the "
                                    "control plane", key=key)
        plan = self.control.get(key, expect=ReceiverPlan)
        if plan.fingerprint != fp or plan.rank != self.rank:
            raise ControlPlaneError(f"control key {key} holds the plan of receiver {plan.rank} with fingerprint "
                                    f"{plan.fingerprint}", key=key)
        return plan

    def _refuse_delta(self, seq: int, base: int) -> None:
        """Refuse push ``seq``, a delta on a version these buffers do not hold, before it writes
        where the receiver gates its senders. Ungated two-sided senders are drained, so the
        push ends at once; ungated one-sided ones write regardless: the live tensors are torn."""
        why = (f"receiver {self.rank}: push {seq} is a delta on version {base}, but the buffers it writes hold "
               f"{self._buffer_version}; refused (the next push is a full one)")
        if not self.meta.gated:
            if DELTA_KINDS.get(self._plan.transport) == "two_sided":
                self._transport.receive_delta(seq, self.config.timeout_s, apply_it=False)
            else:
                self._transport.receive(seq, self.config.timeout_s)
                with self._cond:
                    self.version = self.landed_version = None
                why += "; its changes were written into the live tensors, which are torn until it lands"
        raise SyncError(why)

    def _receive(self, seq: int, *, delta: bool, verify: bool) -> None:
        """Every arrival of push ``seq`` landed (and, for a verified push, matches what was sent)."""
        if delta and DELTA_KINDS.get(self._plan.transport) == "two_sided":
            self._transport.receive_delta(seq, self.config.timeout_s)
        else:  # a full push, or a one-sided delta: the senders stored it already
            self._transport.receive(seq, self.config.timeout_s)
        if verify:
            self._verify(seq)

    def _verify(self, seq: int) -> None:
        """Hash every destination box and compare with the senders' digests of what they sent."""
        senders = self._plan.senders
        sent = dict(zip(senders, self.control.get_many([verify_key(seq, s) for s in senders], expect=dict)))
        bad = sorted({t.dst for t in self._plan.arrivals
                      if sent[t.sender].get(f"{t.receiver}/{t.seq}") != digest(t.dst_box.view(self._staging[t.dst]))})
        if bad:
            raise SyncError(f"receiver {self.rank}: push {seq} failed verification: {', '.join(bad)} differ from "
                            "what the trainer sent (written behind fsdp_sync's back?); the next push is a full one")

    def _land_in_place(self, seq: int, version: int, *, delta: bool = False, verify: bool = False) -> None:
        """Writes go to the live tensors, with the engine paused if it gave ``pause``.

        A push that fails once writing began leaves them torn: the receiver then reports no
        version (None) and a paused engine stays paused until a later push lands whole, so
        nothing is served from half a version. (``commit="staged"`` keeps the last one.)
        """
        if self._pause is not None and not self._paused:
            self._pause()
            self._paused = True
        if self.meta.gated:
            self._answer(ready_key(seq, self.rank), True)
        self._buffer_version = None
        try:
            self._receive(seq, delta=delta, verify=verify)
        except Exception as e:
            with self._cond:
                self.version = self.landed_version = None
            state = "stays paused" if self._paused else "must not serve them"
            raise SyncError(f"{e} -- receiver {self.rank}'s live tensors hold part of push {seq}: version is None "
                            f"and the engine {state} until a push lands whole") from e
        self._landed(version, live=True)
        if self._paused:
            self._resume()
            self._paused = False

    def _landed(self, version: int, *, live: bool) -> None:
        self._buffer_version = version
        with self._cond:
            self.landed_version = version
            if live:
                self.version = version
            self._cond.notify_all()


def _first_line(error: BaseException) -> str:
    """An error's first line: torch's store errors carry pages of C++ frames after it."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _named_tensors(module_or_tensors: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(module_or_tensors, nn.Module):
        # Parameters only: engine buffers (rotary tables, caches) are derived, not synced.
        named = {clean_name(n): p.data for n, p in module_or_tensors.named_parameters()}
    elif isinstance(module_or_tensors, dict):
        for name, t in module_or_tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"destination {name!r} is a {type(t).__name__}, not a tensor")
        named = {clean_name(n): t for n, t in module_or_tensors.items()}
    else:
        raise TypeError(f"WeightReceiver takes an nn.Module or a dict of tensors, got {type(module_or_tensors).__name__}")
    for name, t in named.items():
        if t.is_meta:
            raise ValueError(f"destination {name!r} is on the meta device; materialize it first (e.g. to_empty)")
    return named


def _rebind(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Point the module's parameters and buffers at the transport's storage (e.g. shared memory)."""
    for name, p in module.named_parameters():
        p.data = tensors[clean_name(name)]
