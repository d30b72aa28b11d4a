"""The controller (trainer rank 0): gathers metadata, plans once, publishes each push.

A plan is keyed by what it was computed from: the model's parameter layout and the
receivers' registration epoch. While both stay the same, every push replays the cached
plan; when either changes, the next push re-plans.
"""

from __future__ import annotations

import logging
from typing import Callable

from .config import SyncConfig
from .control import (PUSH_FAILURES, RECV_COUNT, RECV_EPOCH, ControlPlane, plan_receiver_key, plan_sender_key,
                      recv_meta_key, sender_host_key)
from .errors import ControlPlaneError
from .meta import ReceiverMeta, SourceParam
from .plan import Plan
from .planner import build_plan
from .transport.auto import resolve as resolve_auto

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, control: ControlPlane, config: SyncConfig, num_senders: int):
        self.control = control
        self.config = config
        self.num_senders = num_senders
        self.plan: Plan | None = None
        self.plan_key: tuple | None = None
        self.num_plans_built = 0
        control.add(PUSH_FAILURES, 0)  # exists from now on, so it can be read with the epoch

    def ensure_plan(self, sources_key: tuple, sources: Callable[[], list[SourceParam]]) -> tuple[Plan, int]:
        """The cached plan if its inputs are unchanged, else a new validated, published plan;
        with the count of failed pushes (the transports' generation), read in the same round trip."""
        if self.plan is not None:  # receivers registered: the epoch exists
            epoch, failures = self.control.counters([RECV_EPOCH, PUSH_FAILURES])
            if (sources_key, epoch) == self.plan_key:
                return self.plan, failures
        receivers = self._receivers()
        key = (sources_key, self.control.add(RECV_EPOCH, 0))
        places = self._sender_places()
        plan = build_plan(sources(), receivers, sender_hosts=[h for h, _ in places], mode=self.config.mode,
                          links=self.config.links, watermark_bytes=self.config.watermark_bytes,
                          sender_devices=[d for _, d in places])
        plan.transport = self.config.transport if self.config.transport != "auto" else resolve_auto(
            [h for h, _ in places], receivers)
        self.num_plans_built += 1
        log.info("fsdp_sync: planned %d tasks, %.1f MB, floor %.3f s, in %.2f s", plan.stats.num_tasks,
                 plan.stats.bytes_total / 1e6, plan.stats.floor_s, plan.stats.plan_s)
        for s in range(plan.num_senders):
            self.control.set(plan_sender_key(plan.fingerprint, s), plan.for_sender(s))
        for r in range(plan.num_receivers):
            self.control.set(plan_receiver_key(plan.fingerprint, r), plan.for_receiver(r))
        self.plan, self.plan_key = plan, key
        return plan, self.control.add(PUSH_FAILURES, 0)

    def _receivers(self) -> list[ReceiverMeta]:
        self.control.wait([RECV_COUNT], describe=lambda _: "the inference job to register its receivers "
                          f"(is it running with SyncConfig.job={self.config.job!r} and control={self.config.control!r}?)")
        count = self.control.get(RECV_COUNT, expect=int)
        if count < 1:
            raise ControlPlaneError(f"control key {RECV_COUNT} holds {count} receivers", key=RECV_COUNT)
        keys = [recv_meta_key(r) for r in range(count)]
        self.control.wait(keys, describe=lambda keys: f"receiver ranks {sorted(int(k.rsplit('/', 1)[1]) for k in keys)} to register")
        metas = self.control.get_many(keys, expect=ReceiverMeta)
        for key, (r, meta) in zip(keys, enumerate(metas)):
            if meta.rank != r:
                raise ControlPlaneError(f"control key {key} holds the registration of receiver {meta.rank}", key=key)
        return metas

    def _sender_places(self) -> list[tuple[str, str]]:
        """(host, device id) of every sender rank."""
        keys = [sender_host_key(s) for s in range(self.num_senders)]
        self.control.wait(keys, describe=lambda ks: f"sender ranks {sorted(int(k.rsplit('/', 1)[1]) for k in ks)} to start")
        places = self.control.get_many(keys, expect=tuple)
        for key, place in zip(keys, places):
            if len(place) != 2 or not all(type(p) is str for p in place):
                raise ControlPlaneError(f"control key {key} holds {place!r:.80}, not (host, device id)", key=key)
        return places

