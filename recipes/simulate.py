"""Plan a push at scale and predict its time with a cost model validated on measured runs.

    python -m recipes.simulate --model kimi_k2 --senders 256 --receivers 128 [--inference ep32]
        [--layout hsdp|seed] [--mode direct|reconstruct] [--goodput-range 0.78 0.97] [--replay]
        [--nic-gbit 400] [--nics-per-gpu 1] [--validate]

It builds shapes-only metadata (``recipes.sim.scale_models``), runs the real planner, counts
each sender's work per bucket and predicts the push with ``recipes.sim.cost_model``. Every
constant that is not a ceiling or an assumption comes from one benchmark run (BENCH_RUN,
2x H100, code eaed402) and the kernel benchmark of the same code on the same card kind
(KERNEL_RUN): Python costs from the run's traced stage spans, the per-push cost from its
wall-time parts, the grouped quantize launch's speed here and into a peer from
KERNEL_RUN, copy efficiencies and NCCL costs fitted on single rows (see ``calibrate``). ``--validate``
rebuilds the benchmark's own plans and compares the model with every measured row,
in-sample and out-of-sample rows apart, twins dropped.

``--layout seed --mode reconstruct`` models the seed's own method instead
(``recipes.sim.seed``): the check that the machinery reproduces the seed's 1.3 s first.
Predictions are ranges (NIC goodput, the straggler spread, the control plane at N + M
ranks); the last line is ``<model> <N>-><M> predicted_s=<midpoint> range_s=<low>-<high>
floor_s=<y> plan_s=<planning seconds>`` and, in direct mode, `` delta_s=<delta push>``.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field, fields, replace

from torch.distributed.tensor import Replicate, Shard

from .sim import cost_model as cm
from fsdp_sync.errors import PlanError
from fsdp_sync.meta import LayoutSpec, ReceiverMeta, SourceParam
from fsdp_sync.plan import Plan
from fsdp_sync.planner import build_plan
from fsdp_sync.quant import get_quant_format
from fsdp_sync.sharding import shard_groups
from . import data_path
from .sim import scale_models as sm
from .sim import control_plane, delta, seed

RUNS = data_path("bench_results")  # the wheel ships these two runs (pyproject package-data)
BENCH_RUN = RUNS / "bench-NVIDIA-H100-80GB-HBM3-20261126T125428-eaed402.json"  # 2x H100 NV18, git eaed402
# recipes.bench_kernels at the same commit on the same kind of H100: the grouped quantize launch
# (4 warps a program since 105eabb) as pushes replay it, on one GPU and storing into a peer.
KERNEL_RUN = RUNS / "kernels-NVIDIA-H100-80GB-HBM3-20261126T125656-eaed402.json"
GROUPED, GROUPED_PEER = "fp8_block grouped x32", "fp8_block grouped fused -> peer"  # KERNEL_RUN's kernels
# NIC goodput over line rate under many-to-many RDMA at 400 Gb/s. Low: DeepEP's published
# pure-RDMA all-to-all (deepseek-ai/DeepEP docs/legacy.md, H800 + CX7 400 Gb/s, "~50 GB/s
# maximum"): 39 GB/s at EP 128 and 256, i.e. 78%. High: large one-sided WRITEs near line rate,
# 97% (assumed, as before; not measured: no RDMA device on the lent machines).
GOODPUT_RANGE = (0.78, 0.97)
# Rows whose measured time fits one constant each, in this order (case, quant, mode, transport).
FITTED_ON = {"peer_copy_efficiency": ("a", "none", "direct", "cuda_ipc"),
             "copy_efficiency": ("b", "none", "direct", "cuda_ipc"),
             "send_s": ("a", "none", "direct", "nccl"),
             "allgather_gbps": ("b", "none", "reconstruct", "cuda_ipc")}


@dataclass
class Planned:
    """A plan with the metadata it was built from, as the cost model needs it."""

    plan: Plan
    sources: list[SourceParam]
    receivers: list[ReceiverMeta]
    hosts: list[str]
    devices: list[str]

    def work(self, transport: str = "auto", *, staged_replay: bool = False) -> dict[int, list[cm.BucketWork]]:
        return cm.count_work(self.plan, self.sources, self.receivers, sender_hosts=self.hosts,
                             sender_devices=self.devices, transport=transport, staged_replay=staged_replay)


@dataclass
class BenchRow:
    """One measured configuration, its plan rebuilt here, and what the model says of it."""

    case: str
    quant: str
    mode: str
    transport: str
    measured_s: float
    raw: dict  # the report's row: stage_s, parts_s, watermark_bytes, ...
    ceilings: dict[str, float]
    planned: Planned
    work: dict[int, list[cm.BucketWork]]
    predicted_s: float = 0.0

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.case, self.quant, self.mode, self.transport)

    @property
    def error(self) -> float:
        return self.predicted_s / self.measured_s - 1


@dataclass(frozen=True)
class Fit:
    """Constants fitted on BENCH_RUN: Hardware fields that its ceilings do not give, and the overheads."""

    hw: dict[str, float]
    ov: cm.Overheads
    in_sample: dict[str, tuple] = field(default_factory=dict)  # constant -> the row it was fitted on


def bench_plan(case: str, model: str, quant: str, mode: str, ceilings: dict[str, float], watermark_bytes: int
               ) -> Planned:
    """The plan ``recipes.bench`` builds for a case: FSDP over the senders, receivers on their GPUs."""
    from .bench import CASES

    c = CASES[case]
    n = c["senders"]
    if "mesh" in c:  # HSDP: fully_shard on a (replicate, shard) mesh
        replicas, shards = c["mesh"]
        mesh, placements = [[i * shards + j for j in range(shards)] for i in range(replicas)], [Replicate(), Shard(0)]
    else:
        mesh, placements = list(range(n)), [Shard(0)]
    sources = [SourceParam(name, shape, dtype, shard_groups(shape, mesh, placements, name=name))
               for name, (shape, dtype) in _bench_shapes(model).items()]
    receivers = []
    for r in range(c["receivers"]):
        tp = c["tp"]
        spec = LayoutSpec("hf_tp", {"tp_rank": r % tp, "tp_size": tp}) if tp > 1 else LayoutSpec("identity")
        tensors = sm.destination_tensors(sources, spec, quant=quant, skip=sm.DEFAULT_QUANT_SKIP)
        receivers.append(ReceiverMeta(r, "bench", tensors, spec, quant, device=f"gpu{r + c['receiver_gpu_offset']}"))
    hosts, devices = ["bench"] * n, [f"gpu{i}" for i in range(n)]
    links = cm.LinkModel(intra_host_gbps=ceilings.get("peer_copy_gbps", ceilings["device_copy_gbps"]),
                         inter_host_gbps=ceilings["nccl_sendrecv_gbps"], hbm_gbps=ceilings["device_copy_gbps"])
    plan = build_plan(sources, receivers, sender_hosts=hosts, mode=mode, links=links, watermark_bytes=watermark_bytes,
                      sender_devices=devices)  # as recipes.bench sets its links
    return Planned(plan, sources, receivers, hosts, devices)


@functools.cache
def _bench_shapes(model: str) -> dict:
    from .models import param_shapes, qwen3_config

    return param_shapes(qwen3_config(model))


def bench_hardware(ceilings: dict[str, float], fitted: dict[str, float]) -> cm.Hardware:
    """The benchmark machine: the ceilings its run measured, and the fitted efficiencies."""
    return cm.Hardware(nvlink_gbps=ceilings.get("peer_copy_gbps", ceilings["device_copy_gbps"]),
                       hbm_gbps=ceilings["device_copy_gbps"], sendrecv_gbps=ceilings["nccl_sendrecv_gbps"], **fitted)


def bench_rows(report: dict) -> list[BenchRow]:
    """Every measured row of a report, with its plan rebuilt and its work counted."""
    rows = []
    for case in report["cases"]:
        for row in case["rows"]:
            planned = bench_plan(case["case"], case["model"], row["quant"], row["mode"], case["ceilings"],
                                 row["watermark_bytes"])
            stats = planned.plan.stats
            if (stats.num_tasks, stats.bytes_total) != (row["num_tasks"], row["bytes"]):
                raise ValueError(f"case {case['case']} {row['quant']} {row['mode']}: the rebuilt plan has "
                                 f"{stats.num_tasks} tasks and {stats.bytes_total} bytes, the measured one "
                                 f"{row['num_tasks']} and {row['bytes']}")
            rows.append(BenchRow(case["case"], row["quant"], row["mode"], row["transport"],
                                 statistics.median(row["times_s"]), row, case["ceilings"], planned,
                                 planned.work(row["transport"])))
    return rows


def predict_row(r: BenchRow, fit: Fit, work: dict[int, list[cm.BucketWork]] | None = None) -> cm.Prediction:
    """The model's prediction of a row, from its counted work or from ``work`` (another count of it)."""
    return cm.predict(r.planned.plan, r.work if work is None else work, bench_hardware(r.ceilings, fit.hw), fit.ov,
                      watermark_bytes=r.raw["watermark_bytes"])


