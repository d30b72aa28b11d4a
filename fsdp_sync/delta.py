"""Delta push, per push: diff each packed payload against the sender's shadow and emit the change.

The sender keeps, per task, the bytes it last sent (its shadow, on its own device). A full
("anchor") push refreshes the shadows; a delta push runs the delta pass per payload
(``fsdp_sync.kernels.delta``): one-sided transports get the changed elements stored into
the destination and the payload replaced by None, two-sided ones get an ``Encoded`` body
per task for the receiver to ``apply``. Per-task programs come from ``fsdp_sync.delta_plan``.

A delta is only correct on top of the exact bytes the shadow holds; the controller
decides which pushes may be deltas and the receiver refuses one whose base it does not hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .delta_plan import BITMAP, DENSE, POSITIONS, HEADER_BYTES, BITS_DTYPES, DeltaProgram, lower
from .plan import DATA, Task

_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.uint8)
MASK_BATCH_BYTES = 64 << 20  # two-sided change masks waiting for their counts, at most (then one more sync)


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as integers of the same size: compared and moved as bytes."""
    return t.view(BITS_DTYPES[t.element_size()])


@dataclass(slots=True)
class Encoded:
    """One task's change for a two-sided transport: a header, then ``body``."""

    encoding: int
    count: int
    body: torch.Tensor  # uint8

    def header(self) -> torch.Tensor:
        return torch.tensor([self.encoding, self.count], dtype=torch.int64)


@dataclass
class DeltaStats:
    """What one push moved, on this rank."""

    bytes_sent: int = 0
    full_bytes: int = 0
    changed: int = 0  # changed elements of weight (not scale) payloads
    elements: int = 0  # elements of weight payloads
    digests: dict[str, int] = field(default_factory=dict)  # "receiver/task seq" -> digest, on verified pushes


def _pass(device: torch.device, kernels: str):
    """The delta pass: Triton on GPU (or forced, e.g. under TRITON_INTERPRET=1), else the torch
    reference; the same bits either way. Imported here: the reference path needs no Triton."""
    if kernels == "reference" or (kernels == "auto" and device.type != "cuda"):
        return None
    from .kernels.delta import delta_update

    return delta_update


