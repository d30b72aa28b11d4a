"""Bandwidth of the FP8 quantization kernels against a device-to-device copy.

    python -m recipes.bench_kernels [--sizes-mib 64 256 1024 2048] [--cols 8192]

For bf16 tensors of each size: check the kernel's values and scales against the
reference bit for bit, then time it with ``triton.testing.do_bench`` (warm-up, L2 flushed
between runs) and report (bytes read + written) / median time, the spread, and the ratio
to a torch copy of the same input, which is the ceiling a memory-bound kernel can reach.
Results go to ``bench_results/kernels-<gpu>-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

FORMATS = ("fp8_block", "fp8_rowwise", "fp8_tensor")


def _git_sha() -> str:
    """GIT_SHA if set (a copied checkout's .git may be stale), else the checkout's HEAD."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {1: torch.uint8, 4: torch.int32}[a.element_size()]
    return a.shape == b.shape and torch.equal(a.view(view), b.view(view))


def _time(fn: Callable[[], object]) -> dict[str, float]:
    """Milliseconds per call: median, min and max over the repetitions after warm-up."""
    import triton.testing

    times = triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="all")
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": len(times)}


def _row(
    name: str, size_mib: int, shape: tuple[int, ...], num_bytes: int, timing: dict, ceiling_gbps: float | None
) -> dict:
    """One result line, printed and returned; the ratio is to the copy's GB/s at this size."""
    gbps = num_bytes / (timing["median_ms"] * 1e-3) / 1e9
    row = {"kernel": name, "size_mib": size_mib, "shape": list(shape), "bytes": num_bytes, "gbps": gbps, **timing}
    if ceiling_gbps is not None:
        row["ratio_to_copy"] = gbps / ceiling_gbps
    ratio = f"{row['ratio_to_copy']:6.1%}" if ceiling_gbps is not None else "   --"
    print(
        f"{name:>22} {size_mib:>6} MiB {gbps:>9.1f} GB/s {ratio}  "
        f"median {timing['median_ms']:.3f} ms [{timing['min_ms']:.3f}, {timing['max_ms']:.3f}]",
        flush=True,
    )
    return row


def bench_size(size_mib: int, cols: int) -> list[dict]:
    """Copy ceiling, then each format checked against the reference and timed, on one bf16 input."""
    from fsdp_sync.boxes import Box
    from fsdp_sync.kernels import fp8_quant as K
    from fsdp_sync.quant import get_quant_format

    rows = size_mib * 2**20 // (2 * cols)
    shape = (rows, cols)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    x_bytes = x.numel() * x.element_size()

    copy_dst = torch.empty_like(x)
    copy = _row("copy (ceiling)", size_mib, shape, 2 * x_bytes, _time(lambda: copy_dst.copy_(x)), None)
    del copy_dst
    results = [copy]

    for fmt in FORMATS:
        q, scales = K.quantize_full(x, fmt)
        ref_q, ref_scales = K.reference_quantize(x, fmt)
        if not (_same_bits(q, ref_q) and _same_bits(scales, ref_scales)):
            raise SystemExit(f"{fmt} at {shape}: kernel differs from the reference; not timing it")
        del ref_q, ref_scales
        moved = x_bytes + q.numel() + scales.numel() * 4
        results.append(_row(fmt, size_mib, shape, moved, _time(lambda: K.quantize_full(x, fmt)), copy["gbps"]))

        if fmt == "fp8_block":
            # Direct mode's write: given scales, quantize straight into (a view of) the destination.
            box, block = Box.full(shape), get_quant_format(fmt).block_shape(shape)
            grid = box.to_blocks(block)
            out = torch.empty_like(q)
            K.quantize_box(x, box, scales, grid, block, out=out)
            if not _same_bits(out, q):
                raise SystemExit(f"quantize_box at {shape}: differs from quantize_full; not timing it")
            moved = x_bytes + q.numel() + scales.numel() * 4
            timing = _time(lambda: K.quantize_box(x, box, scales, grid, block, out=out))
            results.append(_row("fp8_block quantize_box", size_mib, shape, moved, timing, copy["gbps"]))
            results.append(_bench_grouped(x, q, scales, size_mib, copy["gbps"]))
            results.append(_bench_grouped_delta(x, q, scales, 0.003, size_mib, copy["gbps"]))
            results.append(_bench_delta("delta fp8 codes 0.3%", q.view(torch.uint8), 0.003, size_mib, copy["gbps"]))
            results.append(_bench_delta("delta bf16 4%", x.view(torch.int16), 0.04, size_mib, copy["gbps"]))
            if torch.cuda.device_count() > 1:
                results += _bench_into_peer(x, q, scales, size_mib)
        del q, scales
    return results


