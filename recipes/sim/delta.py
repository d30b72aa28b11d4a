"""A delta push predicted from the same plan: only changed FP8 codes (and every scale) cross the links.

Densities are the ones the delta-push issue (issue 17) measured on CPU, Llama-shaped, fp32
master weights, AdamW at lr 1e-6, over 6 steps: FP8 block codes that changed 0.39% at
step 1 falling to 0.15%; 128-element row segments holding a change 39% falling to 17%;
almost every block scale changed. Assumed to hold for Kimi-K2 (not measured there).

Assumptions, each in the arithmetic below:

* two-sided encoding (``rdma`` compacts, issue 17): a change costs a 4-byte position and
  its 1-byte code; every scale is resent (4 bytes per 128x128 block). A bitmap (1 bit per
  element, 12.5% of the FP8 bytes) is larger at these densities, so positions win;
* the sender's fused pass reads each quantized element's bf16 source and its FP8
  shadow and writes the compacted change: 3 bytes an element, at the grouped quantize
  launch's measured speed (issue 17 asks >= 80% of a copy);
* receivers scatter the changes: their bytes are small, their HBM time is left out;
* the sender's Python either stays what it is today (every task packed afresh, the
  fitted cost per quantize task and scale grid) or the delta launches are recorded once
  and replayed (the fitted cost of a replayed bucket), as issue 17's design asks; the
  two bracket the CPU stage;
* the straggler spread and NIC goodput range are the full push's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from . import cost_model as cm

# issue 17's CPU measurement at lr 1e-6 (steady state and first step).
CODE_DENSITY = (0.0015, 0.0039)  # FP8 codes changed
SEGMENT_DENSITY = (0.17, 0.39)  # 128-element row segments holding a change (one-sided stores; not used over RDMA)
POSITION_BYTES, CODE_BYTES, SCALE_BYTES, BLOCK_ELEMS = 4, 1, 4, 128 * 128


@dataclass
class DeltaPrediction:
    wire_bytes: tuple[float, float]  # busiest receiver's delta bytes, (low, high density)
    full_bytes: float  # the same receiver's full push
    gpu_s: float  # slowest sender's fused pass
    cpu_s: tuple[float, float]  # slowest sender's Python: replayed, packed afresh
    nic_s: tuple[float, float]
    range_s: tuple[float, float]

    @property
    def seconds(self) -> float:
        return sum(self.range_s) / 2


def delta_bytes(fp8_bytes: float, density: float) -> float:
    """Wire bytes of a delta of ``fp8_bytes`` FP8 codes (one byte each) at ``density``."""
    return fp8_bytes * density * (POSITION_BYTES + CODE_BYTES) + fp8_bytes / BLOCK_ELEMS * SCALE_BYTES


def predict_delta(work: dict[int, Sequence[cm.BucketWork]], nic_in: dict[int, int], hw: cm.Hardware,
                  ov: cm.Overheads, *, goodput: tuple[float, float], straggler: tuple[float, float],
                  push_s: tuple[float, float] | None = None) -> DeltaPrediction:
    """``straggler``: the expected slowest sender's factor over its own time (low, high); ``push_s``: the
    control plane's cost a push (low, high), by default ``ov.push_s``."""
    push_s = push_s or (ov.push_s, ov.push_s)
    gb = 1e9
    busiest = max(nic_in.values(), default=0)
    # The receiver's bytes are FP8 codes plus scales (1/4096 of them); bf16 tensors (norms,
    # routers, embeddings) are small beside them and counted as codes.
    wire = tuple(delta_bytes(busiest, d) for d in CODE_DENSITY)
    line = hw.nic_line_gbps * gb
    nic = (wire[0] / (line * goodput[1]), wire[1] / (line * goodput[0]))
    gpu = cpu_replayed = cpu_afresh = 0.0
    for buckets in work.values():
        elems = sum(w.nic_bytes for w in buckets)  # one FP8 byte per quantized element sent
        gpu = max(gpu, 3 * elems / (hw.quant_gbps * gb))
        cpu_replayed = max(cpu_replayed, len(buckets) * ov.bucket_s)
        cpu_afresh = max(cpu_afresh, sum(w.quant_tasks * ov.quant_task_s + w.tasks * ov.task_s
                                         + w.amax_params * ov.amax_param_s + w.writes * ov.write_s for w in buckets))
    low = max(max(gpu, cpu_replayed) * straggler[0], nic[0]) + push_s[0]
    high = max(max(gpu, cpu_afresh) * straggler[1], nic[1]) + push_s[1]
    return DeltaPrediction(wire, float(busiest), gpu, (cpu_replayed, cpu_afresh), nic, (low, high))


def describe(d: DeltaPrediction) -> list[str]:
    return [f"  delta push (issue 17's densities at lr 1e-6: {CODE_DENSITY[0]:.2%}-{CODE_DENSITY[1]:.2%} of FP8 "
            f"codes changed; positions + codes, every scale):",
            f"    busiest receiver {d.wire_bytes[0] / 1e9:.2f}-{d.wire_bytes[1] / 1e9:.2f} GB of {d.full_bytes / 1e9:.1f} "
            f"GB full ({d.wire_bytes[0] / d.full_bytes:.2%}-{d.wire_bytes[1] / d.full_bytes:.2%}); NIC "
            f"{d.nic_s[0]:.3f}-{d.nic_s[1]:.3f} s",
            f"    slowest sender: fused pass {d.gpu_s:.3f} s (3 bytes an element); Python {d.cpu_s[0]:.3f} s replayed, "
            f"{d.cpu_s[1]:.3f} s packed afresh as today",
            f"    delta push {d.seconds:.3f} s (range {d.range_s[0]:.3f}-{d.range_s[1]:.3f})"]
