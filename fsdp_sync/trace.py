"""Per-stage timings of a push, and their Chrome-trace (Perfetto) JSON."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class Span:
    stage: str
    label: str
    start_s: float
    end_s: float
    thread: str


@dataclass
class Trace:
    """Spans of one push on one rank; stage totals are what the progress table prints."""

    rank: int
    origin_s: float = field(default_factory=time.perf_counter)
    spans: list[Span] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def span(self, stage: str, label: str = "") -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, start, time.perf_counter(), label)

    def add(self, stage: str, start_s: float, end_s: float, label: str = "") -> None:
        """A span measured elsewhere (e.g. begun on another thread), on this thread's row."""
        with self._lock:
            self.spans.append(Span(stage, label, start_s, end_s, threading.current_thread().name))

    def stage_seconds(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for s in self.spans:
            totals[s.stage] += s.end_s - s.start_s
        return dict(totals)

    def write_chrome(self, folder: str, name: str) -> str:
        """Write the spans as Chrome trace events (open in ui.perfetto.dev); returns the path."""
        os.makedirs(folder, exist_ok=True)
        threads = {t: i for i, t in enumerate(sorted({s.thread for s in self.spans}))}
        events = [{"name": s.stage, "cat": "fsdp_sync", "ph": "X", "pid": self.rank, "tid": threads[s.thread],
                   "ts": (s.start_s - self.origin_s) * 1e6, "dur": (s.end_s - s.start_s) * 1e6,
                   "args": {"label": s.label}} for s in self.spans]
        events += [{"name": "thread_name", "ph": "M", "pid": self.rank, "tid": i, "args": {"name": t}}
                   for t, i in threads.items()]
        path = os.path.join(folder, f"{name}.rank{self.rank}.trace.json")
        with open(path, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
        return path
