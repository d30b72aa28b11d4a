"""The README's first command: the demo ends with its OK line, and says what it is doing from the start."""

import re
import subprocess
import sys

import pytest

from recipes import demo
from tests.timeouts import scaled


def test_demo_verifies_three_versions():
    out = subprocess.run([sys.executable, "-m", "recipes.demo", "--timeout", str(scaled(120))], capture_output=True,
                         text=True, timeout=scaled(300))
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    assert lines[-1] == "demo OK: 3 versions verified on 2 receivers"
    assert sum(line.startswith("push ") for line in lines) == 3
    # Progress goes through logging to stderr: first the processes it starts (before any of them
    # has imported torch), then each process as it comes up, then every step.
    progress = [line.split(" ", 1)[1] for line in out.stderr.splitlines() if re.match(r"\d\d:\d\d:\d\d demo: ", line)]
    assert progress[0].startswith("demo: starting 2 trainer and 2 receiver processes"), out.stderr
    assert progress[1].startswith("demo: trainer processes started, pids ")
    assert progress[2].startswith("demo: receiver processes started, pids ")
    for who in ("trainer 0/2", "trainer 1/2", "receiver 0/2", "receiver 1/2"):
        assert any(line.startswith(f"demo: {who} up ") for line in progress[3:]), (who, progress)
    for step in (1, 2, 3):
        assert f"demo: trainer step {step}/3 done, pushing version {step}" in progress
        assert f"demo: receiver version {step} landed" in progress


@pytest.mark.parametrize("flag, bad", [("--quant", "fp9"), ("--mode", "sideways"), ("--transport", "nccl")])
def test_bad_choices_are_usage_errors(flag, bad, capsys):
    with pytest.raises(SystemExit) as exit:
        demo.main([flag, bad])
    assert exit.value.code == 2
    assert f"argument {flag}: invalid choice: '{bad}'" in capsys.readouterr().err
