"""Test deadlines that hold on a loaded machine.

Every wait a test places on its own processes (a push's `timeout_s`, a job's deadline, a
subprocess limit) goes through ``scaled``: on a busy 2-core CI machine, starting four
Python processes with torch can take tens of seconds, and a deadline tuned on a quiet
machine then fails a correct test. ``FSDP_SYNC_TEST_TIMEOUT_SCALE`` sets the factor; it
defaults to 4 under CI (``CI`` set) and 2 elsewhere. Waits that are *meant* to expire
(a test of the timeout itself with no peer) are not scaled: they cost their full length.
"""

from __future__ import annotations

import os


def timeout_scale() -> float:
    """The factor every test deadline is multiplied by (read each call: spawned workers inherit it)."""
    value = os.environ.get("FSDP_SYNC_TEST_TIMEOUT_SCALE")
    if value is None:
        return 4.0 if os.environ.get("CI") else 2.0
    scale = float(value)
    if scale <= 0:
        raise ValueError(f"FSDP_SYNC_TEST_TIMEOUT_SCALE must be > 0, got {value!r}")
    return scale


def scaled(seconds: float) -> float:
    """``seconds`` stretched by the machine's load factor."""
    return seconds * timeout_scale()
