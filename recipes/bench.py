"""Benchmark: fsdp_sync pushes against the measured floor and two baselines, on 1-2 GPUs.

    python -m recipes.bench [--cases f,a,b] [--repeats 10] [--nccl-tests DIR] [--update --lr 1e-6 --delta auto]

Cases (each in both modes, for quant none and fp8_block, over cuda_ipc and nccl):
  f: colocated 1 -> 1 on one GPU, trainer and engine processes sharing it (Qwen3-8B-like), the
     setup most RL users start with (verl's hybrid engine, TRL's colocate mode); IPC only;
  a: disaggregated 1 -> 1, trainer on GPU0, receiver on GPU1 (Qwen3-8B-like by default);
  b: colocated 2 -> 2, FSDP over both GPUs, TP=2 receivers on the same GPUs (Qwen3-32B-like);
  c, d, e: disjoint trainer and inference GPUs on 4 or 8 GPUs (FSDP 2 -> TP 2, FSDP 4 -> TP 4,
  HSDP 2x2 -> 2 replicas of TP 2); a case needing more GPUs than present is skipped.
The same run measures the link ceilings (peer copy, NCCL send/recv, device copy), checks
every receiver's bytes against the reference before timing, times >= 10 pushes after
warm-up, times the rank-0 funnel and bucketed all-gather + broadcast baselines (and, with one
trainer rank colocated, the same-process per-parameter loop), and writes one JSON file under
bench_results/. A case needing more GPUs than present is skipped, saying so.

``--update`` makes the pushed weights move as in RL: between timed pushes (outside the
timing) each trainer rank runs a forward and backward on random tokens and an AdamW step
on fp32 masters of its bf16 shards (``recipes.master``) at ``--lr``. With ``--delta``
each row also reports the bytes moved against a full push and the changed fraction.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import platform
import queue
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fsdp_sync import LayoutSpec, LinkModel, SyncConfig, WeightReceiver, WeightSender, allocate_destinations
from fsdp_sync.config import DELTA_MODES, KERNELS
from fsdp_sync.destinations import checksum, expected_destinations
from . import baselines
from .jobs import free_port, spawn_context, start_job
from .master import fp32_master
from .models import param_shapes, qwen3_config, sharded_random_model

GiB = 1 << 30
CASES = {
    "f": dict(senders=1, receivers=1, tp=1, receiver_gpu_offset=0, model="qwen3_8b",
              about="colocated 1->1 on one GPU: trainer and engine processes share GPU0"),
    "a": dict(senders=1, receivers=1, tp=1, receiver_gpu_offset=1, model="qwen3_8b",
              about="disaggregated 1->1: trainer GPU0, receiver GPU1"),
    "b": dict(senders=2, receivers=2, tp=2, receiver_gpu_offset=0, model="qwen3_32b",
              about="colocated 2->2: FSDP over both GPUs, TP=2 receivers on the same GPUs"),
    # Disjoint trainer and inference GPUs (4 and 8 GPUs):
    "c": dict(senders=2, receivers=2, tp=2, receiver_gpu_offset=2, model="qwen3_8b",
              about="disaggregated FSDP 2 -> TP 2: trainer GPU0-1, receivers GPU2-3"),
    "d": dict(senders=4, receivers=4, tp=4, receiver_gpu_offset=4, model="qwen3_32b",
              about="disaggregated FSDP 4 -> TP 4: trainer GPU0-3, receivers GPU4-7"),
    "e": dict(senders=4, receivers=4, tp=2, receiver_gpu_offset=4, model="qwen3_32b", mesh=(2, 2),
              about="HSDP 2x2 -> 2 replicas of TP 2: trainer GPU0-3, receivers GPU4-7"),
}


def gpus_needed(case: dict) -> int:
    return max(case["senders"], case["receiver_gpu_offset"] + case["receivers"])


@dataclass
class Spec:
    case: str
    model: str
    senders: int
    receivers: int
    tp: int
    store_port: int
    configs: list[tuple[str, str, str, int]]  # (quant, mode, transport, control port: the parent's store)
    repeats: int
    warmup: int
    baseline_repeats: int
    watermark_mb: float
    probe_receiver: int | None = 0  # a receiver on another GPU than trainer rank 0 (None: there is none)
    kernels: str = "auto"  # SyncConfig.kernels: grouped launches per bucket, or one per box
    mesh: tuple[int, ...] = ()  # trainer mesh: (shard,) for FSDP, (replicate, shard) for HSDP
    profile_dir: str = ""  # one more push per config under torch.profiler, trainer rank 0's trace here
    colocated: bool = False  # every receiver shares its GPU with a trainer rank
    update: bool = False  # an AdamW step (fp32 masters) on random tokens before every push after the first
    lr: float = 1e-6
    delta: str = "off"  # SyncConfig.delta of both jobs

    @property
    def pushes(self) -> int:
        """Pushes per config: the checked one, warm-up, timed ones, and the profiled one."""
        return 1 + self.warmup + self.repeats + (1 if self.profile_dir else 0)

    def layout(self, r: int) -> LayoutSpec:
        return LayoutSpec("hf_tp", {"tp_rank": r % self.tp, "tp_size": self.tp}) if self.tp > 1 else LayoutSpec("identity")

    def job(self, quant: str, mode: str, transport: str) -> str:
        return f"bench-{self.case}-{quant}-{mode}-{transport}"


def _store(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=600))


def _probe_group(store, rank: int):
    """Trainer rank 0 and one receiver on another GPU, for the NCCL ceiling."""
    pg = dist.ProcessGroupNCCL(dist.PrefixStore("probe/", store), rank, 2, datetime.timedelta(seconds=600))
    pg.allreduce([torch.zeros(1, device="cuda")]).wait()
    return pg


def _cuda_seconds(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _ceilings(group) -> dict:
    """GB/s of a 1 GiB peer copy, device copy (read + write bytes) and NCCL send to a receiver
    (``group``; None on one GPU, where NCCL refuses two ranks)."""
    here = torch.device("cuda", torch.cuda.current_device())
    other = torch.device("cuda", (here.index + 1) % torch.cuda.device_count())
    src = torch.empty(GiB, dtype=torch.uint8, device=here)
    out = {}
    if other != here:
        dst = torch.empty(GiB, dtype=torch.uint8, device=other)
        out["peer_copy_gbps"] = GiB / _cuda_seconds(lambda: dst.copy_(src, non_blocking=True)) / 1e9
        del dst
    dst = torch.empty_like(src)
    out["device_copy_gbps"] = 2 * GiB / _cuda_seconds(lambda: dst.copy_(src)) / 1e9
    del dst
    if group is None:
        return out
    times = []
    for _ in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        group.send([src], 1, 0).wait()
        torch.cuda.synchronize()
        group.recv([src[:1]], 1, 0).wait()  # the receiver's ack: it has the bytes
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out["nccl_sendrecv_gbps"] = GiB / statistics.median(times[1:]) / 1e9
    return out


def trainer(rank: int, world_size: int, spec: Spec, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    store = _store(spec.store_port)
    device = torch.device("cuda", torch.cuda.current_device())
    config = qwen3_config(spec.model)
    model = sharded_random_model(config, init_device_mesh("cuda", spec.mesh or (world_size,)), seed=0)
    shapes = param_shapes(config)
    if rank == 0:
        probe = _probe_group(store, 0) if spec.probe_receiver is not None else None
        store.set("links", json.dumps(_ceilings(probe)))
    ceilings = json.loads(store.get("links"))
    copy = ceilings["device_copy_gbps"]
    links = LinkModel(intra_host_gbps=ceilings.get("peer_copy_gbps", copy),
                      inter_host_gbps=ceilings.get("nccl_sendrecv_gbps", copy), hbm_gbps=copy)
    rows = []
    optim = fp32_master(model, torch.optim.AdamW, lr=spec.lr) if spec.update else None
    pushed: dict[str, list[torch.Tensor]] = {}  # with updates: per quant, the shards its last push sent

    def step() -> None:  # the weights move as after an RL step; not timed
        if optim is not None:
            ids = torch.randint(0, config.vocab_size, (1, 256), device=device)
            model(input_ids=ids, labels=ids).loss.backward()
            optim.step()

    for quant, mode, transport, port in spec.configs:
        cfg = SyncConfig(control=f"127.0.0.1:{port}", job=spec.job(quant, mode, transport), quant=quant, mode=mode,
                         transport=transport.removesuffix("-staged"), timeout_s=300, watermark_mb=spec.watermark_mb,
                         links=links, host_control=False,  # the bench's own store, hosted by the parent
                         fused_writes=not transport.endswith("-staged"), kernels=spec.kernels, delta=spec.delta)
        sender = WeightSender(model, cfg)
        sender.push(1).wait()
        _verify(model, spec, store, cfg, rank)
        for _ in range(spec.warmup):
            step()
            sender.push().wait()
        times, peaks, stages, parts, moved, announce_steps = [], [], [], [], [], []
        for _ in range(spec.repeats):
            step()
            dist.barrier()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            handle = sender.push()
            t1 = time.perf_counter()
            result = handle.wait()
            times.append(time.perf_counter() - t0)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
            stages.append(result.stage_seconds)
            moved.append((result.bytes_sent, result.full_bytes, result.changed_fraction or 0.0))
            # Where the wall time goes: announcing, the push thread, then the receivers' acks.
            parts.append(dict(publish=t1 - t0, run=result.seconds, acks=times[-1] - (t1 - t0) - result.seconds))
            announce_steps.append({**result.announce_seconds, "acks wait": result.acks_seconds or 0.0})
        if spec.profile_dir:
            _profiled_push(sender, os.path.join(spec.profile_dir, f"{cfg.job}-rank{rank}"), rank)
        if optim is not None:  # the baselines must send what this quant's receivers last got
            pushed[quant] = [_local(p).clone() for p in model.parameters()]
        peak = torch.tensor([max(peaks)], device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        totals = torch.tensor([sum(m[0] for m in moved), sum(m[1] for m in moved)], dtype=torch.float64, device=device)
        dist.all_reduce(totals)  # every rank sends its own part
        if rank == 0:
            plan = sender.controller.plan
            rows.append(dict(quant=quant, mode=mode, transport=transport, bytes=plan.stats.bytes_total,
                             floor_s=plan.stats.floor_s, times_s=times, peak_extra_bytes=int(peak.item()),
                             watermark_bytes=cfg.watermark_bytes, plan_s=plan.stats.plan_s,
                             num_tasks=plan.stats.num_tasks, stage_s=stages[len(stages) // 2], kernels=cfg.kernels,
                             parts_s={k: statistics.median(p[k] for p in parts) for k in parts[0]},
                             fixed_s={k: statistics.median(a.get(k, 0.0) for a in announce_steps)
                                      for k in announce_steps[0]},
                             delta=cfg.delta, lr=spec.lr if spec.update else None,
                             sent_over_full=(totals[0] / totals[1]).item(),
                             changed_fraction=statistics.median(m[2] for m in moved)))
            print(row_line(spec.case, rows[-1]), flush=True)  # in the log even if the run is cut short
        sender.close()
        torch.cuda.empty_cache()
        dist.barrier()  # every sender rank unmapped the receivers' buffers, not only rank 0
        if rank == 0:
            store.set(f"closed/{cfg.job}", b"1")  # receivers may free buffers we mapped
    if rank == 0:  # reported even if a baseline fails later (they hold more memory at once)
        results.put(("rows", pickle.dumps(dict(ceilings=ceilings, rows=rows))))
    base_rows, run_id = {}, 0
    outbox = baselines.Outbox(store, spec.receivers) if rank == 0 else None
    for quant in sorted({c[0] for c in spec.configs}):
        with torch.no_grad():  # later configs' steps moved the weights on
            for p, shard in zip(model.parameters(), pushed.get(quant, ())):
                _local(p).copy_(shard)
        for name, run in (("funnel", lambda: baselines.funnel_trainer(model, outbox, quant)),
                          ("allgather_broadcast", lambda: baselines.broadcast_trainer(
                              model, outbox, shapes, quant, GiB, spec.receivers))):
            times = []
            for _ in range(spec.baseline_repeats + 1):
                run_id += 1
                dist.barrier()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                run()
                if outbox is not None:
                    outbox.wait_finished(run_id)
                times.append(time.perf_counter() - t0)
            base_rows[(quant, name)] = times[1:]
    if spec.senders == 1 and spec.colocated:  # the hybrid engine: the engine's tensors in this process
        for quant in sorted({c[0] for c in spec.configs}):
            layout = spec.layout(0)
            dests = allocate_destinations(shapes, layout=layout, quant=quant, device=device)
            times = []
            for _ in range(spec.baseline_repeats + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                baselines.same_process_loop(model, dests, layout, quant)
                times.append(time.perf_counter() - t0)
            base_rows[(quant, "same_process")] = times[1:]
            del dests
            torch.cuda.empty_cache()
    if rank == 0:
        results.put(("bench", pickle.dumps(dict(ceilings=ceilings, rows=rows,
                                                baselines={f"{q}/{n}": t for (q, n), t in base_rows.items()}))))


def _profiled_push(sender: WeightSender, path: str, rank: int) -> None:
    """One push under torch.profiler (CPU threads and the GPU's kernels and copies); rank 0
    writes a gzipped Chrome trace, to see where a push's time goes beyond the floor."""
    from torch.profiler import ProfilerActivity, profile

    dist.barrier()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sender.push().wait()
        torch.cuda.synchronize()
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        prof.export_chrome_trace(path + ".json.gz")


def _verify(model, spec: Spec, store, cfg: SyncConfig, rank: int) -> None:
    """Every receiver's bytes equal the reference, checked by position-weighted checksums."""
    expected: dict[int, dict[str, int]] = {r: {} for r in range(spec.receivers)}
    for name, p in model.named_parameters():
        full = p.full_tensor()
        if rank == 0:
            for r in range(spec.receivers):
                for dst, t in expected_destinations({name: full}, layout=spec.layout(r), quant=cfg.quant).items():
                    expected[r][dst] = checksum(t)
        del full
    if rank != 0:
        return
    for r in range(spec.receivers):
        got = pickle.loads(store.get(f"sum/{cfg.job}/{r}"))
        bad = [n for n in expected[r] if got.get(n) != expected[r][n]]
        if bad or set(got) != set(expected[r]):
            raise AssertionError(f"{cfg.job}: receiver {r} differs from the reference in {bad[:5]}")


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (a DTensor), or the tensor itself."""
    return param.to_local() if hasattr(param, "to_local") else param.data


def receiver(rank: int, world_size: int, spec: Spec, results) -> None:
    store = _store(spec.store_port)
    device = torch.device("cuda", torch.cuda.current_device())
    shapes = param_shapes(qwen3_config(spec.model))
    if spec.probe_receiver is not None and rank == spec.probe_receiver:
        group = _probe_group(store, 1)
        buf = torch.empty(GiB, dtype=torch.uint8, device=device)
        for _ in range(4):
            group.recv([buf], 0, 0).wait()
            torch.cuda.synchronize()
            group.send([buf[:1]], 0, 0).wait()
        del buf
    store.wait(["links"])
    last = spec.pushes
    sums: dict[str, dict[str, int]] = {}
    for quant, mode, transport, port in spec.configs:
        cfg = SyncConfig(control=f"127.0.0.1:{port}", job=spec.job(quant, mode, transport), quant=quant, mode=mode,
                         transport=transport.removesuffix("-staged"), timeout_s=300, host_control=False,
                         delta=spec.delta)
        layout = spec.layout(rank)
        dests = allocate_destinations(shapes, layout=layout, quant=quant, device=device)
        recv = WeightReceiver(dests, config=cfg, layout=layout.name, layout_kwargs=layout.kwargs, rank=rank,
                              world_size=world_size)
        recv.wait_for(1)
        sums[quant] = {n: checksum(t) for n, t in recv.tensors.items()}
        store.set(f"sum/{cfg.job}/{rank}", pickle.dumps(sums[quant]))
        recv.wait_for(last)
        if spec.update:  # the weights moved since version 1: the baselines must deliver the last one
            sums[quant] = {n: checksum(t) for n, t in recv.tensors.items()}
        store.wait([f"closed/{cfg.job}"])
        recv.close()
        del dests, recv
        # Exported blocks wait in torch's IPC limbo until every sender unmapped them;
        # collect them first, then hand the cache back, so a colocated trainer can use it.
        torch.cuda.ipc_collect()
        torch.cuda.empty_cache()
        print(f"receiver {rank}: {cfg.job} closed, {torch.cuda.memory_reserved(device) / 2**30:.2f} GiB still "
              f"reserved, {torch.cuda.mem_get_info(device)[0] / 2**30:.1f} GiB free on the GPU", flush=True)
    quants = sorted({c[0] for c in spec.configs})
    inbox = baselines.Inbox(store, rank, max(baselines.capacity(shapes, q, GiB) for q in quants), device)
    layouts = [spec.layout(r) for r in range(spec.receivers)]
    run_id = 0
    for quant in quants:
        dests = allocate_destinations(shapes, layout=spec.layout(rank), quant=quant, device=device)
        for name, run in (("funnel", lambda: baselines.funnel_receiver(rank, shapes, layouts, quant, dests, inbox)),
                          ("allgather_broadcast", lambda: baselines.broadcast_receiver(
                              shapes, spec.layout(rank), quant, dests, inbox, GiB))):
            for i in range(spec.baseline_repeats + 1):
                run_id += 1
                run()
                inbox.finished(run_id)
                if i == 0 and {n: checksum(t) for n, t in dests.items()} != sums[quant]:
                    raise AssertionError(f"baseline {name} ({quant}) delivered other bytes than fsdp_sync")
        del dests
        torch.cuda.empty_cache()


def _environment(git_sha: str) -> dict:
    topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout
    import triton

    return dict(gpu=torch.cuda.get_device_name(0), num_gpus=torch.cuda.device_count(), topology=topo,
                torch=torch.__version__, cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())),
                triton=triton.__version__, python=platform.python_version(), git_sha=git_sha,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _nccl_tests(folder: str) -> dict:
    """Bus bandwidth lines of NVIDIA's nccl-tests at 1-2 GiB, to print beside our own probe."""
    out = {}
    for binary in ("sendrecv_perf", "all_gather_perf"):
        run = subprocess.run([os.path.join(folder, binary), "-b", "1G", "-e", "2G", "-f", "2", "-g", "2"],
                             capture_output=True, text=True)
        out[binary] = [line for line in run.stdout.splitlines() if line.strip() and not line.startswith("#")
                       or "Avg bus bandwidth" in line]
    return out


def run_case(name: str, args, ctx) -> dict:
    case = CASES[name]
    model = args.model or case["model"]
    store = dist.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=600))
    # NCCL refuses two ranks of one communicator on one GPU: colocated cases use IPC only.
    transports = [t for t in args.transports if not (t == "nccl" and case["receiver_gpu_offset"] == 0)]
    configs = [(q, m, t, store.port) for t in transports for q in args.quants for m in args.modes]
    colocated = case["receiver_gpu_offset"] == 0
    # NCCL's ceiling needs a receiver on another GPU than trainer rank 0.
    probe = 0 if not colocated else (case["receivers"] - 1 if case["receivers"] > 1 else None)
    spec = Spec(name, model, case["senders"], case["receivers"], case["tp"], store.port, configs, args.repeats,
                args.warmup, args.baseline_repeats, args.watermark_mb, probe_receiver=probe,
                mesh=case.get("mesh", ()), kernels=args.kernels, profile_dir=args.profile or "", colocated=colocated,
                update=args.update, lr=args.lr, delta=args.delta)
    results = ctx.Queue()
    procs = start_job(ctx, trainer, spec.senders, results, spec, results, gpu_offset=0)
    procs += start_job(ctx, receiver, spec.receivers, results, spec, results, gpu_offset=case["receiver_gpu_offset"])
    report, partial = None, None
    finished = 0
    try:
        while finished < len(procs):
            try:
                item = results.get(timeout=args.timeout)
            except queue.Empty:  # a process died without a word (OOM killer) or hangs
                error = f"case {name}: no message from the jobs within --timeout {args.timeout:.0f} s"
                if partial is None:
                    raise TimeoutError(error) from None
                print(error)
                report = dict(partial, baselines={}, error=error)
                break
            if item[0] == "bench":
                report = pickle.loads(item[1])
            elif item[0] == "rows":
                partial = pickle.loads(item[1])
            elif item[2] == "error":
                error = f"case {name}: {item[0]} rank {item[1]} failed:\n{item[3]}"
                if partial is None:
                    raise RuntimeError(error)
                print(error)  # fsdp_sync's rows are measured; the baselines are not
                report = dict(partial, baselines={}, error=error.splitlines()[0] + " " + item[3].splitlines()[0])
                break
            else:
                finished += 1
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    report.update(case=name, model=model, about=case["about"])
    _print_case(report)
    return report