def kernel_efficiency(kernels: dict, kernel: str) -> float:
    """A kernel's speed over its reference in KERNEL_RUN (``ratio_to_copy``): a device copy for
    kernels on one GPU, a copy of the same FP8 bytes into the peer for those storing there."""
    (row,) = [r for r in kernels["results"] if r["kernel"] == kernel]
    return row["ratio_to_copy"]


def check_same_code(report: dict, kernels: dict) -> None:
    """BENCH_RUN and KERNEL_RUN must come from one commit and one kind of GPU."""
    bench, kern = report["environment"], kernels["env"]
    if bench["gpu"] != kern["gpu"] or not (bench["git_sha"].startswith(kern["git_sha"][:7])
                                           and kern["git_sha"].startswith(bench["git_sha"][:7])):
        raise ValueError(f"BENCH_RUN ({bench['gpu']}, git {bench['git_sha'][:7]}) and KERNEL_RUN "
                         f"({kern['gpu']}, git {kern['git_sha'][:7]}) differ")


def calibrate(report: dict, rows: list[BenchRow], kernels: dict) -> Fit:
    """Every fitted constant, from BENCH_RUN's rows (trainer rank 0's spans) and KERNEL_RUN.

    * the grouped quantize launch, on one GPU and storing into a peer: KERNEL_RUN's
      ratios to a device copy and to a peer copy;
    * per push: the median over all rows of the wall time outside the push thread
      (announcing the push, then the receivers' acks);
    * a replayed bucket and a copied tensor: least squares over the cuda_ipc direct rows
      of their ``amax`` + ``quantize`` spans (launches only, no Python per task);
    * Python per task, per quantize task and per scale grid, packed afresh: the
      ``quantize`` and ``amax`` spans of case a's nccl direct rows (nothing is replayed
      there: every payload has a buffer of its own);
    * then one constant per row of FITTED_ON, in order, so that the model gives that
      row's measured median; every other row is out of sample.
    """
    by_key = {r.key: r for r in rows}
    push_s = statistics.median(r.raw["parts_s"]["publish"] + r.raw["parts_s"]["acks"] for r in rows)
    replayed = [r for r in rows if r.transport == "cuda_ipc" and r.mode == "direct"]
    bucket_s, launch_s = _least_squares(
        [(sum(w.replayed for w in r.work[0]), sum(w.launches for w in r.work[0] if w.replayed)) for r in replayed],
        [r.raw["stage_s"]["amax"] + r.raw["stage_s"]["quantize"] for r in replayed])
    plain, fp8 = by_key[("a", "none", "direct", "nccl")], by_key[("a", "fp8_block", "direct", "nccl")]
    task_s = plain.raw["stage_s"]["quantize"] / sum(w.tasks for w in plain.work[0])
    quant_tasks = sum(w.quant_tasks for w in fp8.work[0])
    quant_task_s = (fp8.raw["stage_s"]["quantize"] - task_s * sum(w.tasks for w in fp8.work[0])) / quant_tasks
    amax_param_s = fp8.raw["stage_s"]["amax"] / sum(w.amax_params for w in fp8.work[0])
    check_same_code(report, kernels)
    fit = Fit({"quant_efficiency": kernel_efficiency(kernels, GROUPED),
               "peer_store_efficiency": kernel_efficiency(kernels, GROUPED_PEER)},
              cm.Overheads(bucket_s=bucket_s, launch_s=launch_s, task_s=task_s, quant_task_s=quant_task_s,
                           amax_param_s=amax_param_s, push_s=push_s), dict(FITTED_ON))
    for name, key in FITTED_ON.items():
        fit = _fit_one(fit, name, by_key[key])
    return replace(fit, ov=replace(fit.ov, funnel_param_s=_funnel_param_s(report, fit)))


