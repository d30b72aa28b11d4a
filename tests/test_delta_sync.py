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
    """none / fp8_block / fp8_rowwise; direct and reconstruct; FSDP to TP=1 and TP=2; shm and gloo;
    in place and staged; auto and on."""
    cases = [
        _case("none-gloo-tp2", quant="none", mode="direct", transport="gloo", tp=2, dtype=torch.bfloat16, lr=3e-5,
              delta="on"),
        _case("block-shm-staged", quant="fp8_block", mode="reconstruct", transport="shm", commit="staged"),
        _case("row-gloo-tp2", quant="fp8_rowwise", mode="direct", transport="gloo", tp=2),
        _case("block-gloo", quant="fp8_block", mode="direct", transport="gloo", lr=1e-6, delta="on"),
        _case("none-shm-tp2", quant="none", mode="reconstruct", transport="shm", tp=2, dtype=torch.bfloat16,
              lr=3e-5),
    ]
    out = _run(cases, num_receivers=2)
    for case in cases:
        _identical(out, case, 2)
        report = out[("trainer", 0, case.name, "report")]
        assert [base for _, base, *_ in report] == [None] + list(range(1, case.versions)), case.name
        sent, whole = sum(r[2] for r in report[5:]), sum(r[3] for r in report[5:])
        assert sent < whole, f"{case.name}: a delta sent {sent} bytes against {whole} in full"
        assert report[-1][5] > 0  # the shadow's size is reported
