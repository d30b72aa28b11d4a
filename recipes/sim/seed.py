"""The seed's own method, modelled per training rank: ``full_tensor`` per parameter, then quantize and write.

The seed (Perplexity, "Weight Transfer for RL Post-Training in under 2 seconds") pushes
Kimi-K2 from 256 BF16 training GPUs to 128 FP8 inference GPUs in 1.3 s and publishes a
per-rank breakdown of ~1.23 s: ``full_tensor()`` 518 ms (974 calls), waiting on other
ranks 357, H2D 184, quantize 88, RDMA submit 26, fuse 18. Its trainer (``layout="seed"``
in ``scale_models``) has FSDP inside a node and expert parallelism across nodes outside
DTensor, so every ``full_tensor`` gathers inside a node over NVLink.

Per training rank, in this order and one after another (the seed's breakdown adds up to
its push, so its stages are counted as serial):

* **H2D**: the rank's offloaded shards (every parameter and buffer it holds) over PCIe;
* **full_tensor**: one call per DTensor parameter (a fixed cost each), the bytes the
  rank receives from the 7 other GPUs of its node, and, for parameters sharded on a dim
  other than 0 (the experts, ``Shard(1)``), the copy that reassembles the chunks;
* **fuse**: the full bf16 tensors that fuse into one engine tensor (``gate_up_proj``,
  ``fused_qkv_a_proj``) are concatenated (read and written) before quantizing;
* **quantize**: per task (one destination slice for one receiver) our measured Python
  cost of a quantize task, plus its bytes (bf16 read, FP8 written) at our kernel's speed;
* **RDMA submit**: one posted WRITE per contiguous run of the destination (data and scales).

Which rank sends what follows the seed's rule: each destination piece goes to the rank
with the fewest bytes so far among those whose node holds it after the gather (a dense
weight: any node; an expert slice: only its node).

**Waiting** is the straggler term: every rank waits for the slowest (the collectives of its
node, then the final barrier), so the push's sender side is the expected maximum over the
N ranks of ``T_r (1 + e_r)``, where ``e_r`` is drawn from this project's own push-to-push
spread (every push of every row of ``bench_results/bench-*.json``, as a fraction of its
row's mean). That rank-to-rank spread equals push-to-push spread is an assumption. Two
draws bracket it: a normal with the pooled standard deviation (low), and the pooled
samples themselves (high, heavier-tailed). The RDMA writes overlap all of this; the push
ends when the last sender is done or the busiest receive link has taken its bytes.
"""

from __future__ import annotations

import glob
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from fsdp_sync.boxes import Box
from fsdp_sync.layouts import make_layout
from fsdp_sync.meta import ReceiverMeta, SourceParam
from fsdp_sync.quant import get_quant_format

from . import cost_model as cm

# The seed's published per-rank breakdown of its Kimi-K2 256 -> 128 push, seconds.
SEED_BREAKDOWN = {"full_tensor": 0.518, "waiting": 0.357, "h2d": 0.184, "quantize": 0.088, "submit": 0.026,
                  "fuse": 0.018}
SEED_PER_RANK_S = 1.23
SEED_FULL_TENSOR_CALLS = 974


@dataclass(frozen=True, kw_only=True)
class SeedConstants:
    """What the seed's method costs beyond this project's fitted constants; each with its source."""

    # One full_tensor() call's fixed cost: DTensor's eager dispatch of one op, 0.341 ms for
    # aten.addmm after the dispatch refactor of pytorch/pytorch#107305 (0.476 ms before it).
    # Published for an op, not measured for full_tensor; NCCL's own launch is inside it.
    call_s: float = 0.341e-3
    # H2D of pinned memory over PCIe 5.0 x16: 63 GB/s per direction after 128b/130b coding,
    # at 85% (assumed: the DMA engines' usual share; not measured here, no GPU host with offload).
    h2d_gbps: float = 63.0 * 0.85