def _least_squares(x: list[tuple[float, float]], y: list[float]) -> tuple[float, float]:
    """(a, b) >= 0 minimising the sum of (a x0 + b x1 - y)^2, relative to y."""
    import numpy as np

    a = np.array(x, dtype=float) / np.array(y)[:, None]
    (p, q), *_ = np.linalg.lstsq(a, np.ones(len(y)), rcond=None)
    if p < 0 or q < 0:  # one of them on its bound: the other alone
        only = [(float(np.dot(a[:, i], np.ones(len(y))) / np.dot(a[:, i], a[:, i]))) for i in (0, 1)]
        err = [np.sum((a[:, i] * only[i] - 1) ** 2) for i in (0, 1)]
        return (only[0], 0.0) if err[0] <= err[1] else (0.0, only[1])
    return float(p), float(q)


def _fit_one(fit: Fit, name: str, row: BenchRow) -> Fit:
    """``fit`` with constant ``name`` set so that the model gives ``row``'s measured median (bisection)."""
    is_overhead = name in {f.name for f in fields(cm.Overheads)}
    lo, hi = (0.0, 1e-3) if is_overhead else (0.05, 2.0) if name.endswith("efficiency") else (10.0, 2000.0)

    def with_value(v: float) -> Fit:
        if is_overhead:
            return replace(fit, ov=replace(fit.ov, **{name: v}))
        return replace(fit, hw={**fit.hw, name: v})

    def too_slow(v: float) -> bool:  # the prediction falls as a speed rises and as a cost falls
        slow = predict_row(row, with_value(v)).seconds > row.measured_s
        return slow if not is_overhead else not slow

    if too_slow(hi) or not too_slow(lo):
        raise ValueError(f"{name} cannot fit row {row.key} within [{lo}, {hi}]")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if too_slow(mid) else (lo, mid)
    return with_value((lo + hi) / 2)