class DeltaSender:
    """The shadows of one sender's tasks, and the per-push pass over its packed buckets."""

    def __init__(self, tasks: list[Task], device: torch.device, *, mode: str, one_sided: bool,
                 kernels: str = "auto", pinned: bool = False):
        """``pinned``: shadows in pinned host memory (a GPU sender's pass reads them over PCIe)."""
        self.pinned = pinned and device.type == "cuda"
        self.mode = mode
        self.one_sided = one_sided
        self.programs = {id(t): p for t, p in zip(tasks, lower(tasks, one_sided=one_sided))}
        self.shadows: dict[int, torch.Tensor] = {}
        self._kernel = _pass(device, kernels)

    @property
    def shadow_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.shadows.values())

    def encode(self, items: list[tuple[Task, torch.Tensor]], *, delta: bool, stats: DeltaStats,
               destination=None, verify: bool = False) -> list[tuple[Task, object]]:
        """The items to hand the transport: the payloads themselves on an anchor push (the
        shadows take a copy), their changes on a delta push. ``destination(task)``: the
        one-sided transport's view of the task's destination. A None payload is a task the
        packer stored itself (``fsdp_sync.delta_stores``), which counts its own bytes.

        A delta push runs every task's pass first and reads all their change counts at once
        (one device sync for the bucket where it was one per task); two-sided bodies are then
        built knowing their sizes. Some passes still wait on the device themselves: a pinned
        shadow's round trip, a strided or host destination's scatter or copy. Two-sided, each
        task's change mask (a byte an element) waits until the counts are read, so they are
        read once ``MASK_BATCH_BYTES`` of masks wait, and at the bucket's end."""
        out: list = []
        passes = []  # (index in out, task, program, new, mask, count tensor, whether out was written whole)
        held = 0  # bytes of the masks in ``passes``
        for task, payload in items:
            program = self.programs[id(task)]
            stats.full_bytes += task.nbytes
            if payload is None:
                stats.elements += program.numel if task.kind == DATA else 0
                out.append((task, None))
                continue
            new = bits(payload.contiguous())
            if verify:
                stats.digests[f"{task.receiver}/{task.seq}"] = digest(new)
            shadow = self.shadows.get(id(task))
            if delta and shadow is not None:
                if self.one_sided and program.dense:  # a scale grid: stored whole, like a full push
                    shadow.copy_(new.view(-1))
                    bits(destination(task)).copy_(new.view(task.dst_box.sizes))
                    stats.bytes_sent += task.nbytes
                    out.append((task, None))
                    continue
                dst = bits(destination(task)) if self.one_sided else None
                flat = new.view(-1)
                mask, count, whole = self._update(
                    flat, shadow, dst.view(-1) if dst is not None and dst.is_contiguous() else dst)
                # One-sided, the pass stored the change already: only its count is kept for later.
                passes.append((len(out), task, program, flat, None if self.one_sided else mask, count, whole))
                out.append(None)  # filled in below, once the counts are read
                held += 0 if self.one_sided else mask.numel()
                if held > MASK_BATCH_BYTES:  # bound the masks waiting: read these counts now
                    self._emit_all(out, passes, stats)
                    passes, held = [], 0
                continue
            if shadow is None:
                shadow = self.shadows[id(task)] = empty_shadow((new.numel(),), new.dtype, new.device, self.pinned)
            shadow.copy_(new.view(-1))
            if task.kind == DATA:
                stats.elements += program.numel
                stats.changed += program.numel
            if delta and not self.one_sided:  # no shadow yet inside a delta push: this piece goes dense
                out.append((task, Encoded(DENSE, program.numel, new.view(torch.uint8).view(-1))))
                stats.bytes_sent += HEADER_BYTES + task.nbytes
            else:
                out.append((task, payload))
                stats.bytes_sent += task.nbytes
        self._emit_all(out, passes, stats)
        return out

    def _emit_all(self, out: list, passes: list, stats: DeltaStats) -> None:
        """Read the passes' counts in one device sync, then put their items in ``out``."""
        counts = torch.stack([p[5] for p in passes]).tolist() if passes else []
        for (at, task, program, new, mask, _, whole), count in zip(passes, counts):
            out[at] = (task, self._emit(task, program, new, mask, count, whole, stats))

    def _emit(self, task: Task, program: DeltaProgram, new: torch.Tensor, mask: torch.Tensor, count: int,
              whole: bool, stats: DeltaStats) -> object:
        """A delta task's item once its change count is known: None where the pass stored it
        (one-sided), else its encoded body; its bytes and changes counted."""
        if task.kind == DATA:
            stats.elements += program.numel
            stats.changed += count
        if self.one_sided:
            stats.bytes_sent += (program.numel if whole else count) * program.itemsize
            return None
        encoding = program.choose(count, self.mode)
        encoded = Encoded(encoding, count, encode_body(program, encoding, mask, new, count=count))
        stats.bytes_sent += HEADER_BYTES + encoded.body.numel()
        return encoded

    def _update(self, new: torch.Tensor, shadow: torch.Tensor, out: torch.Tensor | None):
        """The delta pass: (mask, count, whether ``out`` was written whole).

        A strided destination (a column slice) takes a scatter after the pass; one that torch
        would have to index on a peer GPU is written whole instead (correct, not smaller).
        """
        if shadow.device != new.device:  # pinned host shadow: the pass runs on a device copy
            here = shadow.to(new.device)
            result = self._update(new, here, out)
            shadow.copy_(here)
            return result
        delta_pass = self._kernel or delta_update_reference
        # The kernel stores into this GPU or a peer it can write, never into host memory.
        kernel_reaches = self._kernel is not None and out is not None and out.device.type == new.device.type
        if out is None or (out.dim() == 1 and (kernel_reaches or out.device == new.device)):
            return (*delta_pass(new, shadow, out), False)
        mask, count = delta_pass(new, shadow)
        if out.device != new.device:
            out.copy_(new.view(out.shape))
            return mask, count, True
        out[mask.view(out.shape)] = new[mask]
        return mask, count, False


