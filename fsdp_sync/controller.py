"""The controller (trainer rank 0): gathers metadata, plans once, publishes each push.

A plan is keyed by what it was computed from: the model's parameter layout and the
receivers' registration epoch. While both stay the same, every push replays the cached
plan; when either changes, the next push re-plans.
"""

from __future__ import annotations

import logging
import dataclasses
import time
from typing import Callable

from .claims import STALE_AFTER_S, heartbeat_key
from .config import SyncConfig
from .control import (PUSH_FAILURES, RECV_COUNT, RECV_EPOCH, ControlPlane, plan_receiver_key, plan_sender_key,
                      recv_meta_key, sender_host_key)
from .errors import ControlPlaneError, PlanError, SyncTimeout
from .meta import ReceiverMeta, SourceParam
from .plan import Plan
from .planner import build_plan
from .transport.auto import resolve as resolve_auto

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, control: ControlPlane, config: SyncConfig, num_senders: int, run_id: str = ""):
        self.control = control
        self.run_id = run_id
        self.config = config
        self.num_senders = num_senders
        self.plan: Plan | None = None
        self.plan_key: tuple | None = None
        self.num_plans_built = 0
        self.dropped: set[tuple[int, str]] = set()  # (rank, registration) of receivers left out
        self._failures_seen = 0
        self._beats: tuple[float, dict[int, int]] | None = None  # heartbeats when the last push was announced
        control.add(PUSH_FAILURES, 0)  # exists from now on, so it can be read with the epoch

    def ensure_plan(self, sources_key: tuple, sources: Callable[[], list[SourceParam]]) -> tuple[Plan, int]:
        """The cached plan if its inputs are unchanged, else a new validated, published plan;
        with the count of failed pushes (the transports' generation), read in the same round trip."""
        if self.plan is not None:  # receivers registered: the epoch exists
            epoch, failures = self.control.counters([RECV_EPOCH, PUSH_FAILURES])
            dropped = self._drop_dead_receivers(failures)
            if (sources_key, epoch) == self.plan_key and not dropped:
                self._note_heartbeats()
                return self.plan, failures
        receivers = self._receivers()
        check_shared_settings(self.config, receivers)
        check_model_layouts(receivers)
        key = (sources_key, self.control.add(RECV_EPOCH, 0))
        places = self._sender_places()
        # The planner numbers receivers 0..n-1: once some were dropped, slots stand for ranks.
        slotted = [dataclasses.replace(m, rank=slot) for slot, m in enumerate(receivers)]
        plan = build_plan(sources(), slotted, sender_hosts=[h for h, _ in places], mode=self.config.mode,
                          links=self.config.links, watermark_bytes=self.config.watermark_bytes,
                          sender_devices=[d for _, d in places])
        ranks = tuple(m.rank for m in receivers)
        plan.receiver_ranks = ranks if ranks != tuple(range(len(ranks))) else ()
        # Per run: a restarted trainer on a store that outlived it never meets the old run's keys.
        plan.fingerprint = f"{plan.fingerprint}.{self.run_id}" if self.run_id else plan.fingerprint
        plan.transport = self.config.transport if self.config.transport != "auto" else resolve_auto(
            [h for h, _ in places], receivers)
        self.num_plans_built += 1
        log.info("fsdp_sync: planned %d tasks, %.1f MB, floor %.3f s, in %.2f s", plan.stats.num_tasks,
                 plan.stats.bytes_total / 1e6, plan.stats.floor_s, plan.stats.plan_s)
        for s in range(plan.num_senders):
            self.control.set(plan_sender_key(plan.fingerprint, s), plan.for_sender(s))
        for slot in range(plan.num_receivers):
            self.control.set(plan_receiver_key(plan.fingerprint, plan.registered_rank(slot)), plan.for_receiver(slot))
        self.plan, self.plan_key = plan, key
        failures = self.control.add(PUSH_FAILURES, 0)
        self._failures_seen = failures
        self._note_heartbeats()
        return plan, failures

    def _receivers(self) -> list[ReceiverMeta]:
        """Every registered receiver; under ``drop``, those registered so far (after one
        timeout for the first plan) less the dropped ones."""
        self.control.wait([RECV_COUNT], describe=lambda _: "the inference job to register its receivers "
                          f"(is it running with SyncConfig.job={self.config.job!r} and control={self.config.control!r}?)")
        count = self.control.get(RECV_COUNT, expect=int)
        if count < 1:
            raise ControlPlaneError(f"control key {RECV_COUNT} holds {count} receivers", key=RECV_COUNT)
        keys = [recv_meta_key(r) for r in range(count)]
        elastic = self.config.on_receiver_failure == "drop"
        try:
            self.control.wait(keys, timeout_s=0.0 if elastic and self.plan is not None else None,
                              describe=lambda keys: f"receiver ranks {sorted(int(k.rsplit('/', 1)[1]) for k in keys)} to register")
        except SyncTimeout:
            if not elastic:
                raise
        present = [r for r, k in enumerate(keys) if self.control.has(k)]
        metas = self.control.get_many([keys[r] for r in present], expect=ReceiverMeta)
        for r, meta in zip(present, metas):
            if meta.rank != r:
                raise ControlPlaneError(f"control key {keys[r]} holds the registration of receiver {meta.rank}",
                                        key=keys[r])
        metas = [m for m in metas if (m.rank, m.registration) not in self.dropped]
        if not metas:
            raise SyncTimeout(f"no live receiver is registered (dropped: {sorted(r for r, _ in self.dropped)})")
        if elastic and len(metas) < count:
            log.warning("fsdp_sync: planning for receiver ranks %s of %d (on_receiver_failure='drop')",
                        [m.rank for m in metas], count)
        return metas

    def _note_heartbeats(self) -> None:
        """Under ``drop``: the planned receivers' heartbeats as a push is announced, to tell later
        which of them died if the push fails."""
        if self.config.on_receiver_failure != "drop":
            return
        ranks = [self.plan.registered_rank(s) for s in range(self.plan.num_receivers)]
        self._beats = (time.monotonic(), dict(zip(ranks, self.control.counters([heartbeat_key(f"recv/{r}") for r in ranks]))))

    def _drop_dead_receivers(self, failures: int) -> bool:
        """Under ``drop``, after a push failed: leave out the planned receivers whose heartbeat
        stopped since it was announced. Whether any was dropped."""
        if self.config.on_receiver_failure != "drop" or failures == self._failures_seen or self._beats is None:
            return False
        self._failures_seen = failures
        since, before = self._beats
        time.sleep(max(0.0, since + STALE_AFTER_S - time.monotonic()))  # a live heartbeat moves within this
        now = dict(zip(before, self.control.counters([heartbeat_key(f"recv/{r}") for r in before])))
        dead = [r for r in before if now[r] == before[r]]
        if not dead:
            return False
        metas = self.control.get_many([recv_meta_key(r) for r in dead], expect=ReceiverMeta)
        self.dropped |= {(m.rank, m.registration) for m in metas}
        log.warning("fsdp_sync: dropping receiver ranks %s after a failed push: their heartbeat stopped "
                    "(on_receiver_failure='drop'); pushing on to the rest", dead)
        return True

    def _sender_places(self) -> list[tuple[str, str]]:
        """(host, device id) of every sender rank."""
        keys = [sender_host_key(s) for s in range(self.num_senders)]
        self.control.wait(keys, describe=lambda ks: f"sender ranks {sorted(int(k.rsplit('/', 1)[1]) for k in ks)} to start")
        places = self.control.get_many(keys, expect=tuple)
        for key, place in zip(keys, places):
            if len(place) != 2 or not all(type(p) is str for p in place):
                raise ControlPlaneError(f"control key {key} holds {place!r:.80}, not (host, device id)", key=key)
        return places