def validate(rows: list[BenchRow], fit: Fit) -> list[BenchRow]:
    for r in rows:
        r.predicted_s = predict_row(r, fit).seconds
    return rows


def _funnel_param_s(report: dict, fit: Fit) -> float:
    """Handshakes per parameter of the funnel baseline: case a's unquantized funnel time less its bytes."""
    case = next(c for c in report["cases"] if c["case"] == "a")
    seconds = statistics.median(case["baselines"]["none/funnel"])
    planned = bench_plan("a", case["model"], "none", "direct", case["ceilings"], 1 << 31)
    bytes_only = funnel(planned, bench_hardware(case["ceilings"], fit.hw), replace(fit.ov, funnel_param_s=0.0))
    return (seconds - bytes_only) / len(planned.sources)


def funnel(planned: Planned, hw: cm.Hardware, ov: cm.Overheads) -> float:
    """The rank-0 funnel baseline for the same metadata: FP8 payloads carry their scales."""
    fmt_of = planned.plan.fmt_of
    payload = {}
    for s in planned.sources:
        payload[s.name] = s.nbytes
        if fmt_of[s.name] != "none":
            payload[s.name] = sm.numel(s.shape) + 4 * sm.numel(get_quant_format(fmt_of[s.name]).scale_shape(s.shape))
    return cm.funnel_seconds(planned.sources, payload, hw=hw, ov=ov, sender_hosts=planned.hosts,
                             receiver_hosts=[r.host for r in planned.receivers],
                             quantized={n for n, f in fmt_of.items() if f != "none"})