def empty_shadow(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pinned: bool) -> torch.Tensor:
    """A shadow's memory (bytes unset): on ``device``, or pinned on the host
    (``SyncConfig.delta_shadow="pinned"``), where a GPU's kernels reach it over PCIe."""
    if pinned:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    return torch.empty(shape, dtype=dtype, device=device)


def delta_update_reference(new: torch.Tensor, shadow: torch.Tensor,
                           out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``fsdp_sync.kernels.delta.delta_update`` in plain torch: (change mask, int64 count);
    ``shadow`` and ``out`` (any strides) take the changed elements."""
    assert new.dtype == shadow.dtype and not new.dtype.is_floating_point, "compare integer views of the bits"
    mask = new != shadow
    changed = new[mask]
    shadow[mask] = changed
    if out is not None:
        out[mask] = changed
    return mask, mask.sum(dtype=torch.int64)


def encode_body(program: DeltaProgram, encoding: int, mask: torch.Tensor, new: torch.Tensor, *,
                count: int | None = None) -> torch.Tensor:
    """The uint8 body of ``encoding`` for the changed elements of ``new`` (flat bits).
    ``count``: how many changed, if known; then no step waits on the device for it."""
    if encoding == DENSE:
        return new.view(torch.uint8)
    if count is None:
        count = int(mask.sum())
    positions = torch.nonzero_static(mask.view(-1), size=count).view(-1)
    values = new[positions].view(torch.uint8)
    if encoding == POSITIONS:
        return torch.cat([positions.to(program.index_dtype).view(torch.uint8), values])
    assert encoding == BITMAP
    padded = torch.zeros(program.bitmap_nbytes * 8, dtype=torch.uint8, device=mask.device)
    padded[:mask.numel()] = mask
    packed = (padded.view(-1, 8) * _BIT_WEIGHTS.to(mask.device)).sum(1, dtype=torch.uint8)
    return torch.cat([packed, values])


def apply(program: DeltaProgram, encoded: Encoded, view: torch.Tensor) -> None:
    """Receiver: write ``encoded``'s elements into ``view`` (the task's destination box)."""
    target = view if view.is_contiguous() else view.contiguous()
    flat = bits(target).view(-1)
    body, count = encoded.body, encoded.count
    if encoded.encoding == DENSE:
        flat.copy_(body.view(program.bits_dtype))
    elif encoded.encoding == POSITIONS:
        split = count * program.index_dtype.itemsize
        flat[body[:split].view(program.index_dtype).long()] = body[split:].view(program.bits_dtype)
    elif encoded.encoding == BITMAP:
        split = program.bitmap_nbytes
        mask = ((body[:split, None] >> torch.arange(8, dtype=torch.uint8, device=body.device)) & 1).view(-1)
        flat[mask[:program.numel].bool()] = body[split:].view(program.bits_dtype)
    else:
        raise ValueError(f"unknown delta encoding {encoded.encoding}")
    if target is not view:
        view.copy_(target)


def digest(t: torch.Tensor) -> int:
    """A position-weighted sum of ``t``'s bits (mod 2^64), on its device: any one changed
    element changes it (odd weights), as does moving a value to another position."""
    x = bits(t.contiguous()).view(-1).to(torch.int64)
    weights = torch.arange(x.numel(), dtype=torch.int64, device=x.device) * 2 + 1
    return int((x * weights * 0x9E3779B1).sum() + x.sum() * 0x85EBCA77)
