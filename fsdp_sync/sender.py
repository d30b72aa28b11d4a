"""The trainer's side: ``WeightSender(model, config).push()`` on every training rank.

Every rank calls ``push`` together (SPMD), after ``optimizer.step()``. Rank 0 plans
(once) and publishes the push; each rank then runs its part of the plan through the
pipeline on a background thread and returns a handle at once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .config import SyncConfig
from .control import (ControlPlane, PUSH_LATEST, ack_key, done_key, plan_sender_key, push_key, ready_key,
                      recv_meta_key, sender_closed_key, sender_error_key, sender_host_key)
from .controller import Controller
from .errors import PlanError, SyncError, SyncTimeout
from .meta import SourceParam, device_id, source_params
from .packing import BucketPacker
from .param_scan import ParamScan
from .pipeline import ByteBudget, run_pipeline
from .plan import SenderPlan
from .trace import Trace
from .transport import get_transport


@dataclass
class PushResult:
    """What one push cost on this rank."""

    version: int
    seq: int
    seconds: float
    bytes_sent: int
    stage_seconds: dict[str, float]
    peak_bytes: int
    floor_s: float | None = None  # the plan's floor, known on the controller
    trace_path: str | None = None


@dataclass
class PushHandle:
    """A push in flight; ``wait()`` returns its PushResult or raises its error."""

    version: int
    seq: int
    _thread: threading.Thread | None = None
    _outcome: dict = field(default_factory=dict)
    _weights_ready: object = None  # a CUDA event after the step that produced these weights
    _after: Callable[[], None] | None = None

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> PushResult:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"push of version {self.version} still running after {timeout}s")
        if "error" in self._outcome:
            raise self._outcome["error"]
        if self._after is not None:
            self._after()
            self._after = None
        return self._outcome["result"]


class WeightSender:
    """Pushes an FSDP2 model's weights to the registered receivers, replaying one plan."""

    def __init__(self, model: nn.Module, config: SyncConfig, *, host: str | None = None,
                 device: torch.device | None = None, progress: Callable[[int, int], None] | None = None):
        """``progress(done, total)`` is called from the transfer thread after each bucket lands."""
        if not dist.is_initialized():
            raise SyncError("WeightSender needs torch.distributed initialized in the trainer job")
        self.model = model
        self.config = config
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.host = host or socket.gethostname()
        self.device = device or _model_device(model)
        self._hosts_store = self.rank == 0 and config.host_control
        self.control = ControlPlane.connect(config, serve=self._hosts_store)
        self.control.set(sender_host_key(self.rank), (self.host, device_id(self.device)))
        self.controller = Controller(self.control, config, self.world_size) if self.rank == 0 else None
        self.version: int | None = None
        self.seq = self.control.get(PUSH_LATEST) if self.control.has(PUSH_LATEST) else 0
        self._plan: SenderPlan | None = None
        self._sources: dict[str, SourceParam] = {}
        self._sources_key: tuple | None = None
        self._scan = ParamScan(model, self._mesh_ranks, buffers=config.buffers)
        self._groups: dict[tuple[int, ...], object] = {}
        self._meshes: dict[int, tuple[object, tuple[int, ...]]] = {}  # id -> (mesh kept alive, its ranks)
        self._transport = None
        self._generation = 0  # of the transport: PUSH_FAILURES when it was built
        self._announced: int | None = None  # controller: the last push it announced with "go"
        self._packer: BucketPacker | None = None
        self._inflight: PushHandle | None = None
        self._progress = progress
        self._pack_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._hooks: list = []
        self._closed = False
        self.stall_s: list[float] = []  # per attached optimizer step: time step() waited for pushes

    @property
    def num_plans_built(self) -> int:
        """How many times this rank planned (only the controller plans)."""
        return self.controller.num_plans_built if self.controller else 0

    @property
    def last_push(self) -> PushHandle | None:
        """The newest push, also when attach() started it: its ``wait()`` gives the PushResult."""
        return self._inflight

    def push(self, version: int | None = None) -> PushHandle:
        """Start pushing the current weights as ``version`` (default: last + 1)."""
        if self._inflight is not None and not self._inflight.done():
            self._inflight.wait()
        version = (0 if self.version is None else self.version + 1) if version is None else int(version)
        if self.version is not None and version <= self.version:
            raise ValueError(f"version {version} does not increase: version {self.version} was pushed already")
        seq = self.seq + 1
        try:
            local = self._publish(seq, version)
        except PlanError:
            self.seq = seq  # receivers saw the refusal under this push number: the next push is seq + 1
            raise
        except Exception as e:
            if self.control.has(push_key(seq)):  # announced: the others are in this push, so it fails
                self.seq = seq
                self.control.record_failure(seq)
                self.control.set(sender_error_key(seq, self.rank), f"sender {self.rank} could not set up push "
                                 f"{seq}: {e!r}")
            raise
        self.seq, self.version = seq, version
        handle = PushHandle(version, seq)
        if self._pack_stream is not None:
            handle._weights_ready = torch.cuda.Event()
            handle._weights_ready.record(torch.cuda.current_stream(self.device))
        handle._thread = threading.Thread(target=self._run, args=(handle, local), name=f"fsdp_sync-push-{seq}", daemon=True)
        if self.config.wait_for_receivers:
            num_receivers = self._plan.num_receivers
            handle._after = lambda: self._wait_for_acks(seq, version, num_receivers)
        handle._thread.start()
        self._inflight = handle
        return handle

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
        if self._transport is not None:
            self._transport.close()
        self._packer = None  # its recorded launches hold the receivers' mapped tensors
        self._leave_control_plane(wait_for_peers=not failed)

    def _leave_control_plane(self, *, wait_for_peers: bool) -> None:
        """The rank hosting the store waits for every sender rank to close first.

        Its exit takes the store down; a rank still reading its last acks would then fail
        with a closed connection. After a failed push a peer may be dead, so the host
        waits 2 s at most; otherwise a rank that never closes costs it one timeout.
        """
        try:
            self.control.set(sender_closed_key(self.rank), True)
        except Exception:  # noqa: BLE001 - the store is gone already: nobody is left to wait for us
            return
        if not self._hosts_store:
            return
        keys = [sender_closed_key(r) for r in range(self.world_size)]
        try:
            # After a failed push a peer may be dead: wait briefly, not a whole timeout.
            self.control.wait(keys, timeout_s=None if wait_for_peers else min(self.config.timeout_s, 2.0),
                              describe=lambda missing: f"trainer ranks closing their senders ({missing})")
        except SyncTimeout as e:
            warnings.warn(f"fsdp_sync: closing the control plane anyway: {e}", stacklevel=3)
        for key in keys:
            self.control.store.delete_key(key)

    # -- planning ----------------------------------------------------------------------
    def _mesh_ranks(self, mesh) -> tuple[int, ...]:
        """The mesh's ranks, once per mesh object: ``DeviceMesh.mesh`` is rebuilt on every
        access in recent torch (~70 us), and every push checks every parameter's mesh."""
        hit = self._meshes.get(id(mesh))
        if hit is None or hit[0] is not mesh:
            hit = self._meshes[id(mesh)] = (mesh, tuple(mesh.mesh.reshape(-1).tolist()))
        return hit[1]

    def _publish(self, seq: int, version: int) -> dict[str, torch.Tensor]:
        """Controller: plan if needed, then announce the push. Everyone: load the announced plan.

        Returns this rank's local shards, by parameter name, for the push to read."""
        key, local = self._scan.scan()
        if key != self._sources_key:
            self._sources = {s.name: s for s in source_params(self.model, world_size=self.world_size,
                                                                 buffers=self.config.buffers)}
            self._sources_key = key
        if self.controller is not None:
            if self._announced is not None:  # first, so its failure is in the count read next
                self._wait_until_ended(self._announced)
            try:
                plan, generation = self.controller.ensure_plan(key, lambda: list(self._sources.values()))
            except PlanError as e:
                self.control.set_many({push_key(seq): ("error", str(e)), PUSH_LATEST: seq})
                raise
            announced = ("go", version, plan.fingerprint, generation)
            self.control.set_many({push_key(seq): announced, PUSH_LATEST: seq})
            self._announced = seq
        else:
            self.control.wait([push_key(seq)], describe=lambda _: f"trainer rank 0 to publish push {seq}")
            announced = self.control.get(push_key(seq))
        if announced[0] == "error":
            raise PlanError(announced[1])
        _, _, fp, generation = announced
        if self._plan is None or self._plan.fingerprint != fp:
            self._load_plan(fp, generation, seq)
        elif generation != self._generation or self._transport is None:
            self._open_transport(generation, seq)  # a push failed since: its connections may be unusable
        return local

    def _wait_until_ended(self, seq: int) -> None:
        """Controller: every sender rank ended push ``seq`` (done or failed), so a failure
        there is counted before the next announcement reads the count."""
        done = [done_key(seq, r) for r in range(self.world_size)]
        if self.control.has_all(done):
            return
        self.control.wait_each([(d, sender_error_key(seq, r)) for r, d in enumerate(done)],
                               describe=lambda ranks: f"sender ranks {ranks} to end push {seq}")

    def _load_plan(self, fp: str, generation: int, seq: int) -> None:
        self._plan = self.control.get(plan_sender_key(fp, self.rank))
        self.control.set_pollers(self._plan.num_senders + self._plan.num_receivers)
        for ranks in self._plan.groups:
            if ranks not in self._groups:
                # Sync's own groups, so its collectives never interleave with FSDP's.
                self._groups[ranks] = dist.new_group(list(ranks)) if len(ranks) > 1 else None
        self._open_transport(generation, seq)

    def _open_transport(self, generation: int, seq: int) -> None:
        """The plan's transport (and the packer that may write through it), new for each generation.

        Built inside push ``seq``: its setup stops waiting for peers once that push failed
        elsewhere (a receiver that could not set up its side says so in its ack)."""
        receivers = {r: self.control.get(recv_meta_key(r)) for r in range(self._plan.num_receivers)}
        if self._transport is not None:
            if self._pack_stream is not None:
                self._pack_stream.synchronize()  # a failed push may have left writes into its mappings queued
            self._transport.close()
            self._transport = None  # a failed build below leaves none, and the next push builds again
            self._packer = None  # its recorded launches hold the old mappings
        send_cls, _ = get_transport(self._plan.transport)
        errors = ([ack_key(seq, r) for r in range(self._plan.num_receivers)]
                  + [sender_error_key(seq, s) for s in range(self.world_size)])
        self._transport = send_cls(self.control, self._plan, receivers, self.config, self.host,
                                   generation=generation, abort=lambda: self.control.failure_in(seq, errors))
        self._generation = generation
        self._packer = BucketPacker(self._plan, self._sources, self._groups, self.device,
                                    destination=self._transport.destination if self.config.fused_writes else None,
                                    kernels=self.config.kernels, remote=self._transport.writes_to_peer)

    # -- the push itself -----------------------------------------------------------------
    def _run(self, handle: PushHandle, local: dict[str, torch.Tensor]) -> None:
        seq, plan = handle.seq, self._plan
        trace = Trace(self.rank)
        budget = ByteBudget(self.config.watermark_bytes)
        started = time.perf_counter()
        try:
            if plan.gated:
                # Staged or paused receivers open their buffers to this push explicitly.
                self.control.wait([ready_key(seq, r) for r in plan.gated],
                                  describe=lambda ks: f"receivers {sorted(int(k.rsplit('/', 1)[1]) for k in ks)} "
                                  f"to open their buffers for push {seq}",
                                  abort=lambda: self.control.failure_in(seq, [ack_key(seq, r) for r in plan.gated]))
            sent = 0
            stream = self._pack_stream
            if stream is not None:
                stream.wait_event(handle._weights_ready)  # the optimizer step's writes, not later work

            def produce(bucket) -> tuple:
                # Packing runs on its own stream; the event tells the transfer thread when
                # the bucket's bytes (or its direct writes into peer buffers) are complete.
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    items = self._packer.pack(bucket, local, trace)
                    event = torch.cuda.Event() if stream is not None else None
                    if event is not None:
                        event.record(stream)
                return items, event

            def transfer(packed: tuple) -> None:
                nonlocal sent
                items, event = packed
                if event is not None:
                    event.synchronize()
                self._transport.send(items)
                sent += 1
                if self._progress is not None:
                    self._progress(sent, len(plan.buckets))

            run_pipeline(plan.buckets, nbytes=lambda b: b.nbytes, produce=produce, transfer=transfer,
                         budget=budget, trace=trace)
            self._transport.finish()
            self.control.set(done_key(seq, self.rank), True)
        except BaseException as e:  # noqa: BLE001 - recorded for the receivers, raised in wait()
            self.control.record_failure(seq)
            self.control.set(sender_error_key(seq, self.rank), f"sender {self.rank} failed in push {seq}: {e!r}")
            handle._outcome["error"] = e if isinstance(e, SyncError) else SyncError(f"push {seq} failed on sender {self.rank}: {e!r}")
            handle._outcome["error"].__cause__ = e
            return
        seconds = time.perf_counter() - started
        path = trace.write_chrome(self.config.trace_dir, f"push{seq}") if self.config.trace_dir else None
        floor = self.controller.plan.stats.floor_s if self.controller else None
        handle._outcome["result"] = PushResult(handle.version, seq, seconds, sum(t.nbytes for t in plan.tasks),
                                               trace.stage_seconds(), budget.peak, floor, path)

    def _wait_for_acks(self, seq: int, version: int, num_receivers: int) -> None:
        keys = [ack_key(seq, r) for r in range(num_receivers)]
        self.control.wait(keys, describe=lambda ks: f"receivers {sorted(int(k.rsplit('/', 1)[1]) for k in ks)} "
                          f"to commit version {version}")
        failures = [a for a in self.control.get_many(keys) if a != "ok"]
        if failures:
            raise SyncError(f"version {version} did not land: " + "; ".join(failures))


def _model_device(model: nn.Module) -> torch.device:
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        return p.to_local().device if isinstance(p, DTensor) else p.device
    return torch.device("cpu")