def describe_fit(report: dict, fit: Fit) -> list[str]:
    ov, hw = fit.ov, fit.hw
    return [f"constants fitted on {BENCH_RUN.name} (git {report['environment']['git_sha'][:7]}) "
            f"and {KERNEL_RUN.name}:",
            f"  per push {ov.push_s * 1e3:.2f} ms; replayed bucket {ov.bucket_s * 1e6:.0f} us, copied tensor "
            f"{ov.launch_s * 1e6:.1f} us; packed afresh: task {ov.task_s * 1e6:.1f} us, quantize task "
            f"{ov.quant_task_s * 1e6:.1f} us, scale grid {ov.amax_param_s * 1e6:.1f} us; "
            f"NCCL send {ov.send_s * 1e6:.1f} us",
            f"  of the ceilings: copies {hw['copy_efficiency']:.1%} of HBM, quantize launch "
            f"{hw['quant_efficiency']:.1%} of HBM, copies into a peer {hw['peer_copy_efficiency']:.1%} and "
            f"quantize stores into a peer {hw['peer_store_efficiency']:.1%} of NVLink; all-gather "
            f"{hw['allgather_gbps']:.0f} GB/s received per rank"]


# Rows whose traced spans (not their total time) fix the per-task Python costs (see ``calibrate``).
SPANS_FROM = {("a", "none", "direct", "nccl"): "task", ("a", "fp8_block", "direct", "nccl"): "quantize task, scale grid"}


def is_twin(r: BenchRow, rows: list[BenchRow]) -> BenchRow | None:
    """The direct row a reconstruct row duplicates: with shard groups of one rank there is nothing to
    gather, so both modes build the same tasks, buckets and bytes (case a, one sender)."""
    if r.mode != "reconstruct" or any(len(b.group) > 1 for b in r.planned.plan.buckets):
        return None
    return next((o for o in rows if o.key == (r.case, r.quant, "direct", r.transport)), None)


def sample_of(rows: list[BenchRow], fit: Fit) -> dict[tuple, str]:
    """Per row: 'in' (its time fixed a constant), 'twin' (a duplicate of another row), 'spans' (out of
    sample in time, but its spans fixed Python costs) or 'out'."""
    fitted = {key for key in fit.in_sample.values()}
    out = {}
    for r in rows:
        out[r.key] = ("in" if r.key in fitted else "twin" if is_twin(r, rows) else
                      "spans" if r.key in SPANS_FROM else "out")
    return out


def print_validation(report: dict, rows: list[BenchRow], fit: Fit) -> None:
    fitted = {key: name for name, key in fit.in_sample.items()}
    kind = sample_of(rows, fit)
    print(f"validation on {BENCH_RUN.name}")
    print(f"  {'case':<5}{'quant':<10}{'mode':<12}{'transport':<10}{'measured_ms':>12}{'predicted_ms':>13}{'error':>8}"
          f"  sample")
    for r in rows:
        twin = is_twin(r, rows)
        note = {"in": f"in: fits {fitted.get(r.key)}", "twin": f"twin of {twin.mode} (same plan), not counted"
                if twin else "", "spans": f"out (its spans fix the {SPANS_FROM.get(r.key)} cost)", "out": "out"}[kind[r.key]]
        flag = "  > 15%" if abs(r.error) > 0.15 else ""
        print(f"  {r.case:<5}{r.quant:<10}{r.mode:<12}{r.transport:<10}{r.measured_s * 1e3:12.1f}"
              f"{r.predicted_s * 1e3:13.1f}{r.error:8.1%}  {note}{flag}")
    for label, kinds in (("in sample", ("in",)), ("out of sample", ("out", "spans"))):
        chosen = [r for r in rows if kind[r.key] in kinds]
        within = sum(abs(r.error) <= 0.15 for r in chosen)
        errs = ", ".join(f"{r.error:+.1%}" for r in chosen)
        print(f"  {label}: {len(chosen)} rows, {within} within 15% ({errs})")
    print(f"  twins dropped: {sum(k == 'twin' for k in kind.values())} (case a reconstruct = direct at 1 -> 1)")
    print("  forecast, not measured: the NCCL rows on the code since the staging slots (489eae8),")
    print("  whose two-sided buckets replay like cuda_ipc's (same constants, replayed work):")
    for r in rows:
        if r.transport == "nccl":
            ahead = predict_row(r, fit, r.planned.work(r.transport, staged_replay=True)).seconds
            print(f"  {r.case:<5}{r.quant:<10}{r.mode:<12}{r.transport:<10}{r.measured_s * 1e3:12.1f}"
                  f"{ahead * 1e3:13.1f}   (measured before)")
    print("  rank-0 funnel (handshake per parameter fitted on case a, none):")
    for case in report["cases"]:
        hw = bench_hardware(case["ceilings"], fit.hw)
        for quant in ("none", "fp8_block"):
            planned = bench_plan(case["case"], case["model"], quant, "direct", case["ceilings"], 1 << 31)
            measured = case["baselines"][f"{quant}/funnel"]
            print(f"  {case['case']:<5}{quant:<10}{'funnel':<22}{statistics.median(measured) * 1e3:12.1f}"
                  f"{funnel(planned, hw, fit.ov) * 1e3:13.1f}   runs " + ", ".join(f"{t * 1e3:.0f}" for t in measured))


