"""fusedopt.ewma against the reference loop of spec section 9: bit for bit, every option."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import fusedopt
from fusedopt import reference

DECAYS = [
    ("com", 0.0),
    ("com", 1.0),
    ("com", 2.5),
    ("span", 1.0),
    ("span", 10.0),
    ("halflife", 0.7),
    ("halflife", 4.0),
    ("alpha", 0.05),
    ("alpha", 0.5),
    ("alpha", 1.0),
]
# (adjust, ignore_na, min_periods)
OPTIONS = list(itertools.product([True, False], [False, True], [0, 1, 3]))


def series_with_nan_runs(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal(n) * 5
    x[: rng.integers(0, 4)] = np.nan  # 0 to 3 leading NaNs
    for start in rng.integers(0, n, size=max(n // 12, 1)):
        x[start : start + rng.integers(1, 6)] = np.nan
    x[rng.integers(0, n, size=n // 8)] = 1.25  # equal neighbours take the y == x branch
    return x


@pytest.mark.parametrize(("parameter", "value"), DECAYS, ids=[f"{p}={v}" for p, v in DECAYS])
def test_series_with_nan_runs_is_bit_identical_for_every_option(
    parameter: str, value: float
) -> None:
    rng = np.random.default_rng(int(value * 10) + len(parameter))
    for adjust, ignore_na, min_periods in OPTIONS:
        for n in (1, 2, 37, 200):
            x = series_with_nan_runs(rng, n)
            options = {
                parameter: value,
                "adjust": adjust,
                "ignore_na": ignore_na,
                "min_periods": min_periods,
            }
            np.testing.assert_array_equal(
                fusedopt.ewma(x, **options), reference.ewma(x, **options), err_msg=str(options)
            )


@pytest.mark.parametrize("axis", [0, 1, -1, -2])
@pytest.mark.parametrize(("adjust", "ignore_na", "min_periods"), OPTIONS)
def test_2d_along_either_axis_is_bit_identical(
    axis: int, adjust: bool, ignore_na: bool, min_periods: int
) -> None:
    rng = np.random.default_rng(abs(axis) * 10 + min_periods)
    x = np.stack([series_with_nan_runs(rng, 60) for _ in range(7)], axis=1)  # (60, 7)
    options = dict(span=4.0, adjust=adjust, ignore_na=ignore_na, min_periods=min_periods, axis=axis)
    actual = fusedopt.ewma(x, **options)
    np.testing.assert_array_equal(actual, reference.ewma(x, **options))
    # Along axis 0 each column is a series; along axis 1 each row.
    along = 0 if axis in (0, -2) else 1
    first = x[:, 2] if along == 0 else x[2, :]
    result = actual[:, 2] if along == 0 else actual[2, :]
    np.testing.assert_array_equal(
        result,
        fusedopt.ewma(first, span=4.0, adjust=adjust, ignore_na=ignore_na, min_periods=min_periods),
    )


@pytest.mark.parametrize("isa_name", fusedopt.available_isas())
@pytest.mark.parametrize(("adjust", "ignore_na", "min_periods"), OPTIONS)
def test_every_isa_gives_the_reference_s_bits_for_series_in_either_layout(
    isa_name: str, adjust: bool, ignore_na: bool, min_periods: int
) -> None:
    """21 series of 90 (vectors of series and a tail of single ones, in the vector ISAs), with
    NaN and infinity runs, one all-NaN series and one constant: along axis 1 each series is
    contiguous (the kernels run several series' chains side by side in lanes), along axis 0 the
    series sit side by side in every row."""
    rng = np.random.default_rng(min_periods * 4 + adjust * 2 + ignore_na)
    x = np.stack([series_with_nan_runs(rng, 90) for _ in range(21)])  # (21, 90)
    x[3] = np.nan
    x[5] = 2.5
    x[7, 10:20] = np.inf
    options = dict(com=2.0, adjust=adjust, ignore_na=ignore_na, min_periods=min_periods)
    expected = np.stack([reference.ewma(series, **options) for series in x])
    before = fusedopt.cpu_isa()
    fusedopt.set_cpu_isa(isa_name)
    try:
        along_rows = fusedopt.ewma(x, axis=1, **options)
        along_columns = fusedopt.ewma(np.ascontiguousarray(x.T), axis=0, **options)
    finally:
        fusedopt.set_cpu_isa(before)
    np.testing.assert_array_equal(along_rows, expected)
    np.testing.assert_array_equal(along_columns, expected.T)


def test_non_contiguous_and_fortran_inputs_give_the_same_result() -> None:
    rng = np.random.default_rng(1)
    x = np.stack([series_with_nan_runs(rng, 50) for _ in range(8)], axis=1)
    expected = fusedopt.ewma(x, com=3.0)
    np.testing.assert_array_equal(fusedopt.ewma(np.asfortranarray(x), com=3.0), expected)
    np.testing.assert_array_equal(fusedopt.ewma(x[:, ::2], com=3.0), expected[:, ::2])
    np.testing.assert_array_equal(fusedopt.ewma(x.T, com=3.0, axis=1), expected.T)


def test_input_is_never_written() -> None:
    x = series_with_nan_runs(np.random.default_rng(2), 40)
    before = x.copy()
    fusedopt.ewma(x, alpha=0.3)
    np.testing.assert_array_equal(x, before)


def test_float32_input_returns_float32_of_the_float64_result() -> None:
    x = series_with_nan_runs(np.random.default_rng(3), 100).astype(np.float32)
    actual = fusedopt.ewma(x, halflife=3.0, adjust=False)
    assert actual.dtype == np.float32
    np.testing.assert_array_equal(
        actual, reference.ewma(x, halflife=3.0, adjust=False).astype(np.float32)
    )


@pytest.mark.parametrize("dtype", [np.int8, np.int64, np.uint16, np.bool_, np.float16])
def test_integer_bool_and_half_input_return_float64(dtype: type) -> None:
    x = (np.arange(20) % 3).astype(dtype)
    actual = fusedopt.ewma(x, com=2.0)
    assert actual.dtype == np.float64
    np.testing.assert_array_equal(actual, reference.ewma(x.astype(np.float64), com=2.0))


def test_python_list_input() -> None:
    np.testing.assert_array_equal(
        fusedopt.ewma([1.0, np.nan, 3.0], com=0.5), reference.ewma([1.0, np.nan, 3.0], com=0.5)
    )


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (0, 0)])
def test_empty_input(shape: tuple) -> None:
    for axis in (0, 1) if len(shape) == 2 else (0,):
        result = fusedopt.ewma(np.zeros(shape), com=1.0, axis=axis)
        assert result.shape == shape and result.dtype == np.float64


@pytest.mark.parametrize("value", [3.5, np.nan])
def test_length_one_series(value: float) -> None:
    for min_periods in (0, 1, 2):
        np.testing.assert_array_equal(
            fusedopt.ewma(np.array([value]), alpha=0.3, min_periods=min_periods),
            reference.ewma([value], alpha=0.3, min_periods=min_periods),
        )
    too_few_observations = fusedopt.ewma(np.array([3.5]), com=1.0, min_periods=2)
    assert np.isnan(too_few_observations[0])


@pytest.mark.parametrize(("adjust", "ignore_na"), list(itertools.product([True, False], repeat=2)))
def test_all_nan_series_stays_nan(adjust: bool, ignore_na: bool) -> None:
    result = fusedopt.ewma(np.full(25, np.nan), span=3.0, adjust=adjust, ignore_na=ignore_na)
    assert np.isnan(result).all()


@pytest.mark.parametrize(("parameter", "value"), DECAYS, ids=[f"{p}={v}" for p, v in DECAYS])
def test_constant_series_is_exact(parameter: str, value: float) -> None:
    x = np.full(500, 0.1)
    x[[10, 11, 200]] = np.nan
    for adjust, ignore_na in itertools.product([True, False], repeat=2):
        result = fusedopt.ewma(x, **{parameter: value}, adjust=adjust, ignore_na=ignore_na)
        np.testing.assert_array_equal(result, 0.1)


def test_leading_nans_give_nan_and_later_ones_carry_forward() -> None:
    x = np.array([np.nan, np.nan, 2.0, np.nan, 4.0])
    result = fusedopt.ewma(x, com=1.0)
    assert np.isnan(result[:2]).all()
    assert result[2] == 2.0 and result[3] == 2.0
    np.testing.assert_array_equal(result, reference.ewma(x, com=1.0))


def test_alpha_round_trips_through_com_as_pandas_does() -> None:
    """Spec section 9: alpha = 0.05 becomes 1/(1 + 19) = 0.05000000000000001, and it shows."""
    x = np.array([1.0, 0.0])
    result = fusedopt.ewma(x, alpha=0.05, adjust=False)
    alpha_used = 1.0 / (1.0 + (1 - 0.05) / 0.05)
    assert alpha_used != 0.05
    assert result[1] == ((1 - alpha_used) * 1.0 + alpha_used * 0.0) / (
        (1 - alpha_used) + alpha_used
    )


def test_min_periods_zero_acts_as_one() -> None:
    x = np.array([np.nan, 1.0, 2.0])
    np.testing.assert_array_equal(
        fusedopt.ewma(x, com=1.0, min_periods=0), fusedopt.ewma(x, com=1.0, min_periods=1)
    )


def test_large_2d_multi_threaded_equals_single_threaded() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 200))
    x[rng.random(x.shape) < 0.05] = np.nan
    previous = fusedopt.num_threads()
    try:
        results = {}
        for threads in (1, 2, 4):
            fusedopt.set_num_threads(threads)
            results[threads] = [
                fusedopt.ewma(x, span=20.0, axis=axis, ignore_na=axis == 1) for axis in (0, 1)
            ]
    finally:
        fusedopt.set_num_threads(previous)
    for threads in (2, 4):
        for axis in (0, 1):
            np.testing.assert_array_equal(results[threads][axis], results[1][axis])
    # A few series checked against the reference too (all of them would take the oracle seconds).
    for column in (0, 77, 199):
        np.testing.assert_array_equal(
            results[2][0][:, column], reference.ewma(x[:, column], span=20.0)
        )
    for row in (0, 1500, 2999):
        np.testing.assert_array_equal(
            results[2][1][row], reference.ewma(x[row], span=20.0, ignore_na=True)
        )


def test_a_min_periods_beyond_int64_gives_nan_as_any_unreached_one() -> None:
    """It was refused by the binding as 'incompatible function arguments', naming nothing."""
    x = np.arange(6.0)
    expected = fusedopt.ewma(x, com=1.0, min_periods=7)
    assert np.isnan(expected).all()
    np.testing.assert_array_equal(fusedopt.ewma(x, com=1.0, min_periods=2**63), expected)
    np.testing.assert_array_equal(fusedopt.ewma(x, com=1.0, min_periods=10**30), expected)


def test_numpy_flags_axes_and_one_element_arrays_are_read_as_their_values() -> None:
    x = np.arange(12.0).reshape(4, 3)
    expected = fusedopt.ewma(x.T, com=1.5, adjust=False, ignore_na=True, axis=1)
    got = fusedopt.ewma(
        x.T, com=np.array([1.5]), adjust=np.False_, ignore_na=np.True_, axis=np.int64(1)
    )
    np.testing.assert_array_equal(got, expected)


def test_a_masked_array_s_data_is_checked_as_any_array_s() -> None:
    """A masked array was filled as float64 before any dtype check: masked datetimes were
    averaged as nanosecond counts, masked complex lost its imaginary part (with a warning),
    masked strings were parsed. Its data is now refused as the same data unmasked is."""
    mask = [False, True, False]
    for data in (
        np.array([1, 2, 3], dtype="datetime64[ns]"),
        np.array([1 + 1j, 2, 3]),
        np.array(["1", "2", "3"]),
    ):
        with pytest.raises(TypeError, match="x must hold real numbers"):
            fusedopt.ewma(np.ma.array(data, mask=mask), com=1.0)
    with pytest.raises(TypeError, match="x must hold real numbers"):
        fusedopt.ewma(np.ma.array(np.array([1.0, "a", 2.0], dtype=object), mask=mask), com=1.0)


def test_a_masked_float32_array_gives_float32_with_its_masked_values_missing() -> None:
    x = np.ma.array(np.array([1, 2, 3, 4], np.float32), mask=[False, True, False, False])
    result = fusedopt.ewma(x, com=1.0)
    assert result.dtype == np.float32
    unmasked = np.array([1, np.nan, 3, 4], np.float32)
    np.testing.assert_array_equal(result, fusedopt.ewma(unmasked, com=1.0))


def test_pandas_nullable_columns_and_min_periods_none_as_pandas_reads_them() -> None:
    """A boolean column with pd.NA (an object array to NumPy, holding pd.NA) is read through
    pandas' own to_numpy, NA as missing; min_periods=None (in pandas' signature) counts from the
    first observation."""
    pd = pytest.importorskip("pandas")
    for series in (
        pd.Series([True, True, False, pd.NA, True, None, False], dtype="boolean"),
        pd.Series([1, pd.NA, 3, 4, pd.NA, 6], dtype="Int64"),
    ):
        expected = series.ewm(alpha=0.8).mean().to_numpy()
        np.testing.assert_array_equal(fusedopt.ewma(series, alpha=0.8), expected)
    x = np.array([np.nan, 2.0, np.nan, 5.0, 1.0])
    expected = pd.Series(x).ewm(com=2.0, min_periods=None).mean().to_numpy()
    np.testing.assert_array_equal(fusedopt.ewma(x, com=2.0, min_periods=None), expected)


def test_the_native_ewma_refuses_a_layout_past_its_arrays_and_an_out_it_would_copy() -> None:
    """fusedopt._core.ewma trusted its layout (a stride past the arrays read and wrote out of
    bounds) and took an out of another dtype through a converted copy, losing the result."""
    from fusedopt import _core

    x, out = np.arange(10.0), np.zeros(10)
    with pytest.raises(ValueError, match="reaches past the arrays"):
        _core.ewma(x, out, 10, 1, 100000, 0, 1.0, True, False, 0)
    with pytest.raises(ValueError, match=">= 0"):
        _core.ewma(x, out, 10, 1, -1, 0, 1.0, True, False, 0)
    with pytest.raises(TypeError):
        _core.ewma(x, np.zeros(10, np.float32), 10, 1, 1, 0, 1.0, True, False, 0)
    assert not out.any()
    _core.ewma(x, out, 10, 1, 1, 0, 1.0, True, False, 0)
    np.testing.assert_array_equal(out, fusedopt.ewma(x, com=1.0))
