"""The RDMA transport short of the wire: everything that runs without an RDMA device.

The schedule is built from real plans and then executed by a loopback that does what
the NIC does (copy ``length`` bytes from a staging slot to the address a region maps
``remote_addr`` to), so every address, offset, length and key is checked by the
bytes it moves. Connection data goes through a real TCPStore.
"""

from __future__ import annotations

import platform
import socket
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard

from fsdp_sync.config import LinkModel, SyncConfig
from fsdp_sync.control import PUSH_LATEST, ControlPlane, done_key, push_key, sender_error_key
from fsdp_sync.errors import SyncError, SyncTimeout
from fsdp_sync.meta import ReceiverMeta
from fsdp_sync.planner import build_plan
from fsdp_sync.transport import get_transport
from fsdp_sync.transport.rdma_discovery import (NicPort, RdmaOptions, choose_gid, nearest_nic, parse_device,
                                                rdma_available)
from fsdp_sync.transport.rdma_exchange import (RECV, SEND, Endpoint, QpEndpoint, connected_key, endpoint_key,
                                               open_push, publish, report_setup_error, setup_error_key,
                                               wait_endpoints)
from fsdp_sync.transport.rdma_memory import check_destinations, containing, segments_for
from recipes.jobs import free_port
from fsdp_sync.transport.rdma_wr import (NUM_SLOTS, Arrivals, Region, RegionTable, RemoteTensor, SendWindow,
                                         build_schedule, contiguous_runs, fill_slot, imm_of, unwrap_imm)
from fsdp_sync.boxes import Box
from tests.planner_fixtures import receivers_for, sources_on
from tests.timeouts import scaled

WHEEL_PLATFORM = platform.machine() == "x86_64" and sys.version_info < (3, 13)  # where pyverbs 56.0rc1 has wheels


# --- helpers: a real plan, and receivers whose tensors share one allocation -------------------

SHAPES = {"model.layers.0.self_attn.q_proj.weight": (256, 384), "model.layers.0.mlp.down_proj.weight": (384, 256),
          "model.layers.0.input_layernorm.weight": (384,), "lm_head.weight": (200, 384)}


def make_plan(placements: list, *, tp: int, quant: str, num_senders: int = 2):
    sources = sources_on(SHAPES, list(range(num_senders)), placements)
    receivers = receivers_for(sources, num_replicas=1, tp=tp, quant=quant, host=lambda r: "infer0")
    plan = build_plan(sources, receivers, sender_hosts=["train0"] * num_senders, mode="direct", links=LinkModel(),
                      watermark_bytes=60_000)  # small buckets: several per sender, both staging slots in use
    return plan, receivers