def fitted() -> tuple[dict, list[BenchRow], Fit]:
    """BENCH_RUN, its rows and the constants fitted on them."""
    report = json.loads(BENCH_RUN.read_text())
    rows = bench_rows(report)
    return report, rows, calibrate(report, rows, json.loads(KERNEL_RUN.read_text()))


def _stage_lines(p: cm.Prediction) -> list[str]:
    s = p.slowest
    return ["  slowest sender, busy seconds per stage:",
            f"    CPU  tasks {s.task:.3f}  quantize tasks {s.quantize:.3f}  scale grids {s.amax:.3f}  copies "
            f"{s.launch:.3f}  replayed buckets {s.bucket:.3f}  collectives {s.collective:.3f}  = {s.cpu:.3f}",
            f"    GPU  copies {s.hbm:.3f}  quantize launches {s.quant:.3f}  all-gather {s.gather:.3f}  "
            f"copies into peers {s.peer:.3f}  = {s.gpu:.3f}",
            f"    staging {s.fill:.3f}  WR posting {s.post:.3f}  NIC {s.nic:.3f}",
            f"  sender pipeline (overlapped) {p.senders_s:.3f} s, busiest receive link {p.receive_bound_s:.3f} s, "
            f"plan floor {p.floor_s:.3f} s -> {p.binding} binds",
            f"  + announcing and acks per push {p.push_s:.3f} s = {p.seconds:.3f} s; busiest receive link "
            f"{p.receive_utilization:.1%} utilized"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="kimi_k2", choices=sorted(sm.MODELS))
    ap.add_argument("--senders", type=int, default=256)
    ap.add_argument("--receivers", type=int, default=128)
    ap.add_argument("--inference", default="ep32", choices=sorted(sm.INFERENCE_LAYOUTS))
    ap.add_argument("--layout", default="hsdp", choices=sorted(sm.TRAINING_LAYOUTS),
                    help="training layout: hsdp (EP in a node, PP 2) or seed (FSDP in a node, EP across nodes "
                         "outside DTensor, no PP); --mode reconstruct with seed models the seed's own method")
    ap.add_argument("--seed-expert-tensors", default="stacked", choices=["stacked", "per_expert"],
                    help="the seed method's full_tensor calls: one per stacked expert tensor, or per expert")
    ap.add_argument("--pp", type=int, default=2, help="training pipeline stages")
    ap.add_argument("--ep", type=int, default=8, help="training expert parallelism (inside a node)")
    ap.add_argument("--num-layers", type=int, default=None, help="cut the model to this many layers (quick runs)")
    ap.add_argument("--mode", default="direct", choices=["direct", "reconstruct"])
    ap.add_argument("--quant", default="fp8_block", choices=["none", "fp8_block"])
    ap.add_argument("--nic-gbit", type=float, default=400.0, help="line rate of one NIC, Gb/s")
    ap.add_argument("--nics-per-gpu", type=int, default=1)
    ap.add_argument("--nic-efficiency", type=float, default=cm.Hardware.nic_efficiency)
    ap.add_argument("--goodput-range", type=float, nargs=2, default=list(GOODPUT_RANGE), metavar=("LOW", "HIGH"),
                    help="NIC goodput over line rate under the push's incast (default: %(default)s, see GOODPUT_RANGE)")
    ap.add_argument("--watermark-mb", type=float, default=2048)
    ap.add_argument("--push-s", type=float, default=None, help="override the per-push cost (announce + acks)")
    ap.add_argument("--replay", action="store_true",
                    help="replace the receive-link bound with the flow-level replay (slow at full scale)")
    ap.add_argument("--validate", action="store_true", help="also print the model against every benchmark row")
    return ap