def _bench_delta(name: str, new: torch.Tensor, fraction: float, size_mib: int, copy_gbps: float) -> dict:
    """The delta pass on a payload whose shadow differs in ``fraction`` of its elements: checked
    against the torch reference, then timed. Repeats find the shadow already updated, so the
    bytes counted are the two reads and the change mask's write (the changed elements' writes,
    ``fraction`` of the payload, are in the checked call only)."""
    from fsdp_sync.kernels.delta import delta_update, delta_update_reference

    flat = new.reshape(-1)
    old = flat.clone()
    moved = torch.rand(flat.numel(), device=flat.device) < fraction
    old[moved] ^= 1  # flip the low bit: a change in the bits, as a small update makes
    shadow, ref_shadow = old.clone(), old.clone()
    mask, count = delta_update(flat, shadow)
    ref_mask, ref_count = delta_update_reference(flat, ref_shadow)
    if not (torch.equal(mask, ref_mask) and int(count) == int(ref_count) and torch.equal(shadow, ref_shadow)):
        raise SystemExit(f"{name}: the delta kernel differs from its reference; not timing it")
    del ref_shadow, ref_mask, old
    moved_bytes = 2 * flat.numel() * flat.element_size() + flat.numel()
    return _row(name, size_mib, tuple(new.shape), moved_bytes, _time(lambda: delta_update(flat, shadow)), copy_gbps)