@dataclass
class RankWork:
    """One training rank's counts in the seed's method."""

    held_bytes: int = 0  # its shards of every parameter and buffer (H2D)
    calls: int = 0  # full_tensor calls (DTensor parameters sharded over more than one GPU of its node)
    gathered_bytes: int = 0  # received from the other GPUs of its node
    reassembled_bytes: int = 0  # full tensors rebuilt from chunks of a dim other than 0 (read + written)
    fused_bytes: int = 0  # bf16 of fused destinations, read and written
    tasks: int = 0  # quantize (or cast) tasks: one destination slice for one receiver
    read_bytes: int = 0  # bf16 read by those tasks
    payload_bytes: int = 0  # written into the engines (FP8, scales, bf16)
    writes: int = 0  # RDMA WRITEs posted


@dataclass
class SeedPrediction:
    """The seed method's push: per-stage seconds of the median rank, and the push as a range."""

    stages: dict[str, float]  # median rank: h2d, full_tensor, fuse, quantize, submit, waiting (midpoint)
    work_s: float  # median rank's stages before waiting
    slowest_work_s: float
    senders_s: tuple[float, float]  # expected slowest rank, (low, high) straggler spread
    receive_s: tuple[float, float]  # busiest receive link at (low, high) goodput
    push_s: tuple[float, float]  # control plane per push (low, high)
    calls: int
    range_s: tuple[float, float] = (0.0, 0.0)
    extra: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return sum(self.range_s) / 2


def push_spread(paths: Sequence[Path]) -> np.ndarray:
    """Every measured push time as a fraction of its row's mean, minus one, pooled over the runs."""
    out = []
    for path in paths:
        report = json.loads(Path(path).read_text())
        for case in report.get("cases", []):
            for row in case["rows"]:
                times = np.asarray(row["times_s"], dtype=float)
                if len(times) >= 3:
                    out.extend(times / times.mean() - 1)
    if not out:
        raise ValueError(f"no push times in {list(paths)}")
    return np.sort(np.asarray(out))


def bench_runs(folder: Path) -> list[Path]:
    return [Path(p) for p in sorted(glob.glob(str(folder / "bench-*.json")))]


def expected_slowest(work_s: np.ndarray, spread: np.ndarray, *, gaussian: bool, trials: int = 400,
                     seed: int = 0) -> float:
    """E[max_r work_r (1 + e_r)]: ``e`` normal with the spread's standard deviation, or drawn from it."""
    rng = np.random.default_rng(seed)
    if gaussian:
        e = rng.standard_normal((trials, len(work_s))) * spread.std()
    else:
        e = rng.choice(spread, size=(trials, len(work_s)), replace=True)
    return float((work_s[None, :] * (1 + e)).max(axis=1).mean())


def _node_boxes(src: SourceParam, hosts: Sequence[str]) -> list[tuple[list[int], list[Box]]]:
    """Per node mesh of each shard group: its ranks and the boxes they hold (EP outside DTensor: a node's own)."""
    out = []
    for g in src.groups:
        by_host: dict[str, tuple[list[int], list[Box]]] = {}
        for r, b in zip(g.ranks, g.boxes):
            ranks, boxes = by_host.setdefault(hosts[r], ([], []))
            ranks.append(r)
            boxes.append(b)
        out.extend(by_host.values())
    return out


def _bounding(boxes: Sequence[Box]) -> Box:
    lo = [min(b.offsets[d] for b in boxes if not b.is_empty()) for d in range(len(boxes[0].offsets))]
    hi = [max(b.ends[d] for b in boxes if not b.is_empty()) for d in range(len(boxes[0].offsets))]
    return Box(tuple(lo), tuple(h - o for o, h in zip(lo, hi)))


