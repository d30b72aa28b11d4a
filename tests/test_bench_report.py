"""recipes.bench's table: fsdp_sync's rows are reported even when a baseline could not run."""

from recipes.bench import _print_case, row_line


def _report(baselines: dict) -> dict:
    row = dict(quant="fp8_block", mode="direct", transport="cuda_ipc", bytes=10**9, floor_s=0.004,
               times_s=[0.006, 0.005, 0.0055], peak_extra_bytes=0, watermark_bytes=2**30)
    return dict(case="b", about="colocated", model="m", ceilings={"peer_copy_gbps": 390.0}, rows=[row],
                baselines=baselines)


def test_rows_with_and_without_baselines(capsys):
    measured = _report({"fp8_block/funnel": [0.11, 0.1], "fp8_block/allgather_broadcast": [0.05]})
    _print_case(measured)
    row = measured["rows"][0]
    assert row["median_s"] == 0.0055 and abs(row["ratio"] - 1.375) < 1e-9
    assert abs(row["speedup_funnel"] - 0.105 / 0.0055) < 1e-9 and abs(row["speedup_allgather_broadcast"] - 0.05 / 0.0055) < 1e-9

    failed = _report({})  # the baselines ran out of memory: fsdp_sync's figures still print
    _print_case(failed)
    out = capsys.readouterr().out
    assert out.count("n/a") == 2 and "5.50" in out
    assert "speedup_funnel" not in failed["rows"][0] and failed["rows"][0]["ratio"] > 1


def test_a_timed_row_prints_on_one_line():
    line = row_line("c", _report({})["rows"][0])
    assert line.startswith("measured case c fp8_block direct cuda_ipc: median 5.50 ms")
    assert "ratio 1.38" in line and "floor 4.00 ms" in line and "3 pushes" in line and "\n" not in line
