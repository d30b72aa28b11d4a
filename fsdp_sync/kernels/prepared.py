"""Kernel launches prepared once (tables built and on the device) and run again every push."""

from __future__ import annotations

import contextlib

import torch


class PreparedLaunch:
    """``launch()`` runs the recorded kernel launches on the current stream, as often as
    needed. Holds every tensor their tables point into, so that memory cannot be reused
    while this lives; the values there are read at each launch."""

    def __init__(self, device: torch.device, launches: list[tuple], alive: list[torch.Tensor]):
        """``launches``: (jitted kernel, grid, positional args, keyword args) each."""
        self.device = device
        self._launches = launches
        self._alive = alive

    def launch(self) -> None:
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            for kernel, grid, args, kwargs in self._launches:
                kernel[grid](*args, **kwargs)
