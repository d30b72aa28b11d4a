import pytest
import torch

from fsdp_sync.boxes import Box, check_exact_cover


def test_intersect_and_relative_view():
    a = Box((0, 0), (4, 6))
    b = Box((2, 3), (5, 5))
    assert a.intersect(b) == Box((2, 3), (2, 3))
    assert a.intersect(Box((4, 0), (1, 1))) is None
    t = torch.arange(24).view(4, 6)
    assert torch.equal(Box((2, 3), (2, 3)).relative_to(Box((2, 0), (2, 6))).view(t[2:]), t[2:4, 3:6])


def test_blocks_touched_and_owned():
    # Rows 100..300 of a tensor touch row blocks 0..2 of 128.
    assert Box((100, 0), (200, 256)).to_blocks((128, 128)) == Box((0, 0), (3, 2))
    piece = Box((0, 0), (300, 256))
    parts = [Box((0, 0), (100, 256)), Box((100, 0), (100, 256)), Box((200, 0), (100, 256))]
    owned = [p.owned_blocks(piece, (128, 128)) for p in parts]
    # Block rows 0, 1 and 2 start at rows 0, 128 and 256: owned by parts 0, 1 and 2.
    assert owned == [Box((0, 0), (1, 2)), Box((1, 0), (1, 2)), Box((2, 0), (1, 2))]


def test_owned_blocks_of_a_piece_that_starts_mid_block():
    # A row-parallel slice [64, 128) of a rowwise tensor shares the single column block.
    piece = Box((0, 64), (4, 64))
    assert Box((0, 64), (2, 64)).owned_blocks(piece, (1, 128)) == Box((0, 0), (2, 1))


def test_exact_cover_detects_gap_overlap_and_bounds():
    shape = (4, 4)
    halves = [Box((0, 0), (2, 4)), Box((2, 0), (2, 4))]
    assert check_exact_cover(halves, shape) is None
    assert "overlap" in check_exact_cover(halves + [Box((1, 1), (1, 1))], shape)
    assert "cover 8 of 16" in check_exact_cover(halves[:1], shape)
    assert "outside" in check_exact_cover([Box((0, 0), (5, 4))], shape)


def test_exact_cover_of_row_ranges_and_scalars():
    rows = [Box((0, 0), (3, 4)), Box((3, 0), (1, 4))]
    assert check_exact_cover(rows, (4, 4)) is None
    assert "overlap" in check_exact_cover([Box((0, 0), (3, 4)), Box((2, 0), (2, 4))], (4, 4))
    assert check_exact_cover([Box((), ())], ()) is None
    assert "overlap" in check_exact_cover([Box((), ()), Box((), ())], ())


def test_bad_box():
    with pytest.raises(ValueError, match="sizes must be"):
        Box((0,), (-1,))
