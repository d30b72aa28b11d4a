"""Where staged FP8 payloads live: a fixed place per task, per plan, in alternating slots."""

from __future__ import annotations

import torch
from torch.distributed.tensor import Shard

from fsdp_sync.plan import DATA
from fsdp_sync.staging import ALIGN, StagingSlots
from tests.planner_fixtures import llama_like_shapes, plan, receivers_for, sources_on


def _sender_plan():
    sources = sources_on(llama_like_shapes(3, 256, 512, 128, 1000), [0, 1], [Shard(0)])
    receivers = receivers_for(sources, num_replicas=2, tp=2, quant="fp8_block")
    return plan(sources, receivers, watermark_bytes=1 << 20).for_sender(0)


def test_each_staged_task_has_its_own_aligned_place_in_its_buckets_slot():
    sender = _sender_plan()
    tasks_of: dict[int, list] = {}
    for t in sender.tasks:
        tasks_of.setdefault(t.bucket, []).append(t)
    staged = lambda t: t.kind == DATA and t.fmt != "none"  # noqa: E731
    slots = StagingSlots(sender.buckets, tasks_of, staged, torch.device("cpu"), count=2)
    assert len(sender.buckets) >= 3
    base = slots._buffer.data_ptr()
    for position, bucket in enumerate(sender.buckets):
        spans = []
        for task in tasks_of[bucket.index]:
            view = slots.target(task, task.src_box.sizes)
            if not staged(task):
                assert view is None
                continue
            start = view.data_ptr() - base
            assert view.dtype == torch.float8_e4m3fn and tuple(view.shape) == task.src_box.sizes
            assert start % ALIGN == 0 and start // slots.capacity == position % 2  # the i-th bucket: slot i mod 2
            spans.append((start, start + view.numel()))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "payloads of one bucket overlap"
        assert all(end <= (position % 2 + 1) * slots.capacity for _, end in spans)
    largest = max(sum(-(-t.src_box.numel() // ALIGN) * ALIGN for t in tasks_of[b.index] if staged(t))
                  for b in sender.buckets)
    assert slots.capacity == largest and slots.nbytes == 2 * largest


def test_a_plan_with_nothing_staged_allocates_nothing():
    sender = _sender_plan()
    tasks_of: dict[int, list] = {}
    for t in sender.tasks:
        tasks_of.setdefault(t.bucket, []).append(t)
    slots = StagingSlots(sender.buckets, tasks_of, lambda t: False, torch.device("cpu"))
    assert slots.capacity == 0 and slots.nbytes == 0
    assert all(slots.target(t, t.src_box.sizes) is None for t in sender.tasks)