def check_shared_settings(config: SyncConfig, receivers: list[ReceiverMeta]) -> None:
    """Refuse, before planning, receivers whose shared settings differ from the trainer's.

    A receiver built with ``quant="none"`` beside a trainer's ``fp8_block`` would otherwise
    take full-precision bytes without a word; every such difference is named with both values.
    """
    ours = config.shared_settings()
    problems = []
    for name, value in ours.items():
        theirs: dict[object, list[int]] = {}
        for meta in receivers:
            got = meta.settings.get(name, "<unset: an older fsdp_sync>")
            if got != value:
                theirs.setdefault(got, []).append(meta.rank)
        for got, ranks in theirs.items():
            what = "the control-plane protocol" if name == "protocol" else f"SyncConfig.{name}"
            problems.append(f"{what} is {value!r} on the trainer but {got!r} on receiver ranks {ranks}")
    if problems:
        raise PlanError("the trainer and the inference job must share these settings: " + "; ".join(problems))


# Layout keywords that place a receiver in its engine's parallel layout, which replicas may
# set differently; every other keyword describes the model, which all receivers serve alike.
PARALLEL_KEYWORDS = frozenset({"tp_rank", "tp_size", "dp_rank", "dp_size", "ep_size", "expert_parallel",
                               "expert_placement"})


def check_model_layouts(receivers: list[ReceiverMeta]) -> None:
    """Refuse receivers whose layouts describe different models (another layout, other head
    counts, other naming rules): each would take bytes meant for a model it does not serve.

    Their parallel coordinates may differ (replicas of TP 2 beside TP 4); nothing else may.
    """
    def described(meta: ReceiverMeta) -> dict[str, object]:
        kwargs = {k: v for k, v in meta.layout.kwargs.items() if k not in PARALLEL_KEYWORDS}
        return {"layout": meta.layout.name, **{f"layout_kwargs[{k!r}]": v for k, v in kwargs.items()}}

    views = {meta.rank: described(meta) for meta in receivers}
    problems = []
    for key in sorted({k for view in views.values() for k in view}):
        by_value: dict[str, list[int]] = {}
        for rank, view in sorted(views.items()):
            by_value.setdefault(repr(view.get(key, "<not set>")), []).append(rank)
        if len(by_value) > 1:
            problems.append(f"{key} is " + " but ".join(f"{value} on receiver ranks {ranks}"
                                                       for value, ranks in by_value.items()))
    if problems:
        raise PlanError("the receivers must describe the same model: " + "; ".join(problems))