def one_allocation(meta: ReceiverMeta) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The receiver's tensors as views of one buffer, the way an allocator segment holds them."""
    sizes = {n: Box.full(t.shape).numel() * t.dtype.itemsize for n, t in meta.tensors.items()}
    buffer = torch.zeros(sum(-(-n // 512) * 512 for n in sizes.values()) + 512, dtype=torch.uint8)
    tensors, offset = {}, 256  # not at the buffer's start: a tensor's address is not its region's
    for name, t in meta.tensors.items():
        tensors[name] = buffer[offset:offset + sizes[name]].view(t.dtype).view(t.shape)
        offset += -(-sizes[name] // 512) * 512
    return buffer, tensors


class Loopback:
    """What the NICs do with a schedule: copy staging bytes to the memory a region maps."""

    def __init__(self, receivers: list[ReceiverMeta], *, dmabuf_like: set[int] = frozenset()):
        self.buffers, self.tensors, self.tables, self.targets = {}, {}, {}, {}
        self.by_rkey: dict[int, tuple[int, Region]] = {}
        for meta in receivers:
            r = meta.rank
            self.buffers[r], self.tensors[r] = one_allocation(meta)
            segments = segments_for(self.tensors[r].values())
            assert len(segments) == 1, "tensors of one allocation register as one region"
            seg = segments[0]
            # dma-buf regions are addressed from 0, host regions by virtual address.
            region = Region(seg.base, seg.length, rkey=7000 + r, iova=0 if r in dmabuf_like else seg.base)
            self.by_rkey[region.rkey] = (r, region)
            self.tables[r] = RegionTable([region])
            for name, t in self.tensors[r].items():
                self.targets[(r, name)] = RemoteTensor(t.data_ptr(), tuple(t.shape), t.element_size())
        self.hits = {r: torch.zeros(b.numel(), dtype=torch.int32) for r, b in self.buffers.items()}

    def execute(self, batch, staging: torch.Tensor, slot_bytes: int) -> None:
        for w in batch.writes:
            r, region = self.by_rkey[w.rkey]
            assert r == w.receiver
            start = region.base + (w.remote_addr - region.iova) - self.buffers[r].data_ptr()
            assert 0 <= start and start + w.length <= self.buffers[r].numel()
            src = batch.slot * slot_bytes + w.offset
            self.buffers[r][start:start + w.length].copy_(staging[src:src + w.length])
            self.hits[r][start:start + w.length] += 1


def expected_values(receivers: list[ReceiverMeta], seed: int) -> dict[int, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for meta in receivers:
        out[meta.rank] = {}
        for name, t in meta.tensors.items():
            raw = torch.randint(0, 120, (Box.full(t.shape).numel() * t.dtype.itemsize,), dtype=torch.uint8, generator=gen)
            out[meta.rank][name] = raw.view(t.dtype).view(t.shape)  # bytes below 120: no NaN patterns
    return out


def replay(plan, receivers, *, signal_every: int, max_outstanding: int, max_wr_bytes: int = 1 << 30,
           dmabuf_like: set[int] = frozenset()):
    """Build every sender's schedule and run one push through the loopback, as the transport posts it."""
    loop = Loopback(receivers, dmabuf_like=dmabuf_like)
    want = expected_values(receivers, seed=1)
    schedules = {}
    for s in range(plan.num_senders):
        sp = plan.for_sender(s)
        sched = build_schedule(sp.tasks, [b.index for b in sp.buckets], loop.targets, loop.tables,
                               signal_every=signal_every, max_wr_bytes=max_wr_bytes)
        schedules[s] = sched
        staging = torch.empty(NUM_SLOTS * sched.slot_bytes, dtype=torch.uint8)
        window = SendWindow(max_outstanding, signal_every=signal_every)
        posted: list = []  # in flight, oldest first: the NIC completes each QP in order

        def complete_oldest(receiver=None):
            batch = next(b for b in posted if receiver is None or b.receiver == receiver)
            posted.remove(batch)
            loop.execute(batch, staging, sched.slot_bytes)
            window.completed(batch.receiver, batch.id)

        for bucket in sched.order:
            writes = sched.buckets[bucket]
            while not window.slot_free(writes.slot):
                complete_oldest()
            payloads = [(i, writes_box_view(want, sp.tasks[i])) for i in writes.offsets]
            fill_slot(staging, sched, bucket, payloads)
            for batch in writes.batches:
                while not window.has_room(batch):
                    complete_oldest(batch.receiver)
                window.posted(batch)
                posted.append(batch)
                assert window.in_flight[batch.receiver] <= max_outstanding
        while posted:
            complete_oldest()
        assert window.idle()
    return loop, want, schedules


def writes_box_view(want, task) -> torch.Tensor:
    return task.dst_box.view(want[task.receiver][task.dst])


def check_landed(loop: Loopback, want) -> None:
    for r, tensors in loop.tensors.items():
        for name, t in tensors.items():
            assert torch.equal(t.view(torch.uint8), want[r][name].view(torch.uint8)), f"receiver {r} {name!r}"
        covered = sum(t.numel() * t.element_size() for t in tensors.values())
        assert int((loop.hits[r] == 1).sum()) == covered, "some byte was written twice or not at all"
        assert int((loop.hits[r] > 1).sum()) == 0


# --- pyverbs, availability, the clear no-device error ------------------------------------------

def test_pyverbs_importable():
    if not WHEEL_PLATFORM:
        pytest.skip(f"pyverbs 56.0rc1 has no wheel for {platform.machine()} Python {sys.version_info[:2]}")
    import pyverbs.device
    import pyverbs.mr

    assert hasattr(pyverbs.mr, "DmaBufMR") and hasattr(pyverbs.device, "get_device_list")


def test_rdma_is_a_registered_transport():
    assert SyncConfig(transport="rdma").transport == "rdma"
    pytest.importorskip("pyverbs")
    send_cls, recv_cls = get_transport("rdma")
    assert (send_cls.__name__, recv_cls.__name__) == ("RdmaSend", "RdmaRecv")


@pytest.fixture
def control():
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=scaled(10)), wait_for_workers=False)
    yield ControlPlane(store, "rdma-test", timeout_s=scaled(5.0))


def test_no_device_is_a_clear_error_on_both_sides(control):
    pytest.importorskip("pyverbs")
    ok, reason = rdma_available()
    if ok:
        pytest.skip(f"this host has RDMA ports: {reason}")
    assert "RDMA device" in reason or "pyverbs" in reason
    plan, receivers = make_plan([Shard(0)], tp=1, quant="none")
    send_cls, recv_cls = get_transport("rdma")
    config = SyncConfig(transport="rdma", timeout_s=5.0)
    with pytest.raises(SyncError, match=r"transport='rdma' is not usable.*RDMA device.*'nccl'.*'gloo'"):
        send_cls(control, plan.for_sender(0), {m.rank: m for m in receivers}, config, "train0")
    # The failure is posted for the peers, so a receiver waiting to connect stops at once.
    assert control.has(setup_error_key(plan.fingerprint, SEND, 0))
    tensors = one_allocation(receivers[0])[1]
    with pytest.raises(SyncError, match="RDMA device"):
        recv_cls.prepare(tensors, job="j", rank=0)
    with pytest.raises(SyncError, match="RDMA device"):
        recv_cls(control, plan.for_receiver(0), tensors, config)
    assert "RDMA device" in control.get(setup_error_key(plan.fingerprint, RECV, 0))


# --- the work-request schedule from real plans ----------------------------------------------

def test_schedule_lands_every_byte_of_a_tp_fp8_plan():
    """FSDP 2 -> TP 2, FP8 with scales: row ranges and scale boxes, several buckets per sender."""
    plan, receivers = make_plan([Shard(0)], tp=2, quant="fp8_block")
    loop, want, schedules = replay(plan, receivers, signal_every=4, max_outstanding=8, dmabuf_like={1})
    check_landed(loop, want)
    assert any(len(s.order) >= 3 for s in schedules.values()), "the plan should use several buckets"
    for s, sched in schedules.items():
        tasks = plan.for_sender(s).tasks
        # Each task's writes cover exactly its bytes, one write per contiguous run.
        per_task: dict[int, list] = {}
        for batch in sched.batches:
            for w in batch.writes:
                per_task.setdefault(w.task, []).append(w)
        assert sorted(per_task) == list(range(len(tasks)))
        for i, writes in per_task.items():
            assert sum(w.length for w in writes) == tasks[i].nbytes
            target = loop.targets[(tasks[i].receiver, tasks[i].dst)]
            assert len(writes) == len(contiguous_runs(tasks[i].dst_box, target.shape)[1])
        check_signalling(sched, tasks, signal_every=4)


def check_signalling(sched, tasks, *, signal_every: int) -> None:
    streams: dict[int, list] = {}
    for bucket in sched.order:
        writes = sched.buckets[bucket]
        last_in_bucket: dict[int, object] = {}
        for batch in writes.batches:
            assert 1 <= len(batch.writes) <= signal_every
            assert batch.writes[-1].signaled and not any(w.signaled for w in batch.writes[:-1])
            assert all(w.receiver == batch.receiver for w in batch.writes)
            assert batch.slot == writes.slot
            streams.setdefault(batch.receiver, []).extend(batch.writes)
            last_in_bucket[batch.receiver] = batch.writes[-1]
        # The last write of a bucket is signalled: its completion frees the staging slot.
        assert all(w.signaled for w in last_in_bucket.values())
    for r, stream in streams.items():
        # Plan order per receiver, and exactly one final WRITE WITH IMM, the very last.
        order = [w.task for w in stream]
        assert order == sorted(order)
        assert [w.final for w in stream] == [False] * (len(stream) - 1) + [True]
        assert stream[-1].signaled
        assert stream[-1].task == max(i for i, t in enumerate(tasks) if t.receiver == r)
        gap = 0
        for w in stream:
            gap = 0 if w.signaled else gap + 1
            assert gap < signal_every
    assert set(sched.finals()) == set(streams)


def test_column_shards_split_into_one_write_per_row():
    """Shard(1) sources: each destination box is half of every row, so one write per row."""
    plan, receivers = make_plan([Shard(1)], tp=1, quant="none")
    loop, want, schedules = replay(plan, receivers, signal_every=16, max_outstanding=16)
    check_landed(loop, want)
    for s, sched in schedules.items():
        tasks = plan.for_sender(s).tasks
        writes = [w for b in sched.batches for w in b.writes]
        for i, task in enumerate(tasks):
            mine = [w for w in writes if w.task == i]
            shape = receivers[task.receiver].tensors[task.dst].shape
            if len(shape) == 2 and task.dst_box.sizes[1] < shape[1]:
                assert len(mine) == task.dst_box.sizes[0]
                assert {w.length for w in mine} == {task.dst_box.sizes[1] * 2}  # bf16
                rows = sorted(mine, key=lambda w: w.remote_addr)
                assert all(b.remote_addr - a.remote_addr == shape[1] * 2 for a, b in zip(rows, rows[1:]))
        check_signalling(sched, tasks, signal_every=16)


def test_long_runs_split_at_max_wr_bytes():
    plan, receivers = make_plan([Shard(0)], tp=1, quant="none")
    loop, want, schedules = replay(plan, receivers, signal_every=3, max_outstanding=5, max_wr_bytes=1000)
    check_landed(loop, want)
    assert max(w.length for s in schedules.values() for b in s.batches for w in b.writes) == 1000


def test_contiguous_runs_merge_whole_trailing_dims():
    assert contiguous_runs(Box((2, 0), (3, 8)), (10, 8)) == (24, [16])  # full rows: one run
    assert contiguous_runs(Box((1, 2), (2, 3)), (4, 8)) == (3, [10, 18])
    assert contiguous_runs(Box((0, 1, 0), (2, 2, 5)), (3, 4, 5)) == (10, [5, 25])
    assert contiguous_runs(Box((), ()), ()) == (1, [0])
    assert contiguous_runs(Box((0, 0), (0, 4)), (3, 4)) == (0, [])


def test_writes_outside_registered_memory_are_refused_at_plan_time():
    plan, receivers = make_plan([Shard(0)], tp=1, quant="none")
    loop = Loopback(receivers)
    sp = plan.for_sender(0)
    table = loop.tables[0]
    region = table.regions[0]
    short = {0: RegionTable([Region(region.base, region.length // 2, region.rkey, region.iova)])}
    with pytest.raises(SyncError, match="not inside one registered region"):
        build_schedule(sp.tasks, [b.index for b in sp.buckets], loop.targets, short, signal_every=4, max_wr_bytes=1 << 20)
    task = sp.tasks[0]
    small = dict(loop.targets)
    small[(0, task.dst)] = RemoteTensor(small[(0, task.dst)].addr, (1,) * len(task.dst_box.sizes), 2)
    with pytest.raises(SyncError, match="outside"):
        build_schedule(sp.tasks, [b.index for b in sp.buckets], small, loop.tables, signal_every=4, max_wr_bytes=1 << 20)
    with pytest.raises(ValueError, match="signal_every"):
        build_schedule(sp.tasks, [b.index for b in sp.buckets], loop.targets, loop.tables, signal_every=0, max_wr_bytes=1)
    with pytest.raises(ValueError, match="max_outstanding"):
        SendWindow(2, signal_every=4)


def test_work_requests_are_chained_and_signalled():
    pytest.importorskip("pyverbs")
    import pyverbs.libibverbs_enums as e

    from fsdp_sync.transport.rdma_verbs import send_chain, set_imm

    plan, receivers = make_plan([Shard(0)], tp=2, quant="fp8_block")
    loop = Loopback(receivers)
    sp = plan.for_sender(0)
    sched = build_schedule(sp.tasks, [b.index for b in sp.buckets], loop.targets, loop.tables,
                           signal_every=4, max_wr_bytes=1 << 20)
    for batch in sched.batches:
        chain = send_chain(batch, 0x10000 + batch.slot * sched.slot_bytes, lkey=42)
        assert len(chain) == len(batch.writes)
        for wr, w in zip(chain, batch.writes):
            assert wr.wr_id == batch.id and wr.num_sge == 1
            assert wr.opcode == (e.IBV_WR_RDMA_WRITE_WITH_IMM if w.final else e.IBV_WR_RDMA_WRITE)
            assert wr.send_flags == (e.IBV_SEND_SIGNALED if w.signaled else 0)
    final = send_chain(sched.finals()[1], 0, lkey=1)[-1]
    set_imm(final, imm_of(7))
    assert socket.ntohl(final.imm_data) == 7


def test_qp_attributes_for_roce_and_infiniband():
    pytest.importorskip("pyverbs")
    import pyverbs.libibverbs_enums as e

    from fsdp_sync.transport.rdma_verbs import qp_attr

    options = RdmaOptions(traffic_class=106, service_level=3, qp_timeout=18, retry_count=6)
    remote = QpEndpoint(qpn=0x1234, psn=77, lid=9, gid="0000:0000:0000:0000:0000:ffff:0a00:0002", mtu=e.IBV_MTU_1024)
    roce = NicPort(device="mlx5_0", port=1, active=True, link_layer="Ethernet", lid=0, gid_index=3,
                   gid="0000:0000:0000:0000:0000:ffff:0a00:0001", mtu=e.IBV_MTU_4096, max_msg_bytes=1 << 30,
                   max_qp_wr=1 << 15, numa_node=0, pci_path="")
    attr = qp_attr(roce, 55, remote, options)
    assert (attr.dest_qp_num, attr.rq_psn, attr.sq_psn, attr.path_mtu) == (0x1234, 77, 55, e.IBV_MTU_1024)
    assert (attr.timeout, attr.retry_cnt, attr.port_num) == (18, 6, 1)
    assert attr.qp_access_flags & e.IBV_ACCESS_REMOTE_WRITE
    ah = attr.ah_attr
    assert (ah.is_global, ah.dgid, ah.sgid_index, ah.traffic_class, ah.sl) == (1, remote.gid, 3, 106, 3)
    ib = NicPort(**{**roce.__dict__, "link_layer": "InfiniBand", "lid": 4, "gid_index": 0})
    ah = qp_attr(ib, 55, remote, options).ah_attr
    assert (ah.is_global, ah.dlid) == (0, 9)


# --- connection data through a real TCPStore ------------------------------------------------

def test_endpoints_meet_through_the_store(control):
    fp = "f00d"
    recv_ep = Endpoint(0, "mlx5_1:1@infer0", "InfiniBand", {0: QpEndpoint(11, 1, 5, "fe80::1", 5),
                                                            1: QpEndpoint(12, 2, 5, "fe80::1", 5)},
                       (Region(0x7000, 4096, 99, 0),), {"w": RemoteTensor(0x7100, (4, 8), 2)})
    got: dict = {}

    def receiver() -> None:
        publish(control, fp, RECV, recv_ep)
        got["senders"] = wait_endpoints(control, fp, SEND, [0, 1], timeout_s=scaled(5))
        control.set(connected_key(fp, 0), True)

    thread = threading.Thread(target=receiver)
    thread.start()
    for s in (0, 1):
        time.sleep(0.05)  # the receiver waits for senders that come late
        publish(control, fp, SEND, Endpoint(s, f"mlx5_0:1@train{s}", "InfiniBand", {0: QpEndpoint(20 + s, 3, 6, "fe80::2", 4)}))
    peers = wait_endpoints(control, fp, RECV, [0], timeout_s=scaled(5))
    thread.join(5)
    assert peers == {0: recv_ep}
    assert {s: e.qps[0].qpn for s, e in got["senders"].items()} == {0: 20, 1: 21}
    assert control.has(connected_key(fp, 0))


def test_a_peer_setup_error_stops_the_wait_at_once(control):
    report_setup_error(control, "fp1", RECV, 1, "registering 1 GiB failed")
    started = time.monotonic()
    with pytest.raises(SyncError, match="rdma receiver 1: registering 1 GiB failed"):
        wait_endpoints(control, "fp1", RECV, [0, 1], timeout_s=30)
    assert time.monotonic() - started < 5
    with pytest.raises(SyncTimeout, match=r"rdma senders \[3\] to publish"):
        wait_endpoints(control, "fp1", SEND, [3], timeout_s=0.2)
    assert endpoint_key("fp1", SEND, 3) == "rdma/fp1/send/3"


def test_open_push_finds_the_running_push(control):
    with pytest.raises(SyncError, match="no push"):
        open_push(control, 0, after=None)
    for seq in range(1, 8):
        control.set(push_key(seq), ("go", seq, "fp", 0, None, False))
    control.set(PUSH_LATEST, 7)
    for seq in (1, 2, 3):
        control.set(done_key(seq, 0), True)
    control.set(sender_error_key(4, 0), "failed")
    assert open_push(control, 0, after=None) == 5  # bisection over ended pushes
    assert open_push(control, 0, after=3) == 5  # push 4 failed before the transport saw its end
    assert open_push(control, 1, after=None) == 1
    control.set(done_key(5, 0), True)
    control.set(done_key(6, 0), True)
    control.set(done_key(7, 0), True)
    with pytest.raises(SyncError, match="push 8 was never announced"):
        open_push(control, 0, after=5)


def test_arrivals_unwrap_32_bit_push_numbers():
    assert unwrap_imm(imm_of(5), 5) == 5
    assert unwrap_imm(imm_of((1 << 32) + 3), (1 << 32) + 1) == (1 << 32) + 3
    assert unwrap_imm(imm_of((1 << 32) - 1), 1 << 32) == (1 << 32) - 1  # a late one, from before the wrap
    arrivals = Arrivals([0, 1])
    arrivals.record(0, imm_of(3), 4)  # late, from a push the receiver gave up on: does not count
    assert arrivals.missing(4) == [0, 1]
    arrivals.record(0, imm_of(5), 4)  # sender 0 already finished the next push too
    arrivals.record(1, imm_of(4), 4)
    assert arrivals.missing(4) == [] and arrivals.missing(5) == [1]


# --- discovery, options, memory --------------------------------------------------------------

def test_nearest_nic_follows_the_pci_tree_then_numa():
    gpu = "/sys/devices/pci0000:17/0000:17:00.0/0000:18:00.0/0000:19:04.0/0000:1b:00.0"
    nics = [("mlx5_0", "/sys/devices/pci0000:17/0000:17:00.0/0000:18:00.0/0000:19:00.0/0000:1a:00.0", 0),
            ("mlx5_1", "/sys/devices/pci0000:17/0000:17:00.0/0000:18:00.0/0000:19:08.0/0000:1c:00.0", 0),
            ("mlx5_2", "/sys/devices/pci0000:85/0000:85:00.0/0000:86:00.0", 1)]
    assert nearest_nic(gpu, 0, nics) in {"mlx5_0", "mlx5_1"}
    assert nearest_nic(gpu, 0, nics[1:]) == "mlx5_1"
    assert nearest_nic("", 1, nics) == "mlx5_2"  # no path known: same NUMA node
    assert nearest_nic("", -1, nics) == "mlx5_0"  # nothing known: the first name, on every process alike


def test_gid_choice_prefers_routable_roce_v2():
    zero = "0000:0000:0000:0000:0000:0000:0000:0000"
    link_local = "fe80:0000:0000:0000:0202:c9ff:fe00:0001"
    ipv4 = "0000:0000:0000:0000:0000:ffff:0a00:0001"
    entries = [(0, link_local, "RoCE v1"), (1, link_local, "RoCE v2"), (2, ipv4, "RoCE v1"), (3, ipv4, "RoCE v2"),
               (4, zero, "RoCE v2")]
    assert choose_gid(entries, "Ethernet", None) == (3, ipv4)
    assert choose_gid(entries[:2], "Ethernet", None) == (1, link_local)
    assert choose_gid([(0, link_local, "IB")], "InfiniBand", None) == (0, link_local)
    assert choose_gid(entries, "Ethernet", 2) == (2, ipv4)
    with pytest.raises(ValueError, match="GID_INDEX=9"):
        choose_gid(entries, "Ethernet", 9)
    with pytest.raises(SyncError, match="no valid GID"):
        choose_gid([(0, zero, "RoCE v2")], "Ethernet", None)


def test_options_from_environment():
    opts = RdmaOptions.from_env({"FSDP_SYNC_RDMA_DEVICES": "mlx5_0:1, mlx5_1", "FSDP_SYNC_RDMA_SIGNAL_EVERY": "8",
                                 "FSDP_SYNC_RDMA_MAX_OUTSTANDING": "64", "FSDP_SYNC_RDMA_GPU_REG": "peermem",
                                 "FSDP_SYNC_RDMA_MAX_WR_MB": "0.5"})
    assert opts.devices == ("mlx5_0:1", "mlx5_1") and opts.signal_every == 8 and opts.max_wr_bytes == 1 << 19
    assert RdmaOptions.from_env({}) == RdmaOptions()
    assert parse_device("mlx5_3:2", name="x") == ("mlx5_3", 2)
    for env, match in [({"FSDP_SYNC_RDMA_SIGNAL_EVERY": "zero"}, "SIGNAL_EVERY='zero' is not a int"),
                       ({"FSDP_SYNC_RDMA_SL": "16"}, "FSDP_SYNC_RDMA_SL='16' must be in"),
                       ({"FSDP_SYNC_RDMA_DEVICES": "mlx5_0:x"}, "device:port"),
                       ({"FSDP_SYNC_RDMA_GPU_REG": "gdr"}, "GPU_REG='gdr'"),
                       ({"FSDP_SYNC_RDMA_SIGNAL_EVERY": "64", "FSDP_SYNC_RDMA_MAX_OUTSTANDING": "8"}, ">= FSDP")]:
        with pytest.raises(ValueError, match=match):
            RdmaOptions.from_env(env)


def test_whole_allocations_are_registered_once():
    a = torch.zeros(1000, dtype=torch.uint8)
    views = {"x": a[:100].view(torch.bfloat16), "y": a[512:].view(torch.float32).view(61, 2)[:, :1].contiguous()}
    # A view shares its storage's segment; a copy is an allocation of its own.
    segs = segments_for([views["x"], a[200:300], views["y"], torch.empty(0)])
    assert [(s.base, s.length) for s in segs] == sorted([(a.data_ptr(), 1000), (views["y"].data_ptr(), 61 * 4)])
    with pytest.raises(ValueError, match=r"not contiguous: \['t'\]"):
        check_destinations({"t": torch.zeros(4, 4).t()})
    with pytest.raises(SyncError, match="no PyTorch caching-allocator segment"):
        containing(segs, 0x10, 8, torch.device("cpu"))
