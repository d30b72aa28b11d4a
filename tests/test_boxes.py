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



def test_exact_cover_refuses_row_ranges_that_do_not_tile():
    """Row ranges take the quick proof; every way of breaking it still gets the general message."""
    shape = (8, 4)
    rows = [Box((4, 0), (4, 4)), Box((0, 0), (4, 4))]
    assert check_exact_cover(rows, shape) is None
    assert check_exact_cover(rows + [Box((2, 0), (0, 4))], shape) is None  # an empty box in bounds
    assert check_exact_cover([Box((0, 0), (3, 0))], (8, 0)) is None  # nothing to cover
    assert check_exact_cover([Box((0, 0), (4, 4)), Box((4, 0), (4, 4)), Box((0, 0), (8, 4))],
                             shape) == "Box[0:4, 0:4] and Box[0:8, 0:4] overlap"
    assert check_exact_cover([Box((0, 0), (4, 4)), Box((3, 0), (5, 4))], shape) == \
        "Box[0:4, 0:4] and Box[3:8, 0:4] overlap"
    assert check_exact_cover(rows[:1], shape) == "boxes cover 16 of 32 elements"
    assert check_exact_cover(rows + [Box((9, 0), (0, 4))], shape) == "Box[9:9, 0:4] is outside the tensor bounds (8, 4)"
    assert check_exact_cover([Box((0, 0), (4, 4)), Box((4, 0), (5, 4))], shape) == \
        "Box[4:9, 0:4] is outside the tensor bounds (8, 4)"

def test_bad_box():
    with pytest.raises(ValueError, match="sizes must be"):
        Box((0,), (-1,))


def test_minus_covers_exactly_the_rest():
    import itertools

    outer = Box((2, 3), (10, 8))
    for inner in [Box((4, 5), (3, 2)), Box((0, 0), (5, 20)), Box((2, 3), (10, 8)), Box((20, 20), (1, 1)),
                  Box((5, 3), (2, 8))]:
        parts = outer.minus(inner)
        cells = {c for p in parts for c in itertools.product(*(range(o, o + n) for o, n in zip(p.offsets, p.sizes)))}
        want = {c for c in itertools.product(range(2, 12), range(3, 11))
                if not inner.contains(Box(c, (1, 1)))}
        assert cells == want, inner
        assert sum(p.numel() for p in parts) == len(want), "the parts overlap"


def test_whole_blocks_keeps_aligned_blocks_and_the_tensor_edge():
    shape = (300, 260)
    assert Box((37, 0), (263, 260)).whole_blocks((128, 128), shape) == Box((128, 0), (172, 260))
    assert Box((37, 0), (200, 260)).whole_blocks((128, 128), shape) is None  # rows 128:237 cut a block
    assert Box((0, 0), (100, 260)).whole_blocks((128, 128), shape) is None  # ends mid-block
    assert Box((256, 128), (44, 132)).whole_blocks((128, 128), shape) == Box((256, 128), (44, 132))
    assert Box((1, 20, 0), (1, 100, 130)).whole_blocks((1, 128, 128), (2, 150, 130)) is None
    assert Box((1, 0, 0), (1, 150, 130)).whole_blocks((1, 128, 128), (2, 150, 130)) == Box((1, 0, 0), (1, 150, 130))
