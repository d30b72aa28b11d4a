"""The README's first command: the demo ends with its OK line."""

import subprocess
import sys

from tests.timeouts import scaled


def test_demo_verifies_three_versions():
    out = subprocess.run([sys.executable, "-m", "recipes.demo", "--timeout", str(scaled(120))], capture_output=True,
                         text=True, timeout=scaled(300))
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    assert lines[-1] == "demo OK: 3 versions verified on 2 receivers"
    assert sum(line.startswith("push ") for line in lines) == 3
