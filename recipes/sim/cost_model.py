"""A small cost model of one push: each sender's pipeline stages and how they overlap.

Pure arithmetic on a plan. Per sender and bucket it counts the work (Python per task,
copies, bytes through HBM, NVLink, all-gathers, NCCL sends and the NIC, RDMA work
requests), turns the counts into seconds with a handful of constants, and replays the
sender's pipeline: the producer thread packs bucket after bucket under the byte
watermark, the GPU runs each bucket's kernels in launch order on one stream, the
transfer thread sends, the NIC drains. The push ends when the slowest sender is done or
the busiest receive link has taken its bytes, whichever is later, plus a fixed cost for
announcing the push and collecting the acks. ``docs/simulate.md`` says which measured
run each constant comes from and what the model leaves out.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Sequence

from fsdp_sync.boxes import Box
from fsdp_sync.config import LinkModel
from fsdp_sync.meta import ReceiverMeta, SourceParam
from fsdp_sync.plan import DATA, Plan, Task
from fsdp_sync.quant import get_quant_format

_NUM_SLOTS = 2  # the rdma transport's staging slots (fsdp_sync.transport.rdma_wr.NUM_SLOTS)
_SMALL_COPY_ELEMS = 1 << 16  # fsdp_sync.kernels.copy_grouped.MAX_ELEMS: smaller copies share one launch
_MAPPED = ("cuda_ipc", "auto")  # transports whose kernels store into a same-host receiver's buffers
_CPU = ("bucket", "launch", "task", "quantize", "amax", "collective")
_GPU = ("hbm", "quant", "gather", "peer")


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """Ceilings (GB/s, the NIC's line rate in Gb/s) and the fraction of them our kernels reach."""

    nic_gbit: float = 400.0  # one NIC's line rate
    nics_per_gpu: int = 1
    nic_efficiency: float = 0.97  # RDMA WRITE goodput over line rate, MB-sized writes (assumed)
    # Defaults: the H100 ceilings of recipes.simulate.BENCH_RUN's case a, and nccl-tests on 2x H200.
    nvlink_gbps: float = 392.0  # a 1 GiB copy into a peer GPU's memory
    hbm_gbps: float = 2931.0  # read + written bytes of a 1 GiB device-to-device copy
    sendrecv_gbps: float = 341.0  # a 1 GiB NCCL send to a peer GPU of the host, acknowledged
    allgather_gbps: float = 283.0  # bytes a rank receives per second in an all-gather inside a host
    copy_efficiency: float = 1.0  # our copies on one GPU (strided slices), of hbm_gbps
    quant_efficiency: float = 1.0  # the grouped FP8 quantize launch (read + written), of hbm_gbps
    peer_copy_efficiency: float = 1.0  # our copies into a peer GPU, of nvlink_gbps
    peer_store_efficiency: float = 1.0  # the quantize launch storing FP8 into a peer GPU, of nvlink_gbps

    @property
    def nic_gbps(self) -> float:
        """Goodput of one GPU's NICs, GB/s."""
        return self.nic_gbit / 8 * self.nics_per_gpu * self.nic_efficiency

    @property
    def nic_line_gbps(self) -> float:
        return self.nic_gbit / 8 * self.nics_per_gpu

    @property
    def quant_gbps(self) -> float:
        return self.hbm_gbps * self.quant_efficiency

    def links(self) -> LinkModel:
        """What the planner balances with, at line rate, so the plan's floor is the ideal."""
        return LinkModel(intra_host_gbps=self.nvlink_gbps, inter_host_gbps=self.nic_line_gbps,
                         hbm_gbps=self.hbm_gbps)


@dataclass(frozen=True, kw_only=True)
class Overheads:
    """Seconds per unit of work that is not bytes."""

    bucket_s: float  # a replayed bucket: its recorded launches and the scale arithmetic
    launch_s: float  # one tensor copied by copy_all (foreach, or copy_ from 16 Mi elements on)
    task_s: float  # Python of one unquantized or scale task packed afresh (not replayed)
    quant_task_s: float  # Python of one quantized task packed afresh: its staging, its cells queued
    amax_param_s: float  # Python of one quantized parameter's scale grid, packed afresh
    send_s: float = 0.0  # one NCCL send of a bucket's coalesced group: its Python and NCCL's per-op cost
    push_s: float = 0.0  # per push: announcing it and collecting the receivers' acks
    write_s: float = 1e-6  # posting one RDMA WRITE (assumed)
    collective_s: float = 50e-6  # latency of one bucket's all-reduce or all-gather (assumed)
    funnel_param_s: float = 0.0  # the funnel baseline's handshakes per parameter


@dataclass
class BucketWork:
    """What one sender does for one bucket, as counts."""

    budget_bytes: int  # what the watermark charges (the plan's Bucket.nbytes)
    replayed: bool = False  # its launches were recorded on an earlier push and run again
    launches: int = 0  # tensors copied through copy_all
    tasks: int = 0  # unquantized and scale tasks packed in Python (not replayed)
    quant_tasks: int = 0  # quantized tasks packed in Python (not replayed)
    amax_params: int = 0  # quantized params whose scale grid is set up in Python (not replayed)
    collectives: int = 0
    hbm_bytes: float = 0.0  # read + written by copies on this GPU (gather buffers, local copies, amax reads)
    quant_bytes: float = 0.0  # read + written by quantize launches whose output stays on this GPU
    gather_bytes: float = 0.0  # received by all-gathers inside the host
    gather_nic_bytes: float = 0.0  # received by all-gathers across hosts
    peer_copy_bytes: float = 0.0  # stored into peer GPUs of this host by copies
    peer_read_bytes: float = 0.0  # read here by quantize launches that store into peers
    peer_store_bytes: float = 0.0  # stored into peer GPUs by those launches
    peer_in_bytes: float = 0.0  # stored into this GPU by the quantize launches of other senders of the bucket
    sends: int = 0  # NCCL sends to receivers of this host (two-sided transport)
    link_bytes: float = 0.0  # their bytes
    nic_bytes: float = 0.0  # sent through the NIC, after the transfer thread copies it into a staging slot
    writes: int = 0  # RDMA work requests


@dataclass
class Stages:
    """Seconds per stage: CPU (producer thread), GPU (pack stream), transfer thread, NIC."""

    bucket: float = 0.0
    launch: float = 0.0
    task: float = 0.0
    quantize: float = 0.0
    amax: float = 0.0
    collective: float = 0.0
    hbm: float = 0.0
    quant: float = 0.0
    gather: float = 0.0
    peer: float = 0.0
    send: float = 0.0
    link: float = 0.0
    fill: float = 0.0
    post: float = 0.0
    nic: float = 0.0

    @property
    def cpu(self) -> float:
        return sum(getattr(self, k) for k in _CPU)

    @property
    def gpu(self) -> float:
        return sum(getattr(self, k) for k in _GPU)

    def add(self, other: "Stages") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class SenderTimeline:
    """One sender's replayed pipeline."""

    busy: Stages = field(default_factory=Stages)  # summed over buckets
    first_out_s: float = 0.0  # when its first bytes leave for a receiver
    end_s: float = 0.0  # when its last byte has left
    packed_s: list[float] = field(default_factory=list)  # per bucket: its kernels done, the transfer thread may take it
    fill_s: list[float] = field(default_factory=list)  # per bucket: the copy into a staging slot
    post_s: list[float] = field(default_factory=list)  # per bucket: posting its WRITEs


@dataclass
class Prediction:
    """A push's predicted seconds, what bound it, and the slowest sender's stages."""

    seconds: float
    floor_s: float
    senders_s: float  # the slowest sender's pipeline
    receive_bound_s: float  # busiest receive link at goodput, after the first bytes leave
    push_s: float
    slowest: Stages  # the slowest sender's busy seconds per stage
    receive_utilization: float  # busiest receive link: its bytes over (line rate x seconds)
    binding: str
    replay_s: float = 0.0  # the flow-level replay's last byte (0 when not replayed)


def count_work(plan: Plan, sources: Sequence[SourceParam], receivers: Sequence[ReceiverMeta], *,
               sender_hosts: Sequence[str], sender_devices: Sequence[str] | None = None,
               transport: str = "auto", max_write_bytes: int = 1 << 30,
               staged_replay: bool = False) -> dict[int, list[BucketWork]]:
    """Per sender, the work of every bucket it takes part in, in pipeline order.

    This restates what ``fsdp_sync.packing`` and the transports do per bucket and task on
    GPU with grouped kernels (``kernels=auto``), in a push after the first. With a mapped
    transport (``cuda_ipc``, or ``auto`` on one host) kernels store into same-host
    receivers' buffers; otherwise every payload is packed into a buffer of its own and sent
    (``nccl`` inside a host, RDMA across hosts). A bucket whose every task is stored
    straight into its destination, in direct mode or by a shard group of one, is replayed:
    its launches were recorded, so it pays no Python per task.

    ``staged_replay``: the code since the staging slots (``fsdp_sync.staging``, 489eae8)
    replays such buckets whatever their transport (staged payloads keep their addresses).
    Off by default: the NCCL rows the constants were fitted on ran the code before it.
    """
    devices = sender_devices or [""] * len(sender_hosts)
    mapped = transport in _MAPPED
    by_name = {s.name: s for s in sources}
    recv = {r.rank: r for r in receivers}
    held = {(s.name, g.ranks): dict(zip(g.ranks, g.boxes)) for s in sources for g in s.groups}
    tasks_of: dict[tuple[int, int], list[Task]] = defaultdict(list)
    for s, tasks in plan.tasks.items():
        for t in tasks:
            tasks_of[(s, t.bucket)].append(t)
    out: dict[int, list[BucketWork]] = defaultdict(list)
    for b in plan.buckets:
        size = len(b.group)
        spans_hosts = len({sender_hosts[r] for r in b.group}) > 1
        gathers = plan.mode == "reconstruct" and size > 1
        # Direct mode all-reduces a bucket's amaxes only where a shard boundary cuts a block
        # on some rank of the group (the packer learns it on the first push).
        reduces = plan.mode == "direct" and size > 1 and any(
            _cuts_a_block(by_name[name], held[(name, b.group)][r], plan.fmt_of[name])
            for name in b.quantized for r in b.group)
        # FP8 that the group's quantize launches store into each GPU over NVLink, from another GPU.
        stored_in: dict[str, int] = defaultdict(int)
        if mapped:
            for s in b.group:
                for t in tasks_of.get((s, b.index), ()):
                    r = recv[t.receiver]
                    if (t.kind == DATA and t.fmt != "none" and r.host == sender_hosts[s] and r.device
                            and not _same_device(devices[s], r.device)):
                        stored_in[r.device] += t.nbytes
        for s in b.group:
            w = BucketWork(b.nbytes, peer_in_bytes=stored_in.get(devices[s], 0) if devices[s] else 0)
            mine_tasks = tasks_of.get((s, b.index), ())
            w.replayed = (plan.mode == "direct" or size == 1) and (staged_replay or all(
                mapped and recv[t.receiver].host == sender_hosts[s] for t in mine_tasks))
            for name in b.params:
                src = by_name[name]
                box = held[(name, b.group)][s]
                mine = box.numel() * src.dtype.itemsize
                if gathers:
                    # Copy the shard into the flat send buffer, all-gather, copy each box out.
                    w.launches += 1 + size
                    w.hbm_bytes += 2 * mine + 2 * src.nbytes
                    if spans_hosts:
                        w.gather_nic_bytes += src.nbytes - mine
                    else:
                        w.gather_bytes += src.nbytes - mine
                if name in b.quantized:
                    w.amax_params += not w.replayed
                    if not gathers:  # blocks a shard boundary cuts take an amax pass and the all-reduce
                        block = get_quant_format(plan.fmt_of[name]).block_shape(src.shape)
                        inner = box.whole_blocks(block, src.shape)
                        w.hbm_bytes += (box.numel() - (inner.numel() if inner else 0)) * src.dtype.itemsize
            if gathers or reduces:
                w.collectives += 1
            for t in mine_tasks:
                _count_task(w, t, by_name, recv[t.receiver], sender_hosts[s], devices[s], mapped, max_write_bytes)
            out[s].append(w)
    return dict(out)


def _same_device(sender_device: str, receiver_device: str) -> bool:
    """Whether a receiver's buffers live on the sender's GPU (unknown devices: assume not)."""
    return bool(sender_device) and receiver_device == sender_device


def _cuts_a_block(src: SourceParam, box: Box, fmt: str) -> bool:
    """Whether ``box`` holds part of a block (of ``fmt``) and not all of it."""
    inner = box.whole_blocks(get_quant_format(fmt).block_shape(src.shape), src.shape)
    return box.numel() > (inner.numel() if inner is not None else 0)


def _count_task(w: BucketWork, t: Task, by_name: dict[str, SourceParam], receiver: ReceiverMeta, host: str,
                device: str, mapped: bool, max_write_bytes: int) -> None:
    quantized = t.kind == DATA and t.fmt != "none"
    read = t.src_box.numel() * by_name[t.src].dtype.itemsize if t.kind == DATA else t.nbytes
    if not w.replayed:
        if quantized:
            w.quant_tasks += 1
        else:
            w.tasks += 1
    if mapped and receiver.host == host:  # stored straight into the receiver's buffer
        local = _same_device(device, receiver.device)
        if quantized and local:
            w.quant_bytes += read + t.nbytes
        elif quantized:  # one launch reads here and stores into the peer over NVLink
            w.peer_read_bytes += read
            w.peer_store_bytes += t.nbytes
        else:
            w.launches += t.src_box.numel() > _SMALL_COPY_ELEMS
            if local:
                w.hbm_bytes += read + t.nbytes
            else:
                w.peer_copy_bytes += t.nbytes
        return
    if quantized:  # a payload of its own, then sent
        w.quant_bytes += read + t.nbytes
    if receiver.host == host:  # NCCL, one send per task
        w.sends += 1
        w.link_bytes += t.nbytes
    else:  # the transfer thread copies the payload into a staging slot
        w.nic_bytes += t.nbytes
        w.writes += num_writes(t.dst_box, receiver.tensors[t.dst].shape, t.nbytes, max_write_bytes)


def num_writes(box: Box, shape: Sequence[int], nbytes: int, max_write_bytes: int) -> int:
    """RDMA WRITEs for ``box`` of a row-major tensor: one per contiguous run, split at ``max_write_bytes``.

    The rule of ``fsdp_sync.transport.rdma_wr.contiguous_runs``, counted instead of listed.
    """
    if box.is_empty():
        return 0
    split = len(shape) - 1
    while split > 0 and box.sizes[split] == shape[split]:
        split -= 1
    runs = math.prod(box.sizes[:split])
    return runs * -(-(nbytes // runs) // max_write_bytes)


def bucket_stages(w: BucketWork, hw: Hardware, ov: Overheads) -> Stages:
    """One bucket's counts in seconds per stage."""
    gb = 1e9
    copy, peer_copy = hw.hbm_gbps * hw.copy_efficiency * gb, hw.nvlink_gbps * hw.peer_copy_efficiency * gb
    return Stages(
        bucket=ov.bucket_s if w.replayed else 0.0, launch=w.launches * ov.launch_s, task=w.tasks * ov.task_s,
        quantize=w.quant_tasks * ov.quant_task_s, amax=w.amax_params * ov.amax_param_s,
        collective=w.collectives * ov.collective_s,
        hbm=w.hbm_bytes / copy, quant=quantize_launch_s(w, hw),
        gather=w.gather_bytes / (hw.allgather_gbps * gb) + w.gather_nic_bytes / (hw.nic_gbps * gb),
        peer=w.peer_copy_bytes / peer_copy,
        send=w.sends * ov.send_s, link=w.link_bytes / (hw.sendrecv_gbps * gb),
        fill=2 * w.nic_bytes / copy, post=w.writes * ov.write_s, nic=w.nic_bytes / (hw.nic_gbps * gb))


def quantize_launch_s(w: BucketWork, hw: Hardware) -> float:
    """Seconds of a bucket's grouped quantize launch: the slower of its HBM traffic and its NVLink stores.

    One launch holds the bucket's cells, and where it stores both here and into a peer GPU
    its programs alternate between the two kinds (``kernels.fp8_grouped.interleaved_order``),
    so HBM and NVLink are busy at once rather than one after the other. Through this GPU's
    HBM go every byte the launch reads, the FP8 it stores here, and the FP8 that other
    senders' launches of the same bucket store into this GPU meanwhile; over NVLink, the
    FP8 it stores into peers.
    """
    if not (w.quant_bytes or w.peer_read_bytes):
        return 0.0
    gb = 1e9
    hbm = (w.quant_bytes + w.peer_read_bytes + w.peer_in_bytes) / (hw.quant_gbps * gb)
    return max(hbm, w.peer_store_bytes / (hw.nvlink_gbps * hw.peer_store_efficiency * gb))


def sender_timeline(work: Sequence[BucketWork], hw: Hardware, ov: Overheads, *, watermark_bytes: int
                    ) -> SenderTimeline:
    """Replay one sender's pipeline bucket by bucket (``fsdp_sync.pipeline`` and the transports).

    The producer packs a bucket once the watermark admits it (an oversized one waits until
    nothing is in flight). The GPU runs its kernels in order on one stream as they are
    launched, so a bucket's kernels end no earlier than its last launch. The transfer
    thread takes a packed bucket once its kernels are done. Over NCCL it issues the
    bucket's sends as one group and waits for them. Over RDMA it waits for a free staging
    slot, which the NIC frees two buckets later, copies into it and posts. A bucket leaves
    the watermark once the transfer thread is done with it.
    """
    tl = SenderTimeline()
    cpu_clock = gpu_clock = xfer_clock = nic_clock = 0.0
    in_flight: list[tuple[float, int]] = []  # (released at, budget bytes)
    nic_done: list[float] = []
    for i, w in enumerate(work):
        st = bucket_stages(w, hw, ov)
        start = cpu_clock
        while True:
            in_flight = [(at, n) for at, n in in_flight if at > start]
            if not in_flight or sum(n for _, n in in_flight) + w.budget_bytes <= watermark_bytes:
                break
            start = min(at for at, _ in in_flight)
        cpu_clock = start + st.cpu
        gpu_clock = max(max(gpu_clock, start) + st.gpu, cpu_clock)
        xfer_clock = max(xfer_clock, gpu_clock)
        tl.packed_s.append(gpu_clock)
        tl.fill_s.append(st.fill)
        tl.post_s.append(st.post)
        if w.sends:
            tl.first_out_s = tl.first_out_s or xfer_clock + st.send
            xfer_clock += st.send + st.link
        if w.nic_bytes:
            if i >= _NUM_SLOTS:
                xfer_clock = max(xfer_clock, nic_done[i - _NUM_SLOTS])
            xfer_clock += st.fill  # the copy into the slot, synchronized before posting
            tl.first_out_s = tl.first_out_s or xfer_clock
            nic_clock = max(max(nic_clock, xfer_clock) + st.nic, xfer_clock + st.post)
            xfer_clock += st.post
        elif (w.peer_copy_bytes or w.peer_store_bytes) and not tl.first_out_s:
            tl.first_out_s = start
        nic_done.append(nic_clock)
        in_flight.append((xfer_clock, w.budget_bytes))
        tl.busy.add(st)
    tl.end_s = max(xfer_clock, nic_clock)
    return tl


def flow_replay(plan: Plan, timelines: dict[int, SenderTimeline], receivers: Sequence[ReceiverMeta],
                sender_hosts: Sequence[str], *, sender_gbps: float, receiver_gbps: float,
                batch: float = 0.01) -> float:
    """When the last byte lands, replaying every sender's buckets in plan order over a shared fabric.

    Flows are (sender, bucket, receiver) byte counts through the NICs. Each sender's
    transfer thread takes its buckets in order, once packed (``timelines``' ``packed_s``),
    copies each into one of two staging slots (free once the bucket two before it has
    left) and posts it; its flows then share the sender's and the receivers' NICs max-min
    fairly (progressive filling), recomputed whenever a flow starts or ends. The fabric
    has full bisection: only the NICs limit. Flows ending within ``batch`` (a fraction)
    of the earliest end are ended together, to bound the number of events.
    """
    import heapq

    import numpy as np

    host = {r.rank: r.host for r in receivers}
    per: dict[tuple[int, int], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for s, tasks in plan.tasks.items():
        for t in tasks:
            if sender_hosts[s] != host[t.receiver]:
                per[(s, t.bucket)][t.receiver] += t.nbytes
    order = {s: [b.index for b in plan.buckets if s in b.group] for s in timelines}
    num_s = max(timelines, default=-1) + 1
    num_r = len(receivers)
    cap = np.concatenate([np.full(num_s, sender_gbps * 1e9), np.full(num_r, receiver_gbps * 1e9)])
    nxt = {s: 0 for s in order}
    tx = {s: 0.0 for s in order}
    done: dict[int, list[float | None]] = {s: [None] * len(order[s]) for s in order}
    left: dict[tuple[int, int], int] = {}  # (sender, position) -> flows still running
    starts: list[tuple[float, int, int]] = []

    def schedule(s: int) -> None:
        tl = timelines[s]
        while nxt[s] < len(order[s]):
            k = nxt[s]
            if k >= _NUM_SLOTS and done[s][k - _NUM_SLOTS] is None:
                return
            begin = max(tx[s], tl.packed_s[k], done[s][k - _NUM_SLOTS] if k >= _NUM_SLOTS else 0.0) + tl.fill_s[k]
            tx[s] = begin + tl.post_s[k]
            heapq.heappush(starts, (begin, s, k))
            nxt[s] += 1

    for s in order:
        schedule(s)
    key_id: dict[tuple[int, int], int] = {}
    flow_s = np.zeros(0, dtype=np.int64)
    flow_r = np.zeros(0, dtype=np.int64)
    flow_left = np.zeros(0)
    flow_key = np.zeros(0, dtype=np.int64)
    keys: list[tuple[int, int]] = []
    now, last = 0.0, 0.0
    rate = np.zeros(0)
    dirty = True
    while starts or len(flow_left):
        if dirty and len(flow_left):
            rate = _max_min_rates(flow_s, flow_r + num_s, cap)
        dirty = False
        finish = flow_left / rate if len(flow_left) else flow_left
        t_end = now + float(finish.min()) if len(finish) else math.inf
        t_start = starts[0][0] if starts else math.inf
        if t_start <= t_end:
            step, ending = t_start - now, np.zeros(len(flow_left), dtype=bool)
        else:
            step, ending = t_end - now, finish <= finish.min() * (1 + batch) + 1e-12
        flow_left = np.maximum(flow_left - rate * step, 0.0)
        now += step
        touched = set()
        if ending.any():
            ended = flow_key[ending]
            keep = ~ending
            flow_s, flow_r, flow_left, flow_key, rate = (flow_s[keep], flow_r[keep], flow_left[keep], flow_key[keep],
                                                         rate[keep])
            dirty = True
            for kid in ended.tolist():
                key = keys[kid]
                left[key] -= 1
                if not left[key]:
                    done[key[0]][key[1]] = now
                    last = max(last, now)
                    touched.add(key[0])
        new_s, new_r, new_b, new_k = [], [], [], []
        while starts and starts[0][0] <= now + 1e-15:
            _, s, k = heapq.heappop(starts)
            flows = per.get((s, order[s][k]), {})
            left[(s, k)] = len(flows)
            if not flows:
                done[s][k] = now
                touched.add(s)
                continue
            kid = key_id.setdefault((s, k), len(keys))
            if kid == len(keys):
                keys.append((s, k))
            for r, nbytes in flows.items():
                new_s.append(s)
                new_r.append(r)
                new_b.append(float(nbytes))
                new_k.append(kid)
        if new_s:
            flow_s = np.concatenate([flow_s, new_s]).astype(np.int64)
            flow_r = np.concatenate([flow_r, new_r]).astype(np.int64)
            flow_left = np.concatenate([flow_left, new_b])
            flow_key = np.concatenate([flow_key, new_k]).astype(np.int64)
            rate = np.concatenate([rate, np.zeros(len(new_s))])
            dirty = True
        for s in touched:
            schedule(s)
    return last


def _max_min_rates(src: "np.ndarray", dst: "np.ndarray", cap: "np.ndarray") -> "np.ndarray":
    """Max-min fair rates of flows that each cross two links (progressive filling)."""
    import numpy as np

    rate = np.zeros(len(src))
    frozen = np.zeros(len(src), dtype=bool)
    room = cap.astype(float).copy()
    while not frozen.all():
        live = ~frozen
        count = np.bincount(src[live], minlength=len(cap)) + np.bincount(dst[live], minlength=len(cap))
        used = count > 0
        share = np.full(len(cap), np.inf)
        share[used] = room[used] / count[used]
        delta = share.min()
        rate[live] += delta
        room -= delta * count
        full = used & (share <= delta * (1 + 1e-9))  # the links at this level are now full
        frozen |= full[src] | full[dst]
    return rate


def receive_nic_bytes(plan: Plan, receivers: Sequence[ReceiverMeta], sender_hosts: Sequence[str]) -> dict[int, int]:
    """Bytes that reach each receiver through its NIC (from senders on other hosts)."""
    host = {r.rank: r.host for r in receivers}
    return {r: sum(t.nbytes for t in tasks if sender_hosts[t.sender] != host[r]) for r, tasks in plan.arrivals.items()}


def predict(plan: Plan, work: dict[int, list[BucketWork]], hw: Hardware, ov: Overheads, *, watermark_bytes: int,
            nic_in: dict[int, int] | None = None, replay: tuple[Sequence[ReceiverMeta], Sequence[str]] | None = None
            ) -> Prediction:
    """The push's seconds: the slowest sender, the receive side or the plan's floor, then the control plane.

    ``nic_in`` (bytes per receiver through its NIC) adds the receive side as a bound: the
    senders share each receive link, which cannot finish before its bytes have passed at
    goodput, counted from the moment the first pipeline sends. ``replay`` (the receivers
    and the senders' hosts) replaces that bound with ``flow_replay`` of the plan's order.
    """
    by_sender = {s: sender_timeline(w, hw, ov, watermark_bytes=watermark_bytes) for s, w in work.items()}
    timelines = list(by_sender.values())
    slowest = max(timelines, key=lambda t: t.end_s)
    busiest = max((nic_in or {}).values(), default=0)
    fill = min((t.first_out_s for t in timelines if t.first_out_s), default=0.0)
    receive_bound = fill + busiest / (hw.nic_gbps * 1e9) if busiest else 0.0
    candidates = {"sender pipeline": slowest.end_s, "receive link": receive_bound, "plan floor": plan.stats.floor_s}
    replay_s = 0.0
    if replay is not None:
        receivers, hosts = replay
        replay_s = flow_replay(plan, by_sender, receivers, hosts, sender_gbps=hw.nic_gbps, receiver_gbps=hw.nic_gbps)
        del candidates["receive link"]
        candidates["flow replay"] = replay_s
    binding = max(candidates, key=candidates.get)
    seconds = candidates[binding] + ov.push_s
    utilization = busiest / (hw.nic_line_gbps * 1e9 * seconds) if busiest else 0.0
    return Prediction(seconds, plan.stats.floor_s, slowest.end_s, receive_bound, ov.push_s, slowest.busy,
                      utilization, binding, replay_s)


def funnel_seconds(sources: Sequence[SourceParam], payload_bytes: dict[str, int], *, hw: Hardware, ov: Overheads,
                   sender_hosts: Sequence[str], receiver_hosts: Sequence[str], quantized: set[str]) -> float:
    """The rank-0 funnel baseline (``recipes.baselines.funnel_*``), one parameter after another.

    Trainer rank 0 gathers the whole parameter (from its shard group, or from another
    pipeline stage), quantizes it and sends it to inference rank 0, which hands it on to
    every other receiver (a pipelined broadcast: each receiver takes it once at its link's
    speed; with 2 receivers that is the bench's one send).
    """
    gb = 1e9
    total = 0.0
    for src in sources:
        group = next((g for g in src.groups if 0 in g.ranks), src.groups[0])  # pipeline stages hold the rest
        mine = group.box_of(0).numel() * src.dtype.itemsize if 0 in group.ranks else 0
        one_host = {sender_hosts[r] for r in group.ranks} == {sender_hosts[0]}
        total += (src.nbytes - mine) / ((hw.allgather_gbps if one_host else hw.nic_gbps) * gb)
        payload = payload_bytes[src.name]
        if src.name in quantized:
            total += (src.nbytes + payload) / (hw.quant_gbps * gb)
        total += payload / ((hw.nvlink_gbps if receiver_hosts[0] == sender_hosts[0] else hw.nic_gbps) * gb)
        if len(receiver_hosts) > 1:
            inner = all(h == receiver_hosts[0] for h in receiver_hosts)
            total += payload / ((hw.nvlink_gbps if inner else hw.nic_gbps) * gb)
        total += ov.funnel_param_s
    return total
