"""fusedopt_ewma (C ABI, through ctypes) refuses an out that overlaps x: the extents, from the
first element to the last of each layout, may not share a byte. A refused call returns
FUSEDOPT_STATUS_VALUE_ERROR naming x and out and writes nothing; disjoint parts of one buffer,
strides of 0 and empty blocks work."""

from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

import fusedopt
from conftest import checksum
from fusedopt import reference

LIBRARY = fusedopt.get_cmake_dir().parent.parent / "libfusedopt.so"

pytestmark = pytest.mark.skipif(
    not LIBRARY.is_file(), reason=f"no {LIBRARY.name} in the installed package (not Linux?)"
)

OK, VALUE_ERROR = 0, 2
COM = 1.5


class EwmaOptions(ctypes.Structure):
    _fields_ = [
        ("com", ctypes.c_double),
        ("adjust", ctypes.c_int32),
        ("ignore_na", ctypes.c_int32),
        ("min_periods", ctypes.c_int64),
    ]


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    library = ctypes.CDLL(str(LIBRARY))
    library.fusedopt_last_error.restype = ctypes.c_char_p
    return library


def ewma_in(lib, buffer: np.ndarray, x_at: int, out_at: int, layout: tuple) -> int:
    """fusedopt_ewma with x and out at element offsets x_at and out_at of one float64 buffer;
    layout is (length, num_series, time_stride, series_stride)."""
    base = buffer.ctypes.data
    return lib.fusedopt_ewma(
        ctypes.c_void_p(base + 8 * x_at), ctypes.c_void_p(base + 8 * out_at),
        *(ctypes.c_int64(v) for v in layout), ctypes.byref(EwmaOptions(COM, 1, 0, 0)),
    )  # fmt: skip


def ewma_apart(lib, x: np.ndarray, layout: tuple) -> np.ndarray:
    """The same call with out in a buffer of its own: the result an overlap must not change."""
    out = np.zeros_like(x)
    status = lib.fusedopt_ewma(
        ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data),
        *(ctypes.c_int64(v) for v in layout), ctypes.byref(EwmaOptions(COM, 1, 0, 0)),
    )  # fmt: skip
    assert status == OK, lib.fusedopt_last_error()
    return out


def extent(layout: tuple) -> int:
    """Elements from the first to the last of a layout, both included."""
    length, num_series, time_stride, series_stride = layout
    return (length - 1) * time_stride + (num_series - 1) * series_stride + 1


CONTIGUOUS = (40, 3, 1, 40)  # three series one after another
SIDE_BY_SIDE = (40, 3, 3, 1)  # column s of a C-order (40, 3) block
REPEATED = (4, 3, 0, 1)  # time stride 0: every step reads (and writes) the same element


@pytest.mark.parametrize(
    "layout, x_at, out_at",
    [
        (CONTIGUOUS, 0, 0),  # out is x
        (CONTIGUOUS, 0, 1),  # out one element after x
        (CONTIGUOUS, 1, 0),  # out one element before x
        (CONTIGUOUS, 0, extent(CONTIGUOUS) - 1),  # out's first element is x's last
        (CONTIGUOUS, extent(CONTIGUOUS) - 1, 0),  # out's last element is x's first
        (SIDE_BY_SIDE, 0, 1),  # shifted by one series
        (REPEATED, 0, 2),  # stride 0: x spans 3 elements, out starts on its last
    ],
    ids=["same", "after", "before", "last-first", "first-last", "side-by-side", "stride-0"],
)
def test_overlapping_x_and_out_is_a_value_error_naming_both_and_writes_nothing(
    lib, layout: tuple, x_at: int, out_at: int
) -> None:
    buffer = np.random.default_rng(0).standard_normal(2 * extent(layout) + 2)
    before = checksum(buffer)
    assert ewma_in(lib, buffer, x_at, out_at, layout) == VALUE_ERROR
    message = lib.fusedopt_last_error().decode()
    assert re.search(r"\bx\b", message) and re.search(r"\bout\b", message), message
    assert "overlap" in message, message
    assert checksum(buffer) == before


def test_interleaved_series_that_share_no_element_are_refused_too(lib) -> None:
    """The check is on the extents: x in the even elements and out in the odd ones is refused,
    as fusedopt.h says (out must not overlap x)."""
    layout = (50, 1, 2, 1)
    buffer = np.random.default_rng(1).standard_normal(100)
    before = checksum(buffer)
    assert ewma_in(lib, buffer, 0, 1, layout) == VALUE_ERROR
    assert checksum(buffer) == before


@pytest.mark.parametrize("layout", [CONTIGUOUS, SIDE_BY_SIDE, REPEATED], ids=str)
@pytest.mark.parametrize("out_first", [False, True], ids=["x-then-out", "out-then-x"])
def test_x_and_out_side_by_side_in_one_buffer_work(lib, layout: tuple, out_first: bool) -> None:
    span = extent(layout)
    buffer = np.random.default_rng(2).standard_normal(2 * span)
    x_at, out_at = (span, 0) if out_first else (0, span)
    x = buffer[x_at : x_at + span].copy()
    expected = ewma_apart(lib, x, layout)
    assert ewma_in(lib, buffer, x_at, out_at, layout) == OK, lib.fusedopt_last_error()
    np.testing.assert_array_equal(buffer[x_at : x_at + span], x)  # x is read only
    np.testing.assert_array_equal(buffer[out_at : out_at + span], expected)