def _bucket_of_32(x: torch.Tensor) -> tuple[list[tuple[int, int]], list[torch.Tensor], list[torch.Tensor]]:
    """``x`` cut into 32 tensors of whole 128-row blocks, as a push's bucket holds them:
    (first row, rows) of each, the tensors, and a float32 scale grid for each."""
    rows, cols = x.shape
    step = max(128, rows // 32 // 128 * 128)
    parts = [(r, min(step, rows - r)) for r in range(0, rows, step)]
    tensors = [x[r:r + n].clone() for r, n in parts]
    grids = [torch.empty(-(-n // 128), -(-cols // 128), device=x.device) for _, n in parts]
    return parts, tensors, grids


def _bench_grouped(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, size_mib: int, copy_gbps: float) -> dict:
    """A push's launch: ``x`` cut into 32 tensors of whole 128-row blocks, scales and FP8
    of all of them from one fused grouped launch, its table built once and replayed (the
    kernel alone: until 2672e6e the time included building the table, every call)."""
    from fsdp_sync.boxes import Box
    from fsdp_sync.kernels.fp8_grouped import GroupedCells

    parts, tensors, grids = _bucket_of_32(x)
    outs = [torch.empty(t.shape, dtype=q.dtype, device=x.device) for t in tensors]

    group = GroupedCells(x.device, quantize=True, fused=True)
    for t, out, grid in zip(tensors, outs, grids):
        group.add(t, Box.full(t.shape), (128, 128), grid, out=out, shape=t.shape)
    prepared = group.freeze()  # built once, as a push records a bucket's launches and replays them
    prepared.launch()
    if not (_same_bits(torch.cat(outs), q) and _same_bits(torch.cat(grids), scales)):
        raise SystemExit(f"grouped fused launch at {tuple(x.shape)}: differs from quantize_full; not timing it")
    moved = x.numel() * x.element_size() + q.numel() + scales.numel() * 4
    name = f"fp8_block grouped x{len(parts)}"
    return _row(name, size_mib, tuple(x.shape), moved, _time(prepared.launch), copy_gbps)


def _bench_grouped_delta(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, fraction: float, size_mib: int,
                         copy_gbps: float) -> dict:
    """A delta push's launch (one-sided): as ``_bench_grouped``, each cell also compared with
    the shadow of the codes the receiver holds, and only the codes that differ stored, into
    the destination and the shadow. The checked call finds ``fraction`` of the codes changed;
    the timed repeats find none (the shadow is up to date), so the bytes counted are the
    bf16 read, the shadow's read and the scales' write."""
    from fsdp_sync.boxes import Box
    from fsdp_sync.kernels.fp8_grouped import GroupedCells

    parts, tensors, grids = _bucket_of_32(x)
    old = q.view(torch.uint8).clone()
    flipped = torch.rand(old.shape, device=x.device) < fraction
    old[flipped] ^= 1
    shadows = [old[r:r + n].clone().view(q.dtype) for r, n in parts]
    outs = [old[r:r + n].clone().view(q.dtype) for r, n in parts]  # the receiver holds the old codes
    changed = torch.zeros(64, dtype=torch.int64, device=x.device)
    anchor = torch.zeros(1, dtype=torch.int32, device=x.device)

    group = GroupedCells(x.device, quantize=True, fused=True, delta=(changed, anchor))
    for t, out, grid, shadow in zip(tensors, outs, grids, shadows):
        group.add(t, Box.full(t.shape), (128, 128), grid, out=out, shape=t.shape, shadow=shadow)
    prepared = group.freeze()
    prepared.launch()
    if not (_same_bits(torch.cat(outs), q) and _same_bits(torch.cat(shadows), q)
            and _same_bits(torch.cat(grids), scales) and int(changed.sum()) == int(flipped.sum())):
        raise SystemExit(f"grouped delta launch at {tuple(x.shape)}: differs from quantize_full or miscounts; "
                         "not timing it")
    moved = x.numel() * x.element_size() + q.numel() + scales.numel() * 4
    name = f"fp8_block grouped delta x{len(parts)}"
    return _row(name, size_mib, tuple(x.shape), moved, _time(prepared.launch), copy_gbps)


def _bench_into_peer(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, size_mib: int) -> list[dict]:
    """Direct writes over NVLink: the copy engine moving the FP8 bytes to GPU1 (the link's
    ceiling), against the quantize kernels storing them there from their registers. The
    ratio is to that peer copy; bytes are what crosses the link."""
    from fsdp_sync.boxes import Box
    from fsdp_sync.kernels import fp8_quant as K
    from fsdp_sync.kernels.fp8_grouped import GroupedCells

    peer = torch.device("cuda", 1)
    out = torch.empty(q.shape, dtype=q.dtype, device=peer)
    peer_scales = torch.empty(scales.shape, device=peer)
    shape = tuple(x.shape)
    moved = q.numel() + scales.numel() * 4
    link = _row("fp8 bytes peer copy (link)", size_mib, shape, moved, _time(lambda: out.copy_(q, non_blocking=True)),
                None)
    box, grid = Box.full(shape), Box.full(tuple(scales.shape))
    K.quantize_box(x, box, scales, grid, (128, 128), out=out)
    if not _same_bits(out.cpu(), q.cpu()):
        raise SystemExit("quantize_box into a peer: differs from quantize_full; not timing it")
    per_box = _row("fp8_block quantize_box -> peer", size_mib, shape, moved,
                   _time(lambda: K.quantize_box(x, box, scales, grid, (128, 128), out=out)), link["gbps"])

    def fused() -> None:
        group = GroupedCells(x.device, quantize=True, fused=True)
        group.add(x, box, (128, 128), peer_scales, out=out, shape=shape)
        group.launch()

    fused()
    if not (_same_bits(out.cpu(), q.cpu()) and _same_bits(peer_scales.cpu(), scales.cpu())):
        raise SystemExit("fused grouped launch into a peer: differs from quantize_full; not timing it")
    grouped = _row("fp8_block grouped fused -> peer", size_mib, shape, moved, _time(fused), link["gbps"])
    return [link, per_box, grouped]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 256, 1024, 2048], help="bf16 input sizes")
    parser.add_argument("--cols", type=int, default=8192, help="columns of every input (rows follow from the size)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench_results"))
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU and none is visible; nothing was measured")
    import triton  # only now: without a GPU the message above beats an import error


    gpu = torch.cuda.get_device_name()
    env = {
        "gpu": gpu,
        "num_sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "num_gpus": torch.cuda.device_count(),  # the kernels run on cuda:0 only
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_sha": _git_sha(),
        "timestamp": time.strftime("%Y%m%dT%H%M%S"),
        "metric": "(bytes read + bytes written, each tensor counted once) / median time",
    }
    print(" ".join(f"{k}={v}" for k, v in env.items() if k != "metric"), flush=True)

    results = []
    for size_mib in args.sizes_mib:
        results += bench_size(size_mib, args.cols)
        torch.cuda.empty_cache()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"kernels-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}-{env['timestamp']}.json"
    path.write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
