"""Plan a push at scale and predict its time with a cost model validated on measured runs.

    python -m recipes.simulate --model kimi_k2 --senders 256 --receivers 128 [--inference ep32]
        [--mode direct|reconstruct] [--nic-gbit 400] [--nics-per-gpu 1] [--validate]

It builds shapes-only metadata (``recipes.scale_models``), runs the real planner, counts
each sender's work per bucket and predicts the push with ``fsdp_sync.cost_model``. The
model's non-bandwidth constants come from the committed benchmark run (BENCH_RUN): CPU
costs per launch, quantize call and amax grid from its case-a stage spans, and the
per-push control-plane cost from its case-a push times; the per-push cost of the current
control plane comes from the later case-a log (LATER_LOG). ``--validate`` rebuilds the
benchmark's own plans and compares the model with every measured row. The last line is
``<model> <N>-><M> predicted_s=<x> floor_s=<y> plan_s=<planning seconds>``.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from torch.distributed.tensor import Replicate, Shard

from fsdp_sync import cost_model as cm
from fsdp_sync.errors import PlanError
from fsdp_sync.meta import LayoutSpec, ReceiverMeta, SourceParam
from fsdp_sync.plan import Plan
from fsdp_sync.planner import build_plan
from fsdp_sync.quant import get_quant_format
from fsdp_sync.sharding import shard_groups
from recipes import scale_models as sm

ROOT = Path(__file__).resolve().parent.parent
BENCH_RUN = ROOT / "bench_results/bench-NVIDIA-H200-20261126T051120.json"  # git ecebbc4
LATER_LOG = ROOT / "bench_results/bench-NVIDIA-H200-20261126T0519-case-a-only.log"  # git 1a58172
# Before 1a58172, reconstruct copied through the gather buffers even for one-rank shard groups.
BENCH_RUN_COPIES_SINGLE_RANK_GATHERS = True
ALLGATHER_GBPS = 283.0  # nccl-tests all_gather busbw, 2x H200, 2026-11-26 (FIELD.md): not in the bench JSON


@dataclass
class BenchRow:
    """One measured configuration, its plan rebuilt here, and what the model says of it."""

    case: str
    quant: str
    mode: str
    measured_s: float
    pipeline_s: float  # the model without the per-push cost
    stage_s: dict[str, float]
    work: dict[int, list[cm.BucketWork]]
    predicted_s: float = 0.0

    @property
    def error(self) -> float:
        return self.predicted_s / self.measured_s - 1


@dataclass
class Planned:
    """A plan with the metadata it was built from, as the cost model needs it."""

    plan: Plan
    sources: list[SourceParam]
    receivers: list[ReceiverMeta]
    hosts: list[str]
    devices: list[str]

    def work(self, *, copy_single_rank_gathers: bool = False) -> dict[int, list[cm.BucketWork]]:
        return cm.count_work(self.plan, self.sources, self.receivers, sender_hosts=self.hosts,
                             sender_devices=self.devices, copy_single_rank_gathers=copy_single_rank_gathers)


def bench_plan(case: str, model: str, quant: str, mode: str, ceilings: dict[str, float], watermark_bytes: int
               ) -> Planned:
    """The plan ``recipes.bench`` builds for a case: FSDP over the senders, receivers on their GPUs."""
    from recipes.bench import CASES

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
    hw = bench_hardware(ceilings)
    links = replace(hw.links(), inter_host_gbps=ceilings["nccl_sendrecv_gbps"])  # as recipes.bench sets them
    plan = build_plan(sources, receivers, sender_hosts=hosts, mode=mode, links=links, watermark_bytes=watermark_bytes,
                      sender_devices=devices)
    return Planned(plan, sources, receivers, hosts, devices)


@functools.cache
def _bench_shapes(model: str) -> dict:
    from recipes.models import param_shapes, qwen3_config

    return param_shapes(qwen3_config(model))


def bench_hardware(ceilings: dict[str, float]) -> cm.Hardware:
    """The benchmark machine as its own run measured it."""
    return cm.Hardware(nvlink_gbps=ceilings.get("peer_copy_gbps", ceilings["device_copy_gbps"]),
                       hbm_gbps=ceilings["device_copy_gbps"], allgather_gbps=ALLGATHER_GBPS)


def bench_rows(report: dict, ov: cm.Overheads, *, copy_single_rank_gathers: bool,
               cases: tuple[str, ...] | None = None) -> list[BenchRow]:
    """The measured rows of a report (of ``cases``, default all), with the model's pipeline seconds (no push cost)."""
    rows = []
    for case in (c for c in report["cases"] if cases is None or c["case"] in cases):
        hw = bench_hardware(case["ceilings"])
        for row in case["rows"]:
            planned = bench_plan(case["case"], case["model"], row["quant"], row["mode"], case["ceilings"],
                                 row["watermark_bytes"])
            stats = planned.plan.stats
            if (stats.num_tasks, stats.bytes_total) != (row["num_tasks"], row["bytes"]):
                raise ValueError(f"case {case['case']} {row['quant']} {row['mode']}: the rebuilt plan has "
                                 f"{stats.num_tasks} tasks and {stats.bytes_total} bytes, the measured one "
                                 f"{row['num_tasks']} and {row['bytes']}")
            work = planned.work(copy_single_rank_gathers=copy_single_rank_gathers)
            pipeline = cm.predict(planned.plan, work, hw, replace(ov, push_s=0.0),
                                  watermark_bytes=row["watermark_bytes"])
            rows.append(BenchRow(case["case"], row["quant"], row["mode"], statistics.median(row["times_s"]),
                                 pipeline.seconds, row["stage_s"], work))
    return rows