def count_seed_work(sources: Sequence[SourceParam], receivers: Sequence[ReceiverMeta], hosts: Sequence[str], *,
                    max_write_bytes: int = 1 << 30, expert_tensors: str = "stacked"
                    ) -> tuple[dict[int, RankWork], dict[int, int]]:
    """Per training rank, the seed method's counts; and the bytes each receiver takes in.

    ``expert_tensors="per_expert"`` counts a ``full_tensor`` call per expert and projection
    (``gate_proj``, ``up_proj``, ``down_proj``, as transformers < 5 holds MoE experts)
    instead of one per stacked tensor; the bytes are the same.
    """
    if expert_tensors not in ("stacked", "per_expert"):
        raise ValueError(f"unknown expert_tensors {expert_tensors!r}; valid: ['stacked', 'per_expert']")
    num_senders = len(hosts)
    work = {r: RankWork() for r in range(num_senders)}
    holders: dict[str, list[tuple[np.ndarray, Box]]] = {}  # source -> (node ranks, node box) after the gather
    for src in sources:
        item = src.dtype.itemsize
        nodes = _node_boxes(src, hosts)
        holders[src.name] = []
        for ranks, boxes in nodes:
            node = _bounding(boxes)
            node_bytes = node.numel() * item
            sharded = len(ranks) > 1 and len({b for b in boxes}) > 1
            cut_dim = next((d for d in range(len(node.sizes)) if any(b.sizes[d] != node.sizes[d] for b in boxes)), 0)
            for r, b in zip(ranks, boxes):
                w = work[r]
                w.held_bytes += b.numel() * item
                if sharded:
                    w.calls += 1
                    if expert_tensors == "per_expert" and ".mlp.experts." in src.name:
                        per = 2 if src.name.endswith("gate_up_proj") else 1  # gate_proj and up_proj apart
                        w.calls += node.sizes[0] * per - 1
                    w.gathered_bytes += node_bytes - b.numel() * item
                    if cut_dim > 0:  # all-gather along dim 0, then the chunks are copied into place
                        w.reassembled_bytes += 2 * node_bytes
            holders[src.name].append((np.array(ranks), node))
    by_name = {s.name: s for s in sources}
    load = np.zeros(num_senders)
    recv_bytes: dict[int, int] = defaultdict(int)
    classes: dict[tuple, list] = {}
    parts_of: dict[tuple, list[tuple[Box, np.ndarray]]] = {}
    for recv in receivers:
        key = (recv.layout.name, repr(sorted(recv.layout.kwargs.items())), tuple(recv.tensors))
        if key not in classes:
            layout = make_layout(recv.layout)
            pieces = [p for s in sources for p in layout.pieces(s)]
            fused = defaultdict(set)
            for p in pieces:
                fused[p.dst].add(p.src)
            classes[key] = [(p, len(fused[p.dst]) > 1) for p in pieces]
        for piece, is_fused in classes[key]:
            src = by_name[piece.src]
            dest = recv.tensors[piece.dst]
            fp8 = dest.dtype.itemsize == 1
            fmt = get_quant_format("fp8_block") if fp8 else None
            delta = tuple(d - s for d, s in zip(piece.dst_box.offsets, piece.src_box.offsets))
            key = (piece.src, piece.src_box)
            if key not in parts_of:  # replicas ask for the same pieces: find their holders once
                parts: dict[Box, list[np.ndarray]] = defaultdict(list)  # a part of the piece -> nodes holding it
                for ranks, node in holders[piece.src]:
                    part = piece.src_box.intersect(node)
                    if part is not None and not part.is_empty():
                        parts[part].append(ranks)
                parts_of[key] = [(part, nodes[0] if len(nodes) == 1 else np.concatenate(nodes))
                                 for part, nodes in parts.items()]
            for part, ranks in parts_of[key]:
                r = int(ranks[np.argmin(load[ranks])])
                dst = part.shift(delta)
                n = part.numel()
                nbytes = n * (1 if fp8 else src.dtype.itemsize)
                w = work[r]
                w.tasks += 1
                w.read_bytes += n * src.dtype.itemsize
                w.writes += cm.num_writes(dst, dest.shape, nbytes, max_write_bytes)
                if is_fused:
                    w.fused_bytes += 2 * n * src.dtype.itemsize
                if fp8:
                    grid = dst.to_blocks(fmt.block_shape(dest.shape))
                    nbytes += grid.numel() * 4
                    w.writes += cm.num_writes(grid, fmt.scale_shape(dest.shape), grid.numel() * 4, max_write_bytes)
                w.payload_bytes += nbytes
                load[r] += nbytes
                recv_bytes[recv.rank] += nbytes
    return work, dict(recv_bytes)


