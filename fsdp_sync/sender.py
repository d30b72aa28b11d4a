"""The trainer's side: ``WeightSender(model, config).push()`` on every training rank.

Every rank calls ``push`` together (SPMD), after ``optimizer.step()``. Rank 0 plans
(once) and publishes the push; each rank then runs its part of the plan through the
pipeline on a background thread and returns a handle at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .config import SyncConfig
from .claims import Claim, receiver_held, trainer_claim
from .control import (CLOSED, ControlPlane, PUSH_LATEST, RECV_COUNT, ack_key, bell_key, done_key, is_announcement, plan_sender_key,
                      push_key, ready_key, recv_meta_key, sender_closed_key, sender_error_key, sender_host_key,
                      verify_key)
from .controller import Controller
from .delta import DeltaSender, DeltaStats, Encoded
from .delta_plan import DELTA_KINDS
from .delta_stores import DeltaStores
from .doorbell import Doorbell, ring
from .errors import ControlPlaneError, PlanError, SyncError, SyncTimeout
from .meta import ReceiverMeta, SourceParam, device_id, source_params
from .packing import BucketPacker, groups_launches
from .param_scan import ParamScan
from .pipeline import ByteBudget, run_pipeline
from .plan import SenderPlan
from .push_thread import PushThread
from .trace import Trace
from .trainer_group import trainer_group
from .transport import get_transport

log = logging.getLogger("fsdp_sync")
# Staged FP8 payloads live in this many slots that outlive a push (fsdp_sync.staging): the
# transfer of one bucket overlaps the packing of the next, and their launches replay.
STAGING_SLOTS = 2


@dataclass
class PushResult:
    """What one push cost on this rank."""

    version: int
    seq: int
    seconds: float
    bytes_sent: int
    stage_seconds: dict[str, float]  # the push thread's stages
    peak_bytes: int
    floor_s: float | None = None  # the plan's floor, known on the controller
    trace_path: str | None = None  # SyncConfig.trace_dir: the push's Chrome trace, acks included
    # Delta push (SyncConfig.delta): bytes_sent is what moved; these say against what.
    full_bytes: int | None = None  # what a full push of this version sends from this rank
    delta_base: int | None = None  # the version this push was a delta on; None: a full push
    changed_fraction: float | None = None  # of weight elements (scale grids not counted)
    shadow_bytes: int = 0  # the shadow of what this rank last sent (SyncConfig.delta_shadow: where)
    staging_bytes: int = 0  # held between pushes for staged FP8 payloads (fsdp_sync.staging)
    # The fixed cost around the push thread: announcing (push() returning) by step, and the
    # wait for the receivers' acks (set once wait() read them).
    announce_seconds: dict[str, float] = field(default_factory=dict)
    acks_seconds: float | None = None


@dataclass
class PushHandle:
    """A push in flight; ``wait()`` returns its PushResult or raises its error."""

    version: int
    seq: int
    _finished: threading.Event = field(default_factory=threading.Event)
    _outcome: dict = field(default_factory=dict)
    _weights_ready: object = None  # a CUDA event after the step that produced these weights
    _after: Callable[[], None] | None = None
    _on_result: Callable[["PushResult"], None] | None = None
    _trace: Trace | None = None  # its spans: announcing, the push thread, the acks
    _trace_dir: str | None = None  # SyncConfig.trace_dir: the trace is written once the acks are in

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> PushResult:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"push of version {self.version} still running after {timeout}s")
        if "error" in self._outcome:
            self._write_trace()
            raise self._outcome["error"]
        if "result" not in self._outcome:  # the push thread logged what ended it
            raise SyncError(f"push of version {self.version} ended without a result (its error is in the log)")
        if self._after is not None:  # the acks, waited for once: a second wait() gives their outcome
            after, self._after = self._after, None
            started, error = time.perf_counter(), None
            try:
                after()
            except BaseException as e:  # noqa: BLE001 - raised below, once its span is in the trace
                error = e
            ended = time.perf_counter()
            if self._trace is not None:
                self._trace.add("acks", started, ended)
            if error is not None:
                self._outcome["error"] = error
                self._write_trace()
                raise error
            self._outcome["result"].acks_seconds = ended - started
        self._write_trace()
        if self._on_result is not None:
            self._on_result(self._outcome["result"])
            self._on_result = None
        return self._outcome["result"]

    def _write_trace(self) -> None:
        """The push's Chrome trace, acks included, once (a trace folder that cannot be written
        is logged, not raised: the push itself landed or failed on its own)."""
        folder, self._trace_dir = self._trace_dir, None
        if folder is None or self._trace is None:
            return
        try:
            path = self._trace.write_chrome(folder, f"push{self.seq}")
        except OSError as e:
            log.warning("fsdp_sync: could not write the trace of push %d: %s", self.seq, e)
            return
        if "result" in self._outcome:
            self._outcome["result"].trace_path = path


class WeightSender:
    """Pushes an FSDP2 model's weights to the registered receivers, replaying one plan."""

    def __init__(self, model: nn.Module, config: SyncConfig, *, group=None, host: str | None = None,
                 device: torch.device | None = None, progress: Callable[[int, int], None] | None = None):
        """``group``: the trainer ranks, as a ProcessGroup or the DeviceMesh the model is sharded
        on (default: the whole world); its ranks call this together, and its rank 0 is the
        controller. ``progress(done, total)`` is called from the transfer thread after each
        bucket lands."""
        if not dist.is_initialized():
            raise SyncError("WeightSender needs torch.distributed initialized in the trainer job")
        self.model = model
        self.config = config
        self.trainers = trainer_group(group)
        self.rank = self.trainers.rank
        self.world_size = self.trainers.size
        self.host = host or socket.gethostname()
        self.device = device or _model_device(model)
        self._hosts_store = self.rank == 0 and config.host_control
        self._claim: Claim | None = None
        self.control = self._join_control_plane()
        # Receivers on this host ring it after their acks (and ready keys); it rings theirs.
        self._bell = Doorbell.open()
        self.control.doorbell = self._bell
        self.control.set_many({sender_host_key(self.rank): (self.host, device_id(self.device)),
                               bell_key("sender", self.rank): (self.host, self._bell.address) if self._bell else ("", "")})
        self._ring_done: list[str] = []  # the doorbells of the receivers this rank sends to
        self._ring_go: tuple[str, list[str]] = ("", [])  # controller: (plan, the doorbells of its receivers and senders)
        self.controller = Controller(self.control, config, self.world_size, self.run_id) if self.rank == 0 else None
        self.version: int | None = None
        self.seq = self.control.get(PUSH_LATEST, expect=int) if self.control.has(PUSH_LATEST) else 0
        self._plan: SenderPlan | None = None
        self._full_bytes = 0  # what a full push of the plan sends from this rank, summed once per plan
        self._sources: dict[str, SourceParam] = {}
        self._sources_key: tuple | None = None
        self._scan = ParamScan(model, self._mesh_ranks, buffers=config.buffers)
        self._groups: dict[tuple[int, ...], object] = {}
        self._meshes: dict[int, tuple[object, tuple[int, ...]]] = {}  # id -> (mesh kept alive, its ranks)
        self._transport = None
        self._generation = 0  # of the transport: PUSH_FAILURES when it was built
        self._announced: int | None = None  # controller: the last push it announced with "go"
        self._last_go: tuple[str, int, int] | None = None  # controller: (plan, generation, version) of it
        self._num_goes = 0  # controller: pushes announced, for verify_every
        self._go: tuple[int | None, bool] = (None, False)  # this push's delta base and verify flag
        self._delta: DeltaSender | None = None
        self._stores: DeltaStores | None = None  # one-sided deltas found by the packer's own stores
        self._packer: BucketPacker | None = None
        self._inflight: PushHandle | None = None
        self._push_thread: PushThread | None = None  # started at the first push
        self._transfer_thread: PushThread | None = None  # the pipeline's transfers, started with it
        self._last_result: PushResult | None = None
        self._progress = progress
        self._pack_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._hooks: list = []
        self._closed = False
        self.stall_s: list[float] = []  # per attached optimizer step: time step() waited for pushes

    def _join_control_plane(self) -> ControlPlane:
        """Rank 0 hosts (or reaches) the store and claims the job for a new run; every rank
        learns the outcome through the trainer's own group, not through the store.

        So the ranks of a second trainer job under the same job name never join the first
        job's store as its senders: its rank 0 cannot bind the port or take the claim, and
        all its ranks raise that same error, while the running job goes on.
        """
        outcome: list = [None, None]  # run id, or the error rank 0 met
        control = None
        if self.rank == 0:
            run_id = uuid.uuid4().hex[:12]
            try:
                control = ControlPlane.connect(self.config, serve=self._hosts_store)
                self._claim = trainer_claim(control, run_id)
                outcome[0] = run_id
            except SyncError as e:
                outcome[1] = str(e)
        self.trainers.broadcast_from_first(outcome, device=self.device if self.device.type == "cuda" else None)
        self.run_id, error = outcome
        if error is not None:
            raise SyncError(f"trainer rank {self.rank}: {error}" if self.rank else error)
        return control if control is not None else ControlPlane.connect(self.config, serve=False)

    @property
    def num_plans_built(self) -> int:
        """How many times this rank planned (only the controller plans)."""
        return self.controller.num_plans_built if self.controller else 0

    @property
    def last_push(self) -> PushHandle | None:
        """The newest push, also when attach() started it: its ``wait()`` gives the PushResult."""
        return self._inflight

    @property
    def last_result(self) -> PushResult | None:
        """The PushResult of the newest push that was waited for (by you, or by attach's next
        step); None before one was."""
        return self._last_result

    def push(self, version: int | None = None) -> PushHandle:
        """Start pushing the current weights as ``version`` (default: the last pushed + 1, first 1)."""
        if self._inflight is not None and not self._inflight.done():
            self._inflight.wait()
        version = (1 if self.version is None else self.version + 1) if version is None else int(version)
        if self.version is not None and version <= self.version:
            raise ValueError(f"version {version} does not increase: version {self.version} was pushed already")
        seq = self.seq + 1
        trace = Trace(self.rank)
        try:
            local = self._publish(seq, version, trace)
        except PlanError:
            self.seq = seq  # receivers saw the refusal under this push number: the next push is seq + 1
            raise
        except Exception as e:
            try:
                if self.control.has(push_key(seq)):  # announced: the others are in this push, so it fails
                    self.seq = seq
                    self.control.record_failure(seq)
                    self.control.set(sender_error_key(seq, self.rank), f"sender {self.rank} could not set up push "
                                     f"{seq}: {e!r}")
            except SyncError:  # the store is gone too: nobody is left to tell
                pass
            if isinstance(e, (SyncError, PlanError)):
                raise
            raise SyncError(f"sender {self.rank} could not set up push {seq} (version {version}): {e!r}") from e
        self.seq, self.version = seq, version
        handle = PushHandle(version, seq, _on_result=self._keep_result, _trace=trace, _trace_dir=self.config.trace_dir)
        if self._pack_stream is not None:
            handle._weights_ready = torch.cuda.Event()
            handle._weights_ready.record(torch.cuda.current_stream(self.device))
        if self.config.wait_for_receivers:
            registered = [self._plan.registered_rank(s) for s in range(self._plan.num_receivers)]
            handle._after = lambda: self._wait_for_acks(seq, version, registered)
        if self._push_thread is None:
            self._push_thread = PushThread(f"fsdp_sync-push-rank{self.rank}")
        submitted = time.perf_counter()
        self._push_thread.submit(lambda: self._run(handle, local, submitted), handle._finished)
        self._inflight = handle
        return handle

    def _keep_result(self, result: PushResult) -> None:
        self._last_result = result

    def attach(self, optimizer: torch.optim.Optimizer, *, overlap: bool = False) -> None:
        """Push after every ``optimizer.step()``.

        With ``overlap``, the push runs while the next forward and backward proceed, and
        the next ``step()`` first waits for it: shards change only inside ``step()``, so
        reading them meanwhile is safe. ``stall_s`` records how long each step waited.
        """
        if self._hooks:
            raise RuntimeError("WeightSender.attach: already attached; call detach() first")

        def before_step(_opt, _args, _kwargs) -> None:
            started = time.perf_counter()
            if self._inflight is not None:
                self._inflight.wait()
            self.stall_s.append(time.perf_counter() - started)

        def after_step(_opt, _args, _kwargs) -> None:
            handle = self.push()
            if not overlap:
                started = time.perf_counter()
                handle.wait()
                self.stall_s[-1] += time.perf_counter() - started

        self._hooks = [optimizer.register_step_pre_hook(before_step), optimizer.register_step_post_hook(after_step)]

    def detach(self) -> None:
        """Remove the hooks and finish the push in flight."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._inflight is not None:
            self._inflight.wait()

    def close(self) -> None:
        """Finish the push in flight, release the transport, leave the control plane; once."""
        if self._closed:
            return
        self._closed = True
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        failed = False
        if self._inflight is not None:
            try:
                self._inflight.wait()
            except Exception:  # noqa: BLE001 - the caller saw it already or will not care at close
                failed = True
        for thread in (self._push_thread, self._transfer_thread):
            if thread is not None:
                thread.stop()
        if self._transport is not None:
            self._transport.close()
        self._packer = None  # its recorded launches hold the receivers' mapped tensors
        self._leave_control_plane(wait_for_peers=not failed)
        if self._claim is not None:
            self._claim.release()
        if self._bell is not None:
            self._bell.close()

    def _leave_control_plane(self, *, wait_for_peers: bool) -> None:
        """The controller waits for every sender rank to close, then tells the receivers.

        When it hosts the store, its exit takes the store down: a rank still reading its
        last acks would then fail with a closed connection. After a failed push a peer may
        be dead, so it waits 2 s at most; otherwise a rank that never closes costs it one
        timeout. The receivers hear "closed" as the next push: they keep their version and
        stop waiting for this trainer.
        """
        try:
            self.control.set(sender_closed_key(self.rank), True)
        except Exception:  # noqa: BLE001 - the store is gone already: nobody is left to wait for us
            return
        if self.controller is None:
            return
        keys = [sender_closed_key(r) for r in range(self.world_size)]
        try:
            # After a failed push a peer may be dead: wait briefly, not a whole timeout.
            self.control.wait(keys, timeout_s=None if wait_for_peers else min(self.config.timeout_s, 2.0),
                              describe=lambda missing: f"trainer ranks closing their senders ({missing})")
        except SyncTimeout as e:
            warnings.warn(f"fsdp_sync: closing the control plane anyway: {e}", stacklevel=3)
        self.seq += 1
        self.control.set_many({push_key(self.seq): (CLOSED,), PUSH_LATEST: self.seq})
        ring(self._ring_go[1])
        if self._hosts_store:
            self._linger_for_receivers()
        for key in keys:
            self.control.store.delete_key(key)

    def _linger_for_receivers(self) -> None:
        """Host of the store: before the exit takes it down, wait (2 s at most: a receiver may
        be dead) until the receivers still holding their ranks read the close. They follow
        pushes in order, so each then also read what came before, a refused plan's error
        above all: a fast trainer exit must not turn that error into "the trainer went away"."""
        try:
            if not self.control.has(RECV_COUNT):
                return
            count = self.control.get(RECV_COUNT, expect=int)
            following = [r for r in range(count) if receiver_held(self.control, r)]
            self.control.wait([ack_key(self.seq, r) for r in following], timeout_s=2.0,
                              describe=lambda missing: f"receivers reading the close ({missing})")
        except SyncError as e:
            log.info("fsdp_sync: closing the control plane without every receiver's ack: %s", e)

    # -- planning ----------------------------------------------------------------------
    def _mesh_ranks(self, mesh) -> tuple[int, ...]:
        """The mesh's ranks, once per mesh object: ``DeviceMesh.mesh`` is rebuilt on every
        access in recent torch (~70 us), and every push checks every parameter's mesh."""
        hit = self._meshes.get(id(mesh))
        if hit is None or hit[0] is not mesh:
            hit = self._meshes[id(mesh)] = (mesh, tuple(mesh.mesh.reshape(-1).tolist()))
        return hit[1]

    def _publish(self, seq: int, version: int, trace: Trace) -> dict[str, torch.Tensor]:
        """Controller: plan if needed, then announce the push. Everyone: load the announced plan.

        Returns this rank's local shards, by parameter name, for the push to read. Each step
        is a span of the push's trace (its ``announce_seconds``)."""
        with trace.span("scan"):
            key, local = self._scan.scan()
        if key != self._sources_key:
            self._sources = {s.name: s for s in source_params(self.model, world_size=self.world_size,
                                                                 buffers=self.config.buffers,
                                                                 rank_of=self.trainers.local_ranks)}
            self._sources_key = key
        if self.controller is not None:
            # First, so its failure is in the count read next. Alone, this rank's own push
            # thread ended it already (push() waited for it), failure counted.
            if self._announced is not None and self.world_size > 1:
                with trace.span("previous push"):
                    self._wait_until_ended(self._announced)
            try:
                with trace.span("plan"):
                    plan, generation = self.controller.ensure_plan(key, lambda: list(self._sources.values()))
            except (PlanError, ControlPlaneError) as e:
                # Everyone hears why: a refused plan, or a registration this side could not verify.
                kind = "error" if isinstance(e, PlanError) else "refused"
                self.control.set_many({push_key(seq): (kind, str(e)), PUSH_LATEST: seq})
                raise
            announced = ("go", version, plan.fingerprint, generation, *self._delta_go(plan, generation))
            with trace.span("go"):
                self.control.set_many({push_key(seq): announced, PUSH_LATEST: seq})
            ring(self._go_bells(plan))
            self._announced = seq
            self._last_go = (plan.fingerprint, generation, version)
        else:
            # A refused (forged) value under the push key counts as not announced yet: rank 0's replaces it.
            with trace.span("go"):
                (announced,) = self.control.wait_values([push_key(seq)], accept=is_announcement,
                                                        what="a push announcement",
                                                        describe=lambda _: f"trainer rank 0 to publish push {seq}")
        if announced[0] == "error":
            raise PlanError(announced[1])
        if announced[0] == "refused":
            raise ControlPlaneError(announced[1])
        _, _, fp, generation, base, verify = announced
        self._go = (base, verify)
        if self._plan is None or self._plan.fingerprint != fp:
            with trace.span("connect"):
                self._load_plan(fp, generation, seq)
        elif generation != self._generation or self._transport is None:
            with trace.span("connect"):
                self._open_transport(generation, seq)  # a push failed since: its connections may be unusable
        return local

    def _go_bells(self, plan) -> list[str]:
        """Controller: the doorbells on this host of every receiver of ``plan`` and of the other
        sender ranks, all waiting for its announcements; read once per plan."""
        if self._ring_go[0] != plan.fingerprint:
            registered = [plan.registered_rank(s) for s in range(plan.num_receivers)]
            self._ring_go = (plan.fingerprint, self.control.bells("receiver", registered, self.host)
                             + self.control.bells("sender", range(1, self.world_size), self.host))
        return self._ring_go[1]

    def _delta_go(self, plan, generation: int) -> tuple[int | None, bool]:
        """Controller: the (delta base, verify) of the push it announces next.

        A delta only on top of the last push, announced under the same plan and transport
        generation: any failure since (counted before this is read), a re-plan (receivers
        registered again) or a first push makes this a full ("anchor") push. Receivers
        refuse a base they do not hold, which fails the push and so anchors the next.
        """
        if self.config.delta == "off" or plan.transport not in DELTA_KINDS:
            return None, False  # verification rides on the delta pass's digests
        self._num_goes += 1
        verify = self.config.verify_every > 0 and self._num_goes % self.config.verify_every == 0
        last = self._last_go
        return (last[2] if last is not None and last[:2] == (plan.fingerprint, generation) else None), verify

    def _wait_until_ended(self, seq: int) -> None:
        """Controller: every sender rank ended push ``seq`` (done or failed), so a failure
        there is counted before the next announcement reads the count."""
        done = [done_key(seq, r) for r in range(self.world_size)]
        if self.control.has_all(done):
            return
        self.control.wait_each([(d, sender_error_key(seq, r)) for r, d in enumerate(done)],
                               describe=lambda ranks: f"sender ranks {ranks} to end push {seq}")

    def _load_plan(self, fp: str, generation: int, seq: int) -> None:
        key = plan_sender_key(fp, self.rank)
        if not self.control.has(key):  # the controller writes plans before it announces them
            raise ControlPlaneError(f"push {seq} names plan {fp}, which is not on the control plane", key=key)
        plan = self.control.get(key, expect=SenderPlan)
        if plan.fingerprint != fp or plan.rank != self.rank:
            raise ControlPlaneError(f"control key {key} holds the plan of sender {plan.rank} with fingerprint "
                                    f"{plan.fingerprint}", key=key)
        self._plan = plan
        self._full_bytes = sum(t.nbytes for t in plan.tasks)  # what a full push sends from this rank
        self.control.set_pollers(self._plan.num_senders + self._plan.num_receivers)
        for ranks in self._plan.groups:
            if ranks not in self._groups:
                # Sync's own groups, so its collectives never interleave with FSDP's.
                self._groups[ranks] = self.trainers.new_group(ranks) if len(ranks) > 1 else None
        self._open_transport(generation, seq)

    def _open_transport(self, generation: int, seq: int) -> None:
        """The plan's transport (and the packer that may write through it), new for each generation.

        Built inside push ``seq``: its setup stops waiting for peers once that push failed
        elsewhere (a receiver that could not set up its side says so in its ack)."""
        plan = self._plan
        registered = [plan.registered_rank(s) for s in range(plan.num_receivers)]
        receivers = {s: dataclasses.replace(meta, rank=s) for s, meta in
                     enumerate(self.control.get_many([recv_meta_key(r) for r in registered], expect=ReceiverMeta))}
        if self._transport is not None:
            if self._pack_stream is not None:
                self._pack_stream.synchronize()  # a failed push may have left writes into its mappings queued
            self._transport.close()
            self._transport = None  # a failed build below leaves none, and the next push builds again
            self._packer = None  # its recorded launches hold the old mappings
        send_cls, _ = get_transport(self._plan.transport)
        errors = ([ack_key(seq, r) for r in registered]
                  + [sender_error_key(seq, s) for s in range(self.world_size)])
        self._transport = send_cls(self.control, self._plan, receivers, self.config, self.host,
                                   generation=generation, abort=lambda: self.control.failure_in(seq, errors))
        self._generation = generation
        self._ring_done = self.control.bells("receiver", [plan.registered_rank(r) for r in plan.receivers], self.host)
        kind = DELTA_KINDS.get(plan.transport) if self.config.delta != "off" else None
        # A delta diffs every payload against its shadow first, so the packer hands them over
        # instead of writing destinations; a new transport starts with no shadow (an anchor).
        pinned = self.config.delta_shadow == "pinned"
        self._delta = (DeltaSender(plan.tasks, self.device, mode=self.config.delta, one_sided=kind == "one_sided",
                                   kernels=self.config.kernels, pinned=pinned) if kind else None)
        # One-sided with grouped kernels, into buffers on the sender's kind of device (cuda_ipc
        # from a GPU, shm from the CPU), the packer's own stores find the change as they write
        # (fsdp_sync.delta_stores); else the delta pass diffs the packed payloads.
        same_kind = (plan.transport == "cuda_ipc") == (self.device.type == "cuda")
        self._stores = (DeltaStores(self.device, pinned=pinned) if kind == "one_sided" and same_kind and self.config.fused_writes
                        and groups_launches(self.device, self.config.kernels) else None)
        fused = self.config.fused_writes and (self._delta is None or self._stores is not None)
        self._packer = BucketPacker(self._plan, self._sources, self._groups, self.device,
                                    destination=self._transport.destination if fused else None,
                                    kernels=self.config.kernels, remote=self._transport.writes_to_peer,
                                    check_finite=self.config.check_finite, delta=self._stores,
                                    staging_slots=STAGING_SLOTS)

    # -- the push itself -----------------------------------------------------------------
    def _run(self, handle: PushHandle, local: dict[str, torch.Tensor], submitted: float) -> None:
        seq, plan = handle.seq, self._plan
        base, verify = self._go
        stats = DeltaStats()
        trace = handle._trace
        announce_stages = set(trace.stage_seconds()) | {"handoff"}  # the rest are this thread's
        started = time.perf_counter()
        trace.add("handoff", submitted, started)  # queued until this thread took the push
        budget = ByteBudget(self.config.watermark_bytes)
        try:
            if plan.gated:
                # Staged or paused receivers open their buffers to this push explicitly; a
                # forged ready key must not let bytes into buffers the engine may be reading.
                gated = [plan.registered_rank(s) for s in plan.gated]
                self.control.wait_values([ready_key(seq, r) for r in gated], accept=lambda v: v is True,
                                         what="True",
                                         describe=lambda ks: f"receivers {sorted(int(k.rsplit('/', 1)[1]) for k in ks)} "
                                         f"to open their buffers for push {seq}",
                                         abort=lambda: self.control.failure_in(seq, [ack_key(seq, r) for r in gated]))
            sent = 0
            stream = self._pack_stream
            if stream is not None:
                stream.wait_event(handle._weights_ready)  # the optimizer step's writes, not later work

            def produce(bucket) -> tuple:
                # Packing runs on its own stream; the event tells the transfer thread when
                # the bucket's bytes (or its direct writes into peer buffers) and its
                # inf/NaN verdict are complete.
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    items, check = self._packer.pack(bucket, local, trace)
                    if self._delta is not None:
                        with trace.span("delta", f"bucket {bucket.index}"):
                            items = self._delta.encode(items, delta=base is not None, stats=stats,
                                                       destination=self._transport.destination, verify=verify)
                    event = torch.cuda.Event() if stream is not None else None
                    if event is not None:
                        event.record(stream)
                return items, check, event

            def transfer(packed: tuple) -> None:
                nonlocal sent
                items, check, event = packed
                if event is not None:
                    event.synchronize()
                if check is not None:
                    check.raise_if_not_finite()  # before this bucket's bytes leave, and before "done"
                self._transport.send(items)
                sent += 1
                if self._progress is not None:
                    self._progress(sent, len(plan.buckets))

            stores = self._stores
            if stores is not None:
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    stores.begin(delta=base is not None)
            if self._transfer_thread is None:
                self._transfer_thread = PushThread(f"fsdp_sync-transfer-rank{self.rank}")
            run_pipeline(plan.buckets, nbytes=lambda b: b.nbytes, produce=produce, transfer=transfer,
                         budget=budget, trace=trace, worker=self._transfer_thread, held=_payload_bytes,
                         slots=self._packer.slots or None)
            if stores is not None:
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    stored, changed = stores.end()
                    if verify:
                        stats.digests.update(stores.digests())
                stats.bytes_sent += stored
                stats.changed += changed
            with trace.span("finish"):
                self._transport.finish()
            if verify:  # what this rank sent, for each receiver to compare its destinations with
                self.control.set(verify_key(seq, self.rank), stats.digests)
            with trace.span("done"):
                self.control.set(done_key(seq, self.rank), True)
                ring(self._ring_done)
        except BaseException as e:  # noqa: BLE001 - recorded for the receivers, raised in wait()
            try:
                self.control.record_failure(seq)
                self.control.set(sender_error_key(seq, self.rank), f"sender {self.rank} failed in push {seq}: {e!r}")
                ring(self._ring_done + self._ring_go[1])
            except SyncError:  # the store is gone too: nobody is left to tell
                pass
            handle._outcome["error"] = e if isinstance(e, SyncError) else SyncError(f"push {seq} failed on sender {self.rank}: {e!r}")
            handle._outcome["error"].__cause__ = e
            return
        seconds = time.perf_counter() - started
        floor = self.controller.plan.stats.floor_s if self.controller else None
        full = self._full_bytes
        stages = trace.stage_seconds()
        handle._outcome["result"] = PushResult(
            handle.version, seq, seconds, stats.bytes_sent if self._delta else full,
            {k: v for k, v in stages.items() if k not in announce_stages},
            budget.peak, floor, None, full_bytes=full, delta_base=base if self._delta else None,
            changed_fraction=stats.changed / stats.elements if self._delta and stats.elements else None,
            shadow_bytes=(self._delta.shadow_bytes + (self._stores.shadow_bytes if self._stores else 0)
                          if self._delta else 0),
            staging_bytes=self._packer.staging_bytes,
            announce_seconds={k: v for k, v in stages.items() if k in announce_stages})

    def _wait_for_acks(self, seq: int, version: int, receivers: list[int]) -> None:
        keys = [ack_key(seq, r) for r in receivers]
        acks = self.control.wait_values(keys, accept=lambda v: type(v) is str, what="a str",
                                        describe=lambda ks: f"receivers {sorted(int(k.rsplit('/', 1)[1]) for k in ks)} "
                                        f"to commit version {version}")
        failures = [a for a in acks if a != "ok"]
        if failures:
            raise SyncError(f"version {version} did not land: " + "; ".join(failures))


def _payload_bytes(packed: tuple) -> int:
    """What a produced bucket holds until its transfer: its payloads, tensors or a delta's
    encoded bodies (None where a weight was written straight into its destination)."""
    total = 0
    for _, payload in packed[0]:
        data = payload.body if isinstance(payload, Encoded) else payload
        if data is not None:
            total += data.numel() * data.element_size()
    return total


def _model_device(model: nn.Module) -> torch.device:
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        return p.to_local().device if isinstance(p, DTensor) else p.device
    return torch.device("cpu")
