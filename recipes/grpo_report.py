"""What the GRPO recipe shows and writes: progress bars, a line per step, ``steps.jsonl``, ``grpo.png``.

Lines go through ``logging`` (logger ``grpo``), so Hydra's handlers put them on stdout and
in the run directory's ``grpo.log``; the bars go to stderr, so neither holds a bar. Run
under ``logging_redirect_tqdm`` (as ``recipes.grpo`` does), console lines and bars do not
tear each other.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("grpo")


def step_line(rec: dict, total: int) -> str:
    """One step: its reward, the version(s) its rollouts were sampled with, and the push it overlapped."""
    low, high = rec["version_min"], rec["version_max"]
    versions = f"v{low}" if low == high else f"v{low}-v{high}"
    return (f"step {rec['step']:>4}/{total} | reward {rec['reward']:.3f} | sampled with {versions} | "
            f"push v{rec['push_version']} {rec['push_s'] * 1e3:7.1f} ms | stall {rec['stall_s'] * 1e3:6.2f} ms | "
            f"step {rec['step_s']:.2f} s")


def warmup_line(rec: dict, total: int) -> str:
    return f"warm-up step {rec['step']:>4}/{total} | loss {rec['loss']:.3f}"


class StepLog:
    """Per-step output: a bar for the warm-up, then one for GRPO; ``steps.jsonl`` as steps arrive, a plot at the end.

    ``title`` heads the plot (and is its PNG's Title). A line goes to the log for every
    GRPO step, and for every tenth of the warm-up.
    """

    def __init__(self, out_dir: Path, total: int, *, warmup_total: int = 0, title: str = "GRPO"):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.total = total
        self.warmup_total = warmup_total
        self.title = title
        self.records: list[dict] = []
        self._jsonl = open(out_dir / "steps.jsonl", "w")
        self._bar = None
        if warmup_total:
            self._bar = tqdm(total=warmup_total, unit="step", desc="warm-up", dynamic_ncols=True)
        else:
            self._start_grpo()

    def _start_grpo(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = tqdm(total=self.total, unit="step", desc="GRPO", dynamic_ncols=True)

    def note(self, text: str) -> None:
        log.info(text)

    def warmup_step(self, rec: dict) -> None:
        every = max(1, self.warmup_total // 10)
        if rec["step"] % every == 0 or rec["step"] in (1, self.warmup_total):
            log.info(warmup_line(rec, self.warmup_total))
        self._bar.set_postfix(loss=f"{rec['loss']:.3f}")
        self._bar.update(1)

    def warmup_done(self, text: str) -> None:
        """The warm-up and its push of version 0 are over: its summary line, then the GRPO bar."""
        log.info(text)
        if self._bar.desc.startswith("warm-up"):
            self._start_grpo()

    def step(self, rec: dict) -> None:
        self.records.append(rec)
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()
        log.info(step_line(rec, self.total))
        self._bar.set_postfix(reward=f"{rec['reward']:.2f}")
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
        self._jsonl.close()
        if self.records:
            plot(self.records, self.out_dir / "grpo.png", title=self.title)


def summary(records: list[dict], wall_s: float) -> str:
    """Reward at the start and the end, and how much of the push time the trainer waited for."""
    window = max(1, min(10, len(records) // 4))
    first = statistics.fmean(r["reward"] for r in records[:window])
    last = statistics.fmean(r["reward"] for r in records[-window:])
    push = [r["push_s"] for r in records]
    stall = [r["stall_s"] for r in records]
    steps_s = sum(r["step_s"] for r in records)
    line = (f"GRPO: {len(records)} steps in {steps_s:.0f} s ({wall_s:.0f} s in all) | "
            f"reward {first:.3f} (first {window} steps) -> {last:.3f} (last {window}) | "
            f"push median {statistics.median(push) * 1e3:.1f} ms, "
            f"stall median {statistics.median(stall) * 1e3:.2f} ms, "
            f"stall/push {sum(stall) / sum(push) if sum(push) else 0.0:.1%}")
    steady = [r for r in records[5:] if r.get("delta_base") is not None]
    if steady:  # delta pushes after step 5: bytes moved against full pushes of the same versions
        sent, full = sum(r["push_bytes"] for r in steady), sum(r["push_full_bytes"] for r in steady)
        line += (f" | delta after step 5: {sent / full:.2%} of the full bytes, "
                 f"{statistics.fmean(r['changed_fraction'] for r in steady):.2%} of weights changed")
    return line


def plot(records: list[dict], path: Path, *, title: str = "GRPO") -> None:
    """Reward (and its moving mean) and push/stall milliseconds per step, under ``title``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    rewards = [r["reward"] for r in records]
    span = 10
    mean = [statistics.fmean(rewards[max(0, i - span + 1):i + 1]) for i in range(len(rewards))]
    delta = any(r.get("delta_base") is not None for r in records)
    fig, axes = plt.subplots(3 if delta else 2, 1, figsize=(8, 8 if delta else 6), sharex=True)
    top, bottom = axes[0], axes[1]
    top.plot(steps, rewards, ".", alpha=0.4, label="mean reward of the step")
    top.plot(steps, mean, "-", label=f"over the last {span} steps")
    top.set_ylabel("exact-match reward")
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    bottom.plot(steps, [r["push_s"] * 1e3 for r in records], label="push (overlapped with the step)")
    bottom.plot(steps, [r["stall_s"] * 1e3 for r in records], label="stall (optimizer.step waited)")
    bottom.set_ylabel("ms")
    bottom.legend(loc="upper right")
    if delta:  # SyncConfig.delta: what each push moved, against a full push
        axes[2].plot(steps, [100 * r["push_bytes"] / r["push_full_bytes"] for r in records], label="bytes sent")
        axes[2].plot(steps, [100 * r["changed_fraction"] for r in records], label="weights changed")
        axes[2].set_yscale("log")
        axes[2].set_ylabel("% of a full push")
        axes[2].legend(loc="upper right")
    axes[-1].set_xlabel("GRPO step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Title": title})
    plt.close(fig)
