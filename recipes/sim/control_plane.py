"""The control plane's per-push cost against the number of ranks, measured on CPU and extrapolated.

Two measurements, both on a machine of 2 cores shared with other work:

* ``recipes.bench_push_overhead --senders N --receivers M --params 4``: the real control
  plane (TCPStore, WeightSender, WeightReceiver, shm) in N + M processes with tiny
  weights (``push-overhead-cpu-shm-4-<N>x<M>-*.json``). N + M interpreters take turns on 2
  cores, so a push waits until each has been scheduled: 3.6 ms at 4 processes, 45.6 at 32,
  151 at 48 (load average near 30 from other work then). Oversubscription, not the control
  plane, dominates: a cluster gives every rank cores of its own. Reported, not fed.
* ``recipes.bench_store_fanout --senders N --receivers M``: the store's share of a push at
  full rank count (announce, N + M - 1 readers, M acks, one multi_get), each rank a client
  connection driven by a thread of one process (``store-fanout-cpu-<N>x<M>-*.json``). Up to
  384 ranks; still an upper bound (the threads share one GIL and 2 cores). A straight line
  ``t = a + b ranks`` fits it; the push's cost at scale is the bench's per-push cost plus
  what the line adds from 4 ranks to the rank count asked for.
"""

from __future__ import annotations

import glob
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

_NAME = re.compile(r"push-overhead-cpu-(?P<transport>\w+)-(?P<params>\d+)-(?P<n>\d+)x(?P<m>\d+)-")


@dataclass(frozen=True)
class ControlFit:
    points: tuple[tuple[int, float], ...]  # (processes, median seconds a push)
    intercept_s: float
    per_rank_s: float

    def at(self, num_ranks: int) -> float:
        return self.intercept_s + self.per_rank_s * num_ranks

    @property
    def worst_residual(self) -> float:
        return max(abs(self.at(n) / t - 1) for n, t in self.points)


_FANOUT = re.compile(r"store-fanout-cpu-(?P<n>\d+)x(?P<m>\d+)-")


def control_runs(folder: Path, *, kind: str = "fanout") -> list[tuple[int, int, float]]:
    """(senders, receivers, median push seconds) of each run of ``kind`` ("fanout": the store alone;
    "processes": the whole control plane, a process per rank) in ``folder``."""
    out = []
    pattern, name = (("store-fanout-cpu-*x*-*.json", _FANOUT) if kind == "fanout" else
                     ("push-overhead-cpu-*-*x*-*.json", _NAME))
    for path in sorted(glob.glob(str(folder / pattern))):
        m = name.search(Path(path).name)
        if m is None:
            continue
        report = json.loads(Path(path).read_text())
        out.append((int(m["n"]), int(m["m"]), statistics.median(report["times_s"])))
    return out


def fit_control(runs: list[tuple[int, int, float]]) -> ControlFit:
    if len(runs) < 2:
        raise ValueError(f"need runs at two rank counts at least, got {runs}")
    xs = [n + m for n, m, _ in runs]
    ys = [t for _, _, t in runs]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return ControlFit(tuple(zip(xs, ys)), my - slope * mx, slope)


def push_cost_range(base_push_s: float, num_ranks: int, folder: Path) -> tuple[float, float, ControlFit | None]:
    """(low, high) control-plane seconds a push at ``num_ranks``: the bench's per-push cost (2-4
    ranks), and that plus the store fan-out line's growth from 4 ranks to ``num_ranks``."""
    runs = control_runs(folder, kind="fanout")
    if len(runs) < 2:
        return base_push_s, base_push_s, None
    fit = fit_control(runs)
    return base_push_s, base_push_s + max(0.0, fit.at(num_ranks) - fit.at(4)), fit