def stage_seconds(w: RankWork, hw: cm.Hardware, ov: cm.Overheads, sc: SeedConstants) -> dict[str, float]:
    gb = 1e9
    copy = hw.hbm_gbps * hw.copy_efficiency * gb
    return {"h2d": w.held_bytes / (sc.h2d_gbps * gb),
            "full_tensor": w.calls * sc.call_s + w.gathered_bytes / (hw.allgather_gbps * gb)
            + w.reassembled_bytes / copy,
            "fuse": w.fused_bytes / copy,
            "quantize": w.tasks * ov.quant_task_s + (w.read_bytes + w.payload_bytes) / (hw.quant_gbps * gb),
            "submit": w.writes * ov.write_s}


def predict_seed(work: dict[int, RankWork], recv_bytes: dict[int, int], hw: cm.Hardware, ov: cm.Overheads,
                 sc: SeedConstants, spread: np.ndarray, *, goodput: tuple[float, float],
                 push_s: tuple[float, float] | None = None) -> SeedPrediction:
    """The push: the expected slowest rank (straggler range) or the busiest receive link (goodput range),
    then the control plane (``push_s``: low, high; by default ``ov.push_s``)."""
    push_s = push_s or (ov.push_s, ov.push_s)
    ranks = sorted(work)
    per_rank = [stage_seconds(work[r], hw, ov, sc) for r in ranks]
    totals = np.array([sum(s.values()) for s in per_rank])
    median_rank = int(np.argsort(totals)[len(totals) // 2])
    senders = (expected_slowest(totals, spread, gaussian=True), expected_slowest(totals, spread, gaussian=False))
    busiest = max(recv_bytes.values(), default=0)
    line = hw.nic_line_gbps * 1e9
    receive = (busiest / (line * goodput[1]), busiest / (line * goodput[0]))
    low, high = max(senders[0], receive[0]) + push_s[0], max(senders[1], receive[1]) + push_s[1]
    stages = dict(per_rank[median_rank])
    stages["waiting"] = (senders[0] + senders[1]) / 2 - totals[median_rank]
    return SeedPrediction(stages, float(totals[median_rank]), float(totals.max()), senders, receive, push_s,
                          work[ranks[median_rank]].calls, (low, high),
                          {"busiest_receiver_bytes": busiest, "ranks": len(ranks)})


def describe(p: SeedPrediction) -> list[str]:
    s, seed = p.stages, SEED_BREAKDOWN
    order = ("full_tensor", "waiting", "h2d", "quantize", "submit", "fuse")
    lines = ["  the seed's method, per rank (median rank; the seed's published figure beside it):"]
    for k in order:
        lines.append(f"    {k:<12}{s[k] * 1e3:8.0f} ms   seed {seed[k] * 1e3:5.0f} ms")
    total = sum(s[k] for k in order)
    lines.append(f"    {'total':<12}{total * 1e3:8.0f} ms   seed {SEED_PER_RANK_S * 1e3:5.0f} ms "
                 f"({total / SEED_PER_RANK_S - 1:+.1%}); full_tensor calls {p.calls} (seed {SEED_FULL_TENSOR_CALLS})")
    lines.append(f"  slowest rank's work {p.slowest_work_s:.3f} s; expected slowest of {p.extra['ranks']} with the "
                 f"measured spread {p.senders_s[0]:.3f}-{p.senders_s[1]:.3f} s; busiest receive link "
                 f"{p.extra['busiest_receiver_bytes'] / 1e9:.1f} GB in {p.receive_s[0]:.3f}-{p.receive_s[1]:.3f} s; "
                 f"+ control {p.push_s[0] * 1e3:.1f}-{p.push_s[1] * 1e3:.1f} ms")
    return lines
