"""Identity layout: each receiver holds every parameter whole, under its HF name."""

from __future__ import annotations

from ..boxes import Box
from ..meta import SourceParam
from .base import Piece


class IdentityLayout:
    def pieces(self, src: SourceParam) -> list[Piece]:
        full = Box.full(src.shape)
        return [Piece(src.name, full, src.name, full)]