def calibrate(report: dict) -> cm.Overheads:
    """Overheads measured on a benchmark report's case a (one sender, so its spans are the whole story).

    Per launch: the ``quantize`` span of unquantized direct pushes over their tasks. Per
    amax grid: the ``amax`` span of FP8 direct pushes over their quantized parameters. Per
    quantize call: the rest of that push's ``quantize`` span. Per push: the median, over
    case a's rows, of measured time minus the model's pipeline.
    """
    case = next(c for c in report["cases"] if c["case"] == "a")
    plain = _row(case, "none", "direct")
    fp8 = _row(case, "fp8_block", "direct")
    launch_s = plain["stage_s"]["quantize"] / plain["num_tasks"]
    num_quantized = fp8["num_tasks"] - plain["num_tasks"]  # each quantized weight adds one scale task
    launches = plain["num_tasks"]  # unquantized weights and scale tasks
    ov = cm.Overheads(launch_s=launch_s,
                      quant_task_s=(fp8["stage_s"]["quantize"] - launches * launch_s) / num_quantized,
                      amax_param_s=fp8["stage_s"]["amax"] / num_quantized, push_s=0.0)
    rows = bench_rows(report, ov, copy_single_rank_gathers=BENCH_RUN_COPIES_SINGLE_RANK_GATHERS, cases=("a",))
    return replace(ov, push_s=statistics.median(r.measured_s - r.pipeline_s for r in rows),
                   funnel_param_s=_funnel_param_s(report, ov))


def _row(case: dict, quant: str, mode: str) -> dict:
    return next(r for r in case["rows"] if r["quant"] == quant and r["mode"] == mode and r["transport"] == "cuda_ipc")


def validate(report: dict, ov: cm.Overheads, *, copy_single_rank_gathers: bool = BENCH_RUN_COPIES_SINGLE_RANK_GATHERS
             ) -> list[BenchRow]:
    rows = bench_rows(report, ov, copy_single_rank_gathers=copy_single_rank_gathers)
    for r in rows:
        r.predicted_s = r.pipeline_s + ov.push_s
    return rows