def test_contiguous_series_next_to_each_other_match_the_reference(lib) -> None:
    length, num_series = CONTIGUOUS[:2]
    buffer = np.random.default_rng(3).standard_normal(2 * length * num_series)
    x = buffer[: length * num_series].reshape(num_series, length).copy()
    assert ewma_in(lib, buffer, 0, length * num_series, CONTIGUOUS) == OK
    out = buffer[length * num_series :].reshape(num_series, length)
    np.testing.assert_allclose(out, reference.ewma(x, com=COM, axis=1), rtol=1e-14, atol=0)


@pytest.mark.parametrize("layout", [(0, 3, 1, 0), (5, 0, 1, 5), (0, 0, 0, 0)], ids=str)
def test_an_empty_block_is_no_overlap_even_at_the_same_address(lib, layout: tuple) -> None:
    buffer = np.random.default_rng(4).standard_normal(4)
    before = checksum(buffer)
    assert ewma_in(lib, buffer, 0, 0, layout) == OK, lib.fusedopt_last_error()
    assert checksum(buffer) == before


def test_a_layout_past_the_end_of_the_address_space_is_a_value_error(lib) -> None:
    """Extents whose end does not fit in an address are refused, not wrapped round into a
    range that misses the overlap."""
    buffer = np.zeros(4)
    layout = (2**62, 2, 2**62, 1)
    assert ewma_in(lib, buffer, 0, 1, layout) == VALUE_ERROR
    assert re.search(r"\bx\b", lib.fusedopt_last_error().decode())
    assert not buffer.any()


# Layouts whose out has elements the EWMA does not write: each must keep its value when the series
# are split over two threads (the library first touches the pages of a dense out in parallel,
# writing zeros the EWMA then overwrites, and only of a dense one).
GAPPED = [
    (1000, 200, 0, 1000),  # time stride 0: each series writes its first element only
    (500, 200, 1, 503),  # series one after another, 3 elements apart
    (500, 200, 203, 1),  # series side by side, rows 3 elements apart
]


@pytest.mark.parametrize("layout", GAPPED, ids=["stride-0", "series-apart", "rows-apart"])
def test_elements_between_a_layouts_elements_are_not_written(lib, layout: tuple) -> None:
    length, num_series, time_stride, series_stride = layout
    size = extent(layout) + 8
    rng = np.random.default_rng(3)
    x = rng.standard_normal(size)
    out = np.full(size, 7.0)
    previous = lib.fusedopt_num_threads()
    assert lib.fusedopt_set_num_threads(2) == OK
    try:
        status = lib.fusedopt_ewma(
            ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data),
            *(ctypes.c_int64(v) for v in layout), ctypes.byref(EwmaOptions(COM, 1, 0, 0)),
        )  # fmt: skip
    finally:
        lib.fusedopt_set_num_threads(previous)
    assert status == OK, lib.fusedopt_last_error()
    written = np.zeros(size, bool)
    t, s = np.meshgrid(np.arange(length), np.arange(num_series), indexing="ij")
    written[(t * time_stride + s * series_stride).ravel()] = True
    np.testing.assert_array_equal(out[~written], 7.0)
    np.testing.assert_array_equal(out[written], ewma_apart(lib, x, layout)[written])


# (length, num_series, time_stride, series_stride) whose series share memory in out.
SHARED_SERIES = [
    (50, 4000, 1, 1),  # each series 50 elements long, the next one element on
    (4, 3, 2, 3),  # interleaved: series 0 at 0, 2, 4, 6 and series 1 at 3, 5, 7, 9
    (3, 2, 5, 0),  # a series stride of 0: both series are one
    (1, 3, 0, 0),  # one element each, all the same
]


@pytest.mark.parametrize("layout", SHARED_SERIES, ids=["overlapping", "interleaved", "same", "one"])
def test_an_out_whose_series_share_memory_is_refused(lib, layout: tuple) -> None:
    """Each series is written by one thread, in time order, but two series by two threads: where
    they shared memory, the result changed from run to run (50 x 4000, strides 1 and 1: five
    runs, five results on 2 threads). Refused, nothing written; series apart (one after another,
    side by side, one element each with a time stride of 0) are stepped (the tests above)."""
    x = np.random.default_rng(4).standard_normal(extent(layout))
    out = np.full(extent(layout), 7.0)
    status = lib.fusedopt_ewma(
        ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data),
        *(ctypes.c_int64(v) for v in layout), ctypes.byref(EwmaOptions(COM, 1, 0, 0)),
    )  # fmt: skip
    assert status == VALUE_ERROR
    assert "out's series would share memory" in lib.fusedopt_last_error().decode()
    assert (out == 7.0).all()