def training_layout(args: argparse.Namespace) -> sm.Training:
    if args.layout == "seed":
        return sm.Training.seed(args.senders)
    return sm.Training(num_gpus=args.senders, pp=args.pp, ep=args.ep)


def plan_at_scale(args: argparse.Namespace, hw: cm.Hardware) -> Planned:
    training = training_layout(args)
    inference = sm.inference_layout(args.inference, args.receivers)
    sources, hosts = sm.training_sources(args.model, training, num_layers=args.num_layers)
    receivers = sm.receivers_for(args.model, sources, inference, quant=args.quant)
    devices = [f"gpu{r}" for r in range(args.senders)]
    print(f"{args.model}: {sm.num_params(sources) / 1e9:.0f}B parameters; training {training.describe()}; "
          f"inference {inference.describe()}; {args.mode}, {args.quant}")
    plan = build_plan(sources, receivers, sender_hosts=hosts, mode=args.mode, links=hw.links(),
                      watermark_bytes=int(args.watermark_mb * 2**20), sender_devices=devices)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  plan: {plan.stats.num_tasks} tasks, {len(plan.buckets)} buckets, {plan.stats.bytes_total / 1e12:.2f} TB, "
          f"{plan.stats.plan_s:.1f} s on one core, peak RSS {rss_gb:.2f} GB")
    return Planned(plan, sources, receivers, hosts, devices)