def later_push_s(log: str, ov: cm.Overheads) -> float:
    """The per-push cost of the control plane as of 1a58172: LATER_LOG's cuda_ipc rows against the model."""
    ceilings = {k: float(v) for k, v in re.findall(r"(\w+_gbps) (\d+)", log)}
    residuals = []
    for quant, mode, median_ms in re.findall(r"^\s+(none|fp8_block)\s+(direct|reconstruct)\s+cuda_ipc\s+\d+\s+[\d.]+"
                                             r"\s+([\d.]+)", log, flags=re.M):
        planned = bench_plan("a", "qwen3_8b", quant, mode, ceilings, 4 << 30)
        pipeline = cm.predict(planned.plan, planned.work(), bench_hardware(ceilings), replace(ov, push_s=0.0),
                              watermark_bytes=4 << 30)
        residuals.append(float(median_ms) / 1e3 - pipeline.seconds)
    return statistics.median(residuals)


def _funnel_param_s(report: dict, ov: cm.Overheads) -> float:
    """Handshakes per parameter of the funnel baseline: case a's unquantized funnel time less its bytes."""
    case = next(c for c in report["cases"] if c["case"] == "a")
    seconds = statistics.median(case["baselines"]["none/funnel"])
    planned = bench_plan("a", case["model"], "none", "direct", case["ceilings"], 1 << 31)
    bytes_only = funnel(planned, bench_hardware(case["ceilings"]), ov)
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


def print_validation(report: dict, rows: list[BenchRow], ov: cm.Overheads) -> None:
    print(f"validation on {BENCH_RUN.name} (constants fitted on its case a; case b is out of sample)")
    print(f"  {'case':<5}{'quant':<10}{'mode':<12}{'measured_ms':>12}{'predicted_ms':>13}{'error':>8}")
    for r in rows:
        flag = "" if abs(r.error) <= 0.15 else "  > 15%"
        print(f"  {r.case:<5}{r.quant:<10}{r.mode:<12}{r.measured_s * 1e3:12.1f}{r.predicted_s * 1e3:13.1f}"
              f"{r.error:8.1%}{flag}")
    print("  rank-0 funnel (handshake per parameter fitted on case a, none):")
    for case in report["cases"]:
        for quant in ("none", "fp8_block"):
            planned = bench_plan(case["case"], case["model"], quant, "direct", case["ceilings"], 1 << 31)
            measured = case["baselines"][f"{quant}/funnel"]
            print(f"  {case['case']:<5}{quant:<10}{'funnel':<12}{statistics.median(measured) * 1e3:12.1f}"
                  f"{funnel(planned, bench_hardware(case['ceilings']), ov) * 1e3:13.1f}   runs "
                  + ", ".join(f"{t * 1e3:.0f}" for t in measured))


