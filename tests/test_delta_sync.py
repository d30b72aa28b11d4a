"""Delta push end to end on CPU: every delta receiver equals a full-push receiver at every version.

Real FSDP2 trainer ranks take real AdamW steps at RL learning rates between pushes, so
most bytes stay the same; a second sender over the same model pushes every version in
full to a second destination set. Anchors (full pushes) must follow a receiver that
does not hold the base, a re-registration and a failed verification.
"""

from __future__ import annotations

import torch

from tests.delta_workers import DeltaCase
from tests import delta_workers
from tests.harness import new_port, run_cases


def _case(name: str, **kw) -> DeltaCase:
    return DeltaCase(name=name, port=new_port(), full_port=new_port(), **kw)


def _run(cases: list[DeltaCase], *, num_receivers: int) -> dict:
    out = run_cases(cases, num_senders=2, num_receivers=num_receivers, workers=delta_workers, timeout_s=300)
    assert not [k for k in out if k[2] == "process"], {k: v for k, v in out.items() if k[2] == "process"}
    return out


def _identical(out: dict, case: DeltaCase, num_receivers: int, *, except_versions=()) -> None:
    for r in range(num_receivers):
        for version, held, error, differ in out[("receiver", r, case.name, "report")]:
            if version in except_versions and r == 0:
                continue
            assert error is None and held == version, (case.name, r, version, error)
            assert differ == [], f"{case.name}: receiver {r} differs from the full push at version {version}: {differ}"


def test_delta_equals_full_over_50_steps():
    """none (direct, gloo, TP=2, delta on), fp8_block (reconstruct, shm, staged, two replicas,
    auto), fp8_rowwise (reconstruct, gloo, TP=2, auto, an HSDP trainer); the anchor test below
    adds fp8_block direct over gloo and none over shm. Three cases: the suite's budget."""
    cases = [
        _case("none-gloo-tp2", quant="none", mode="direct", transport="gloo", tp=2, dtype=torch.bfloat16, lr=3e-5,
              delta="on"),
        _case("block-shm-staged", quant="fp8_block", mode="reconstruct", transport="shm", commit="staged"),
        _case("row-gloo-tp2-hsdp", quant="fp8_rowwise", mode="reconstruct", transport="gloo", tp=2, hsdp=True),
    ]
    out = _run(cases, num_receivers=2)
    for case in cases:
        _identical(out, case, 2)
        report = out[("trainer", 0, case.name, "report")]
        assert [base for _, base, *_ in report] == [None] + list(range(1, case.versions)), case.name
        sent, whole = sum(r[2] for r in report[5:]), sum(r[3] for r in report[5:])
        assert sent < whole, f"{case.name}: a delta sent {sent} bytes against {whole} in full"
        assert report[-1][5] > 0  # the shadow's size is reported


def test_anchor_after_a_refused_base_a_reregistration_and_a_failed_verification(monkeypatch):
    """Receiver 0 forgets which version its buffers hold before push 3 (it must refuse the
    delta: gated staged receivers before any byte lands, ungated gloo ones by draining it),
    restarts before push 5, and has a byte flipped behind the library's back before push 8,
    which verification catches. Each is followed by a full push that lands bit-exact.

    In the same jobs (one spawn for the suite's time), a third case diffs with the Triton kernel
    (CPU interpreter), storing changed elements straight into the receiver's shared memory as
    it would into a peer GPU over CUDA IPC, against a full job packed by the torch reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the spawned senders inherit it
    events = {3: "diverge", 5: "reregister", 8: "corrupt"}
    cases = [_case("anchors-gloo", quant="fp8_block", mode="direct", transport="gloo", lr=1e-6, versions=9,
                   events=events, verify_every=1),
             _case("anchors-shm-staged", quant="none", mode="direct", transport="shm", commit="staged",
                   dtype=torch.bfloat16, lr=3e-5, versions=9, events=events, verify_every=2)]
    # The packer's own stores find the change (fsdp_sync.delta_stores): bf16 weights through the
    # large-copy launch, TP column slices strided on both sides; FP8 codes through the cell launch,
    # with blocks the FSDP shards cut (two-pass) and whole ones (fused).
    tritons = [_case("triton-none-shm-tp2", quant="none", mode="direct", transport="shm", dtype=torch.bfloat16,
                     lr=3e-5, versions=3, kernels="grouped", tp=2),
               _case("triton-block-shm", quant="fp8_block", mode="direct", transport="shm", lr=1e-5, versions=3,
                     kernels="grouped")]
    out = _run(cases + tritons, num_receivers=1)
    for triton in tritons:
        _identical(out, triton, 1)
        report = out[("trainer", 0, triton.name, "report")]
        assert [r[1] for r in report] == [None, 1, 2]
        assert report[2][2] < report[2][3], (triton.name, report[2])  # fewer bytes than the full push
    for case in cases:
        _identical(out, case, 1, except_versions=(3, 8))
        report = {v: rest for v, *rest in out[("trainer", 0, case.name, "report")]}
        bases = {v: r[0] for v, r in report.items()}
        assert bases == {1: None, 2: 1, 3: "error", 4: None, 5: None, 6: 5, 7: 6, 8: "error", 9: None}, \
            (case.name, bases)
        got = {v: (held, error) for v, held, error, _ in out[("receiver", 0, case.name, "report")]}
        assert "is a delta on version 2, but the buffers it writes hold -1; refused" in got[3][1], got[3]
        assert "failed verification" in got[8][1] and "down_proj.weight" in got[8][1], got[8]
        assert "refused" in report[3][1] and "failed verification" in report[8][1], (report[3], report[8])
        # Staged: the live tensors keep the last good version through both failures. In place,
        # a drained delta leaves them at version 2; a failed verification leaves them torn.
        assert [got[v][0] for v in (3, 8)] == ([2, 7] if case.commit == "staged" else [2, None])