def run_seed_method(args: argparse.Namespace, hw: cm.Hardware, ov: cm.Overheads) -> int:
    """The seed's own method (``recipes.sim.seed``): full_tensor per parameter in a node, then quantize and write.

    Our planner's reconstruct mode rebuilds a tensor on one shard group, and its shard
    groups span the EP axis; the seed's gathers stay inside a node, so its sender choice
    is modelled in ``count_seed_work`` instead.
    """
    training = training_layout(args)
    inference = sm.inference_layout(args.inference, args.receivers)
    sources, hosts = sm.training_sources(args.model, training, num_layers=args.num_layers)
    receivers = sm.receivers_for(args.model, sources, inference, quant=args.quant)
    print(f"{args.model}: {sm.num_params(sources) / 1e9:.0f}B parameters; training {training.describe()}; "
          f"inference {inference.describe()}; the seed's method (reconstruct), {args.quant}")
    started = time.process_time()
    work, recv_bytes = seed.count_seed_work(sources, receivers, hosts, expert_tensors=args.seed_expert_tensors)
    assign_s = time.process_time() - started
    spread = seed.push_spread(seed.bench_runs(RUNS))
    goodput = tuple(args.goodput_range)
    control = control_plane.push_cost_range(ov.push_s, args.senders + args.receivers, RUNS)
    p = seed.predict_seed(work, recv_bytes, hw, ov, seed.SeedConstants(), spread, goodput=goodput, push_s=control[:2])
    floor = max(recv_bytes.values()) / (hw.nic_line_gbps * 1e9)
    print(f"  straggler spread: {len(spread)} pushes of {len(seed.bench_runs(RUNS))} runs, sd {spread.std():.1%} "
          f"of their row's mean; NIC goodput {goodput[0]:.0%}-{goodput[1]:.0%} of line rate")
    print("\n".join(seed.describe(p)))
    print(f"{args.model} {args.senders}->{args.receivers} predicted_s={p.seconds:.3f} "
          f"range_s={p.range_s[0]:.3f}-{p.range_s[1]:.3f} floor_s={floor:.3f} plan_s={assign_s:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    report, rows, fit = fitted()
    print("\n".join(describe_fit(report, fit)))
    if args.validate:
        print_validation(report, validate(rows, fit), fit)
    ov = fit.ov if args.push_s is None else replace(fit.ov, push_s=args.push_s)
    # GPU-side speeds as BENCH_RUN measured them (H100, case a's ceilings); the NICs as given.
    hw = replace(bench_hardware(report["cases"][0]["ceilings"], fit.hw), nic_gbit=args.nic_gbit,
                 nics_per_gpu=args.nics_per_gpu, nic_efficiency=args.nic_efficiency)
    if args.layout == "seed" and args.mode == "reconstruct":
        return run_seed_method(args, hw, ov)
    try:
        planned = plan_at_scale(args, hw)
    except PlanError as e:
        print("\n".join(str(e).splitlines()[:6]))
        return 1
    plan, watermark = planned.plan, int(args.watermark_mb * 2**20)
    started = time.perf_counter()
    work = planned.work()
    nic_in = cm.receive_nic_bytes(plan, planned.receivers, planned.hosts)
    p = cm.predict(plan, work, hw, ov, watermark_bytes=watermark, nic_in=nic_in)
    print(f"  floor {plan.stats.floor_s:.3f} s: busiest receive link {max(nic_in.values(), default=0) / 1e9:.1f} GB "
          f"at {hw.nic_line_gbps:.0f} GB/s line rate (goodput {hw.nic_gbps:.1f} GB/s); model in "
          f"{time.perf_counter() - started:.1f} s")
    print("\n".join(_stage_lines(p)))
    print(f"  rank-0 funnel baseline: {funnel(planned, hw, ov):.1f} s")
    low, high, lines = push_range(args, planned, work, nic_in, hw, ov)
    print("\n".join(lines))
    straggler = straggler_factors(len(work))
    d = delta.predict_delta(work, nic_in, hw, ov, goodput=tuple(args.goodput_range), straggler=straggler,
                            push_s=control_plane.push_cost_range(ov.push_s, args.senders + args.receivers, RUNS)[:2])
    print("\n".join(delta.describe(d)))
    print(f"{args.model} {args.senders}->{args.receivers} predicted_s={(low + high) / 2:.3f} range_s={low:.3f}-{high:.3f} "
          f"floor_s={plan.stats.floor_s:.3f} plan_s={plan.stats.plan_s:.2f} delta_s={d.seconds:.3f}")
    return 0


def straggler_factors(num_senders: int) -> tuple[float, float]:
    """The expected slowest of ``num_senders`` equal senders over one, with this project's push-to-push spread."""
    import numpy as np

    spread = seed.push_spread(seed.bench_runs(RUNS))
    ones = np.ones(num_senders)
    return (seed.expected_slowest(ones, spread, gaussian=True), seed.expected_slowest(ones, spread, gaussian=False))


def push_range(args: argparse.Namespace, planned: Planned, work: dict, nic_in: dict[int, int], hw: cm.Hardware,
               ov: cm.Overheads) -> tuple[float, float, list[str]]:
    """(low, high) seconds of the push: NIC goodput over GOODPUT_RANGE, senders' straggler spread, and
    the receive side as a bound (busy from the first byte) or, with ``--replay``, the flow-level replay."""
    plan, watermark = planned.plan, int(args.watermark_mb * 2**20)
    straggler = straggler_factors(len(work))
    control = control_plane.push_cost_range(ov.push_s, args.senders + args.receivers, RUNS)
    ends = []
    lines = []
    if control[2] is not None:
        lines.append(f"  control plane per push at {args.senders + args.receivers} ranks: {control[0] * 1e3:.1f}-"
                     f"{control[1] * 1e3:.1f} ms (the bench's 2-4 ranks; + the store fan-out measured on CPU, "
                     f"{control[2].per_rank_s * 1e6:.0f} us a rank)")
    for goodput, factor, push_s in ((max(args.goodput_range), straggler[0], control[0]),
                                    (min(args.goodput_range), straggler[1], control[1])):
        q = cm.predict(plan, work, replace(hw, nic_efficiency=goodput), ov, watermark_bytes=watermark, nic_in=nic_in,
                       replay=(planned.receivers, planned.hosts) if args.replay else None)
        receive = q.replay_s if args.replay else q.receive_bound_s
        ends.append(max(q.senders_s * factor, receive, q.floor_s) + push_s)
        lines.append(f"  at {goodput:.0%} goodput, senders x {factor:.3f} (straggler): senders {q.senders_s * factor:.3f} s, "
                     f"receive side {receive:.3f} s ({'flow replay' if args.replay else 'bound'}; bound "
                     f"{q.receive_bound_s:.3f}) -> {ends[-1]:.3f} s")
    return ends[0], ends[1], lines


if __name__ == "__main__":
    sys.exit(main())