def _stage_lines(p: cm.Prediction) -> list[str]:
    s = p.slowest
    return ["  slowest sender, busy seconds per stage:",
            f"    CPU  launches {s.launch:.3f}  quantize calls {s.quantize:.3f}  amax grids {s.amax:.3f}  "
            f"collectives {s.collective:.3f}  = {s.cpu:.3f}",
            f"    GPU  copies {s.hbm:.3f}  quantize {s.quant:.3f}  all-gather {s.gather:.3f}  NVLink stores "
            f"{s.peer:.3f}  = {s.gpu:.3f}",
            f"    staging {s.fill:.3f}  WR posting {s.post:.3f}  NIC {s.nic:.3f}",
            f"  sender pipeline (overlapped) {p.senders_s:.3f} s, busiest receive link {p.receive_bound_s:.3f} s, "
            f"plan floor {p.floor_s:.3f} s -> {p.binding} binds",
            f"  + control plane per push {p.push_s:.3f} s = {p.seconds:.3f} s; busiest receive link "
            f"{p.receive_utilization:.1%} utilized"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="kimi_k2", choices=sorted(sm.MODELS))
    ap.add_argument("--senders", type=int, default=256)
    ap.add_argument("--receivers", type=int, default=128)
    ap.add_argument("--inference", default="ep32", choices=sorted(sm.INFERENCE_LAYOUTS))
    ap.add_argument("--pp", type=int, default=2, help="training pipeline stages")
    ap.add_argument("--ep", type=int, default=8, help="training expert parallelism (inside a node)")
    ap.add_argument("--num-layers", type=int, default=None, help="cut the model to this many layers (quick runs)")
    ap.add_argument("--mode", default="direct", choices=["direct", "reconstruct"])
    ap.add_argument("--quant", default="fp8_block", choices=["none", "fp8_block"])
    ap.add_argument("--nic-gbit", type=float, default=400.0, help="line rate of one NIC, Gb/s")
    ap.add_argument("--nics-per-gpu", type=int, default=1)
    ap.add_argument("--nic-efficiency", type=float, default=cm.Hardware.nic_efficiency)
    ap.add_argument("--watermark-mb", type=float, default=2048)
    ap.add_argument("--push-s", type=float, default=None, help="override the per-push control-plane cost")
    ap.add_argument("--validate", action="store_true", help="also print the model against every benchmark row")
    return ap


def plan_at_scale(args: argparse.Namespace, hw: cm.Hardware) -> Planned:
    training = sm.Training(num_gpus=args.senders, pp=args.pp, ep=args.ep)
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    report = json.loads(BENCH_RUN.read_text())
    ov = calibrate(report)
    current = replace(ov, push_s=later_push_s(LATER_LOG.read_text(), ov) if args.push_s is None else args.push_s)
    print(f"constants from {BENCH_RUN.name}: launch {ov.launch_s * 1e6:.1f} us, quantize call "
          f"{ov.quant_task_s * 1e6:.1f} us, amax grid {ov.amax_param_s * 1e6:.1f} us, push {ov.push_s * 1e3:.1f} ms "
          f"(code ecebbc4); push {current.push_s * 1e3:.1f} ms from {LATER_LOG.name} (code 1a58172)")
    if args.validate:
        print_validation(report, validate(report, ov), ov)
    # GPU-side speeds as BENCH_RUN measured them (H200); the NICs as given.
    hw = replace(bench_hardware(report["cases"][0]["ceilings"]), nic_gbit=args.nic_gbit,
                 nics_per_gpu=args.nics_per_gpu, nic_efficiency=args.nic_efficiency)
    try:
        planned = plan_at_scale(args, hw)
    except PlanError as e:
        print("\n".join(str(e).splitlines()[:6]))
        return 1
    plan, watermark = planned.plan, int(args.watermark_mb * 2**20)
    started = time.perf_counter()
    work = planned.work()
    nic_in = cm.receive_nic_bytes(plan, planned.receivers, planned.hosts)
    p = cm.predict(plan, work, hw, current, watermark_bytes=watermark, nic_in=nic_in)
    print(f"  floor {plan.stats.floor_s:.3f} s: busiest receive link {max(nic_in.values(), default=0) / 1e9:.1f} GB "
          f"at {hw.nic_line_gbps:.0f} GB/s line rate (goodput {hw.nic_gbps:.1f} GB/s); model in "
          f"{time.perf_counter() - started:.1f} s")
    print("\n".join(_stage_lines(p)))
    old = cm.predict(plan, work, hw, ov, watermark_bytes=watermark, nic_in=nic_in)
    print(f"  with the push cost of code ecebbc4 ({ov.push_s * 1e3:.0f} ms): {old.seconds:.3f} s, "
          f"{old.receive_utilization:.1%} utilized")
    print(f"  rank-0 funnel baseline: {funnel(planned, hw, current):.1f} s")
    print(f"{args.model} {args.senders}->{args.receivers} predicted_s={p.seconds:.3f} "
          f"floor_s={plan.stats.floor_s:.3f} plan_s={plan.stats.plan_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