def row_line(case: str, row: dict) -> str:
    """One measured configuration on one line, printed as soon as it is timed: a run killed
    later (a timeout, a baseline's crash) still leaves it in the log, where the table and
    the JSON come only at the end of the case."""
    med = statistics.median(row["times_s"])
    moved = (f", sent {row['sent_over_full']:.2%} of a full push (delta {row['delta']}, lr {row['lr']}), "
             f"{row['changed_fraction']:.2%} of weights changed") if row.get("delta", "off") != "off" else ""
    return (f"measured case {case} {row['quant']} {row['mode']} {row['transport']}: median {med * 1e3:.2f} ms "
            f"(min {min(row['times_s']) * 1e3:.2f}, max {max(row['times_s']) * 1e3:.2f}, {len(row['times_s'])} pushes), "
            f"floor {row['floor_s'] * 1e3:.2f} ms, ratio {med / row['floor_s']:.2f}, {row['bytes'] / 1e6:.0f} MB, "
            f"peak extra {row['peak_extra_bytes'] / 2**20:.0f} MB{moved}")


def _print_case(report: dict) -> None:
    c = report["ceilings"]
    print(f"\ncase {report['case']}: {report['about']}, model {report['model']}")
    print("  ceilings: " + ", ".join(f"{k} {v:.0f}" for k, v in c.items()))
    head = (f"  {'quant':<10}{'mode':<12}{'transport':<10}{'MB':>8}{'floor_ms':>10}{'median_ms':>10}"
            f"{'min':>8}{'max':>8}{'ratio':>7}{'GB/s':>7}{'funnel_ms':>10}{'x':>6}{'ag+bc_ms':>10}{'x':>6}"
            f"{'1proc_ms':>10}{'x':>6}"
            f"{'peak_MB':>9}{'wm_MB':>7}")
    print(head)
    for row in report["rows"]:
        med = statistics.median(row["times_s"])
        row.update(median_s=med, ratio=med / row["floor_s"], gbps=row["bytes"] / med / 1e9)
        base = ""
        for name in ("funnel", "allgather_broadcast", "same_process"):
            times = report["baselines"].get(f"{row['quant']}/{name}")
            if times:  # absent when a baseline failed (report["error"] says how) or does not apply
                t = statistics.median(times)
                row.update({f"{name}_s": t, f"speedup_{name}": t / med})
                base += f"{t * 1e3:10.1f}{t / med:6.1f}"
            elif name == "same_process":  # applies to one colocated trainer rank only
                base += f"{'':>10}{'':6}"
            else:
                base += f"{'n/a':>10}{'':6}"
        print(f"  {row['quant']:<10}{row['mode']:<12}{row['transport']:<10}{row['bytes'] / 1e6:8.0f}"
              f"{row['floor_s'] * 1e3:10.2f}{med * 1e3:10.2f}{min(row['times_s']) * 1e3:8.2f}"
              f"{max(row['times_s']) * 1e3:8.2f}{row['ratio']:7.2f}{row['gbps']:7.0f}{base}"
              f"{row['peak_extra_bytes'] / 2**20:9.0f}{row['watermark_bytes'] / 2**20:7.0f}")
    # Where a push's time goes on trainer rank 0 (busy time per stage of its median push).
    for row in report["rows"]:
        stages = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in row.get("stage_s", {}).items())
        named = {"publish": "announce", "run": "push thread", "acks": "acks"}
        parts = ", ".join(f"{named.get(k, k)} {v * 1e3:.1f}" for k, v in row.get("parts_s", {}).items())
        fixed = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in row.get("fixed_s", {}).items())
        print(f"  stages ms, {row['quant']} {row['mode']} {row['transport']} ({row.get('kernels', 'auto')} kernels): "
              f"{stages}; wall: {parts}; around the push thread (medians): {fixed}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="f,a,b")
    ap.add_argument("--model", default=None, help="override the model of every case (e.g. qwen3_tiny)")
    ap.add_argument("--quants", default="none,fp8_block")
    ap.add_argument("--modes", default="direct,reconstruct")
    ap.add_argument("--transports", default="cuda_ipc,nccl",
                    help="cuda_ipc, nccl; 'cuda_ipc-staged' quantizes locally, then copies (fused_writes=False)")
    ap.add_argument("--kernels", default="auto", choices=KERNELS,
                    help="FP8 kernels: auto/grouped = one launch per bucket, per_box = one per parameter box")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--baseline-repeats", type=int, default=3)
    ap.add_argument("--watermark-mb", type=float, default=4096)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--nccl-tests", default=None, help="folder with nccl-tests binaries (sendrecv_perf, ...)")
    ap.add_argument("--git-sha", default=os.environ.get("GIT_SHA", "unknown"))
    ap.add_argument("--out", default="bench_results")
    ap.add_argument("--profile", default=None,
                    help="folder: one more push per config under torch.profiler, a Chrome trace of trainer rank 0")
    ap.add_argument("--update", action="store_true",
                    help="an AdamW step (fp32 masters, random tokens) between pushes, so weights change as in RL")
    ap.add_argument("--lr", type=float, default=1e-6, help="the --update step's learning rate")
    ap.add_argument("--delta", default="off", choices=DELTA_MODES, help="SyncConfig.delta of both jobs")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("recipes.bench needs a CUDA GPU (case f runs on one, the others on 2 to 8)")
        return 2
    for name in ("quants", "modes", "transports", "cases"):
        setattr(args, name, [x for x in getattr(args, name).split(",") if x])
    env = _environment(args.git_sha)
    print(f"fsdp_sync bench on {env['num_gpus']}x {env['gpu']}; torch {env['torch']}, CUDA {env['cuda']}, "
          f"NCCL {env['nccl']}, Triton {env['triton']}, git {env['git_sha']}")
    print(env["topology"])
    report = dict(environment=env, cases=[])
    if args.nccl_tests:
        report["nccl_tests"] = _nccl_tests(args.nccl_tests)
        for binary, lines in report["nccl_tests"].items():
            print(f"nccl-tests {binary}:\n  " + "\n  ".join(lines[-4:]))
    ctx = spawn_context()
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    path = os.path.join(args.out, f"bench-{env['gpu'].replace(' ', '-')}-{stamp}.json")
    _write(report, path)  # the environment (and nccl-tests) even if no case runs
    for name in args.cases:
        if gpus_needed(CASES[name]) > torch.cuda.device_count():
            print(f"\ncase {name} skipped: needs {gpus_needed(CASES[name])} GPUs, this machine has "
                  f"{torch.cuda.device_count()}")
            continue
        try:
            report["cases"].append(run_case(name, args, ctx))
        except Exception as e:  # noqa: BLE001 - the other cases still run and are written
            print(f"\ncase {name} failed: {e!r}")
            report["cases"].append(dict(case=name, error=repr(e)))
        _write(report, path)  # after every case: a later crash keeps what was measured
    print(f"\nwrote {path}")
    return 0


def _write(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
