"""pandas' own tests of ``ewm(...).mean()``, ported to ``fusedopt.ewma``.

Sources (pandas 3.1.1, the version the spec measured; paths under ``pandas/tests/window/``):
``test_ewm.py``, ``moments/test_moments_consistency_ewm.py`` with the fixtures of
``conftest.py`` and ``moments/conftest.py``, and the ewm-mean cases of ``test_groupby.py``,
``test_numba.py``, ``test_online.py`` and ``test_dtypes.py``. Each test names the pandas test
it ports.

Every case feeds pandas' input to pandas and to ``fusedopt.ewma`` and asserts the results are
identical bit for bit, NaN positions included (fusedopt.ewma's docstring and README claim
bit-identity), for the input's own dtype, float64 and float32, as a 1-D series and as a 2-D
table along either axis. Where pandas' test also checks hand-written values, the same pandas
assertion checks fusedopt's result. Invalid decay parameters must raise ``ValueError`` naming
the parameter, as pandas does.

Deliberate differences, asserted as such:

- float32 input gives a float32 result, pandas' float64 result rounded once (docstring: "the
  result has ``x``'s float dtype"); pandas returns float64.
- A negative or non-integer ``min_periods`` raises (docstring); pandas 3.1.1 clamps it to 1.
- datetime64/timedelta64 input and object arrays that do not convert to float64 raise
  ``TypeError`` where pandas raises its ``DataError``.
- com == 1 with ``adjust=False`` across a NaN keeps pandas 2's result (docstring, spec 9).
  pandas' own tests never combine com == 1, adjust=False and a NaN, so no ported case meets
  it; test_com_one_without_adjust_across_nans_keeps_pandas_2 asserts it on pandas' data.

Object arrays of numbers (pandas' own tests pass some) used to be refused; fusedopt now reads
them with ``astype(float64)`` as pandas does.

Out of scope, because ``fusedopt.ewma`` has no such argument or method, so not ported:
``times=`` and a timedelta ``halflife`` (test_ewma_times_not_datetime_type,
test_ewma_times_not_same_length, test_ewma_halflife_not_correct_type,
test_ewma_halflife_without_times, the times side of test_ewma_with_times_equal_spacing and
test_ewm_with_times_getitem, test_ewma_with_times_variable_spacing, test_ewm_with_nat_raises,
test_ewma_times_adjust_false_with_disallowed_*, test_times_string_col_raises,
test_times_only_mean_implemented, test_groupby TestEWM.test_times*,
test_online test_update_times_mean); ``method="table"`` and ``engine=`` (test_numba: only the
"single"/cython side is ported); ``.online()`` (test_online: only the non-online side is
ported); sum, std, var, cov, corr (test_ewm_sum, test_ewm_sum_adjust_false_notimplemented, the
std/var halves of test_ew_min_periods, test_ewm_corr_cov*, test_ewm_pairwise_cov_corr,
test_different_input_array_raise_exception, test_numeric_only_corr_cov_*, every moments test
but the mean ones, test_pairwise, test_rolling's ewm std); groupby, ``agg``/``aggregate``,
``numeric_only``, ``__getitem__`` and index labels (test_groupby, test_ewm_aggregate_callable's
callables, test_ewm_getitem_attributes_retained's attributes, test_duplicate_labels): where
such a test computes a plain mean, that mean is ported.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

import fusedopt
from fusedopt import reference

pd = pytest.importorskip("pandas")
tm = pytest.importorskip("pandas._testing")

# pandas' error messages say "comass"; fusedopt's name the argument as the caller spells it.
BAD_DECAY_MESSAGE = {
    "com": "com must satisfy: com >= 0",
    "span": "span must satisfy: span >= 1",
    "halflife": "halflife must satisfy: halflife > 0",
    "alpha": "alpha must satisfy: 0 < alpha <= 1",
}
EXCLUSIVE = "com, span, halflife, and alpha are mutually exclusive"
NONE_GIVEN = "Must pass one of com, span, halflife, or alpha"
WIDE_COLUMNS = 19


# ------------------------------------------------------------------------------ the comparison


def assert_bit_identical(result: np.ndarray, expected: np.ndarray) -> None:
    """Same shape, dtype, NaN positions and bits (so 0.0 and -0.0 differ) elsewhere."""
    assert result.shape == expected.shape
    assert result.dtype == expected.dtype
    missing = np.isnan(result)
    np.testing.assert_array_equal(missing, np.isnan(expected))
    unsigned = np.uint64 if result.dtype == np.float64 else np.uint32
    np.testing.assert_array_equal(
        result[~missing].view(unsigned), expected[~missing].view(unsigned)
    )


def pandas_mean(values: np.ndarray, **options) -> np.ndarray:
    """pandas' ``ewm(**options).mean()`` of a Series (1-D) or a DataFrame (2-D, columns)."""
    frame = pd.Series(values) if values.ndim == 1 else pd.DataFrame(values)
    return frame.ewm(**options).mean().to_numpy()


def result_dtype(values: np.ndarray) -> np.dtype:
    """fusedopt's documented result dtype: x's float dtype, float64 for any other input."""
    if values.dtype.kind == "f" and values.itemsize >= 4:
        return values.dtype
    return np.dtype(np.float64)


@contextmanager
def isa_set_to(isa: str) -> Iterator[None]:
    previous = fusedopt.cpu_isa()
    fusedopt.set_cpu_isa(isa)
    try:
        yield
    finally:
        fusedopt.set_cpu_isa(previous)


def assert_ewma_is(expected: np.ndarray, x: np.ndarray, **options) -> None:
    """fusedopt.ewma(x, **options) is ``expected`` bit for bit under every ISA."""
    for isa in fusedopt.available_isas():
        with isa_set_to(isa):
            assert_bit_identical(fusedopt.ewma(x, **options), expected)


def wide(table: np.ndarray) -> np.ndarray:
    """``table`` beside copies of itself rolled down by 1, 2, ... rows, to 19 columns or more:
    two full vectors of series and a remainder under AVX-512 (8 doubles) and AVX2 (4), with
    NaNs in some lanes of a vector and not in others."""
    copies = -(-WIDE_COLUMNS // max(table.shape[1], 1))
    return np.concatenate([np.roll(table, k, axis=0) for k in range(copies)], axis=1)


def check_against_pandas(data, **options) -> np.ndarray:
    """fusedopt.ewma equals pandas bit for bit on ``data`` (pandas' input, 1-D or 2-D).

    Runs ``data`` in its own dtype, as float64 and as float32, under every ISA: a 1-D ``data``
    as a series, and each 2-D table along both axes (axis=0: columns, as a DataFrame; axis=1
    and -1: the rows of its transpose). The tables are ``data`` (when 2-D) and ``wide(data)``
    (a 1-D ``data`` as one column). Returns fusedopt's float64 result for ``data``, for
    pandas' own value checks.
    """
    data = np.asarray(data)
    for dtype in dict.fromkeys([data.dtype, np.dtype(np.float64), np.dtype(np.float32)]):
        values = data.astype(dtype)
        dtype_out = result_dtype(values)
        if values.ndim == 1:
            assert_ewma_is(pandas_mean(values, **options).astype(dtype_out), values, **options)
            tables = [wide(values.reshape(-1, 1))]
        else:
            tables = [values, wide(values)]
        for table in tables:
            expected = pandas_mean(table, **options).astype(dtype_out)
            assert_ewma_is(expected, table, axis=0, **options)
            assert_ewma_is(expected.T, table.T, axis=1, **options)
            assert_ewma_is(expected.T, table.T, axis=-1, **options)
    return fusedopt.ewma(data.astype(np.float64), **options)


def check_refused_like_pandas(decay: dict, message: str) -> None:
    """pandas raises ValueError for ``decay``; fusedopt raises ValueError with ``message``."""
    x = np.arange(5.0)
    with pytest.raises(ValueError):
        pd.Series(x).ewm(**decay)
    with pytest.raises(ValueError, match=message):
        fusedopt.ewma(x, **decay)
    with pytest.raises(ValueError, match=message):
        fusedopt.ewma(np.stack([x, x], axis=1), **decay)


# ---------------------------------------------------------------------- pandas' fixtures, ported


def series_fixture() -> np.ndarray:
    """window/conftest.py ``series``: 100 normal values, NaN at 20..39 (the index is dropped)."""
    arr = np.random.default_rng(2).standard_normal(100)
    arr[np.arange(20, 40)] = np.nan
    return arr


def frame_fixture() -> np.ndarray:
    """window/conftest.py ``frame``: 100 x 10 normal values."""
    return np.random.default_rng(2).standard_normal((100, 10))


def create_series() -> list[np.ndarray]:
    """moments/conftest.py ``create_series``."""
    return [
        np.array([], dtype=np.float64),
        np.array([np.nan] * 5),
        np.array([1.0] * 5),
        np.arange(5, 0, -1),
        np.arange(5),
        np.array([np.nan, 1.0, np.nan, 1.0, 1.0]),
        np.array([np.nan, 1.0, np.nan, 2.0, 3.0]),
        np.array([np.nan, 1.0, np.nan, 3.0, 2.0]),
    ]


def create_dataframes() -> list[np.ndarray]:
    """moments/conftest.py ``create_dataframes``: the empty 0 x 2 frame (of dtype object, as
    pandas'), the 5 x 3 integers, and each series as one column."""
    return [
        np.empty((0, 2), dtype=object),
        np.arange(15).reshape((5, 3)),
    ] + [s.reshape(-1, 1) for s in create_series()]


def is_constant(values: np.ndarray) -> bool:
    """moments/conftest.py ``is_constant``."""
    return len(set(values[~np.isnan(values.astype(np.float64))].ravel())) == 1


ALL_DATA = create_series() + create_dataframes()
CONSISTENT_DATA = [values for values in ALL_DATA if is_constant(values)]


def create_mock_weights(values: np.ndarray, com: float, adjust: bool, ignore_na: bool):
    """moments/test_moments_consistency_ewm.py ``create_mock_weights``, column by column."""
    if values.ndim == 1:
        return create_mock_series_weights(values, com, adjust, ignore_na)
    return np.stack(
        [create_mock_series_weights(c, com, adjust, ignore_na) for c in values.T], axis=1
    ).reshape(values.shape)


def create_mock_series_weights(s: np.ndarray, com: float, adjust: bool, ignore_na: bool):
    """moments/test_moments_consistency_ewm.py ``create_mock_series_weights``, verbatim but for
    ``.iat``."""
    w = np.full(len(s), np.nan)
    alpha = 1.0 / (1.0 + com)
    if adjust:
        count = 0
        for i in range(len(s)):
            if s[i] == s[i]:
                w[i] = pow(1.0 / (1.0 - alpha), count)
                count += 1
            elif not ignore_na:
                count += 1
    else:
        sum_wts = 0.0
        prev_i = -1
        count = 0
        for i in range(len(s)):
            if s[i] == s[i]:
                if prev_i == -1:
                    w[i] = 1.0
                else:
                    w[i] = alpha * sum_wts / pow(1.0 - alpha, count - prev_i)
                sum_wts += w[i]
                prev_i = count
                count += 1
            elif not ignore_na:
                count += 1
    return w


def as_pandas(values: np.ndarray):
    return pd.Series(values) if values.ndim == 1 else pd.DataFrame(values)


# ----------------------------------------------------------------------------- test_ewm.py


def test_doc_string() -> None:
    """test_ewm.py::test_doc_string."""
    check_against_pandas([0, 1, 2, np.nan, 4], com=0.5)


VALID_CONSTRUCTOR_DECAYS = [
    {"com": 0.5},
    {"span": 1.5},
    {"alpha": 0.5},
    {"halflife": 0.75},
    {"com": 0.5, "span": None},
    {"alpha": 0.5, "com": None},
    {"halflife": 0.75, "alpha": None},
]


@pytest.mark.parametrize("decay", VALID_CONSTRUCTOR_DECAYS, ids=str)
def test_constructor_valid(decay: dict) -> None:
    """test_ewm.py::test_constructor, the valid half (frame_or_series: 1-D and 2-D)."""
    check_against_pandas(np.arange(5), **decay)


@pytest.mark.parametrize(
    ("decay", "message"),
    [
        ({"com": 0.5, "alpha": 0.5}, EXCLUSIVE),
        ({"span": 1.5, "halflife": 0.75}, EXCLUSIVE),
        ({"alpha": 0.5, "span": 1.5}, EXCLUSIVE),
        ({"com": -0.5}, BAD_DECAY_MESSAGE["com"]),
        ({"span": 0.5}, BAD_DECAY_MESSAGE["span"]),
        ({"halflife": 0}, BAD_DECAY_MESSAGE["halflife"]),
        ({"alpha": -0.5}, BAD_DECAY_MESSAGE["alpha"]),
        ({"alpha": 1.5}, BAD_DECAY_MESSAGE["alpha"]),
    ],
    ids=str,
)
def test_constructor_invalid(decay: dict, message: str) -> None:
    """test_ewm.py::test_constructor, the invalid half."""
    check_refused_like_pandas(decay, message)


@pytest.mark.parametrize("ignore_na", [True, False])
@pytest.mark.parametrize("adjust", [True, False])
@pytest.mark.parametrize("arg", ["com", "halflife", "span", "alpha"])
def test_ewm_getitem_attributes_retained(arg: str, adjust: bool, ignore_na: bool) -> None:
    """test_ewm.py::test_ewm_getitem_attributes_retained: its frame (columns A and B, range(1))
    and options; the attributes themselves are pandas objects, out of scope."""
    options = {arg: 1, "adjust": adjust, "ignore_na": ignore_na}
    check_against_pandas(np.stack([np.arange(1), np.arange(1)], axis=1), **options)


def test_ewm_aggregate_callable_gh41700() -> None:
    """test_ewm.py::test_ewm_aggregate_callable_gh41700: ``agg("mean")`` is the mean."""
    result = check_against_pandas(np.arange(5), alpha=0.1)
    tm.assert_equal(pd.Series(result), pd.Series(range(5)).ewm(alpha=0.1).agg("mean"))


def test_ewma_adjust() -> None:
    """test_ewm.py::test_ewma_adjust."""
    vals = np.zeros(1000)
    vals[5] = 1
    result = check_against_pandas(vals, span=100, adjust=False).sum()
    assert np.abs(result - 1) < 1e-2


@pytest.mark.parametrize("ignore_na", [True, False])
@pytest.mark.parametrize("adjust", [True, False])
def test_ewma_cases(adjust: bool, ignore_na: bool) -> None:
    """test_ewm.py::test_ewma_cases."""
    s = np.array([1.0, 2.0, 4.0, 8.0])
    if adjust:
        expected = pd.Series([1.0, 1.6, 2.736842, 4.923077])
    else:
        expected = pd.Series([1.0, 1.333333, 2.222222, 4.148148])
    result = check_against_pandas(s, com=2.0, adjust=adjust, ignore_na=ignore_na)
    tm.assert_series_equal(pd.Series(result), expected)


def test_ewma_nan_handling() -> None:
    """test_ewm.py::test_ewma_nan_handling."""
    s = np.array([1.0] + [np.nan] * 5 + [1.0])
    result = check_against_pandas(s, com=5)
    tm.assert_series_equal(pd.Series(result), pd.Series([1.0] * len(s)))

    s = np.array([np.nan] * 2 + [1.0] + [np.nan] * 2 + [1.0])
    result = check_against_pandas(s, com=5)
    tm.assert_series_equal(pd.Series(result), pd.Series([np.nan] * 2 + [1.0] * 4))


# test_ewm.py::test_ewma_nan_handling_cases' parameters, verbatim but for the names
# w3 = 1 - 1/(1 + 2) (the decay at com=2) and a3 = 1/(1 + 2) (alpha).
w3, a3 = 1.0 - (1.0 / (1.0 + 2.0)), 1.0 / (1.0 + 2.0)
NAN_HANDLING_CASES = [
    ([np.nan, 1.0, 101.0], True, False, [np.nan, w3, 1.0]),
    ([np.nan, 1.0, 101.0], True, True, [np.nan, w3, 1.0]),
    ([np.nan, 1.0, 101.0], False, False, [np.nan, w3, a3]),
    ([np.nan, 1.0, 101.0], False, True, [np.nan, w3, a3]),
    ([1.0, np.nan, 101.0], True, False, [w3**2, np.nan, 1.0]),
    ([1.0, np.nan, 101.0], True, True, [w3, np.nan, 1.0]),
    ([1.0, np.nan, 101.0], False, False, [w3**2, np.nan, a3]),
    ([1.0, np.nan, 101.0], False, True, [w3, np.nan, a3]),
    (
        [np.nan, 1.0, np.nan, np.nan, 101.0, np.nan],
        True,
        False,
        [np.nan, w3**3, np.nan, np.nan, 1.0, np.nan],
    ),
    (
        [np.nan, 1.0, np.nan, np.nan, 101.0, np.nan],
        True,
        True,
        [np.nan, w3, np.nan, np.nan, 1.0, np.nan],
    ),
    (
        [np.nan, 1.0, np.nan, np.nan, 101.0, np.nan],
        False,
        False,
        [np.nan, w3**3, np.nan, np.nan, a3, np.nan],
    ),
    (
        [np.nan, 1.0, np.nan, np.nan, 101.0, np.nan],
        False,
        True,
        [np.nan, w3, np.nan, np.nan, a3, np.nan],
    ),
    ([1.0, np.nan, 101.0, 50.0], True, False, [w3**3, np.nan, w3, 1.0]),
    ([1.0, np.nan, 101.0, 50.0], True, True, [w3**2, np.nan, w3, 1.0]),
    ([1.0, np.nan, 101.0, 50.0], False, False, [w3**3, np.nan, w3 * a3, a3 * (w3**2 + a3)]),
    ([1.0, np.nan, 101.0, 50.0], False, True, [w3**2, np.nan, w3 * a3, a3]),
]


@pytest.mark.parametrize(("s", "adjust", "ignore_na", "w"), NAN_HANDLING_CASES)
def test_ewma_nan_handling_cases(s: list, adjust: bool, ignore_na: bool, w: list) -> None:
    """test_ewm.py::test_ewma_nan_handling_cases (GH 7603)."""
    s = pd.Series(s)
    expected = (s.multiply(w).cumsum() / pd.Series(w).cumsum()).ffill()
    result = check_against_pandas(s.to_numpy(), com=2.0, adjust=adjust, ignore_na=ignore_na)
    tm.assert_series_equal(pd.Series(result), expected)
    if ignore_na is False:
        # check that ignore_na defaults to False
        result = check_against_pandas(s.to_numpy(), com=2.0, adjust=adjust)
        tm.assert_series_equal(pd.Series(result), expected)


def test_ewm_alpha() -> None:
    """test_ewm.py::test_ewm_alpha (GH 10789): four spellings of one decay."""
    arr = series_fixture()
    a = check_against_pandas(arr, alpha=0.61722699889169674)
    b = check_against_pandas(arr, com=0.62014947789973052)
    c = check_against_pandas(arr, span=2.240298955799461)
    d = check_against_pandas(arr, halflife=0.721792864318)
    tm.assert_series_equal(pd.Series(a), pd.Series(b))
    tm.assert_series_equal(pd.Series(a), pd.Series(c))
    tm.assert_series_equal(pd.Series(a), pd.Series(d))


DOMAIN_CHECKS_REFUSED = [
    {"com": -0.1},
    {"span": -0.1},
    {"span": 0.0},
    {"span": 0.9},
    {"halflife": -0.1},
    {"halflife": 0.0},
    {"alpha": -0.1},
    {"alpha": 0.0},
    {"alpha": 1.1},
]
DOMAIN_CHECKS_ACCEPTED = [
    {"com": 0.0},
    {"com": 0.1},
    {"span": 1.0},
    {"span": 1.1},
    {"halflife": 0.1},
    {"alpha": 0.1},
    {"alpha": 1.0},
]


@pytest.mark.parametrize("decay", DOMAIN_CHECKS_REFUSED, ids=str)
def test_ewm_domain_checks_refused(decay: dict) -> None:
    """test_ewm.py::test_ewm_domain_checks (GH 12492), the values pandas refuses."""
    (name,) = decay
    check_refused_like_pandas(decay, BAD_DECAY_MESSAGE[name])


@pytest.mark.parametrize("decay", DOMAIN_CHECKS_ACCEPTED, ids=str)
def test_ewm_domain_checks_accepted(decay: dict) -> None:
    """test_ewm.py::test_ewm_domain_checks (GH 12492), the edge values pandas accepts, on the
    test's series."""
    check_against_pandas(series_fixture(), **decay)


def test_ew_empty_series() -> None:
    """test_ewm.py::test_ew_empty_series (the mean; ``ewm(3)`` is com=3)."""
    vals = np.array([], dtype=np.float64)
    result = check_against_pandas(vals, com=3)
    tm.assert_almost_equal(pd.Series(result), pd.Series(vals))


@pytest.mark.parametrize("min_periods", [0, 1])
def test_ew_min_periods(min_periods: int) -> None:
    """test_ewm.py::test_ew_min_periods, the mean (GH 7898)."""
    arr = np.random.default_rng(2).standard_normal(50)
    arr[:10] = np.nan
    arr[-10:] = np.nan

    result = check_against_pandas(arr, com=50, min_periods=2)
    assert np.isnan(result[:11]).all()
    assert not np.isnan(result[11:]).any()

    result = check_against_pandas(arr, com=50, min_periods=min_periods)
    assert np.isnan(result[:10]).all()
    assert not np.isnan(result[10:]).any()

    # series of length 0
    result = check_against_pandas(np.array([], dtype=object), com=50, min_periods=min_periods)
    tm.assert_series_equal(pd.Series(result), pd.Series(dtype="float64"))

    # series of length 1 (``ewm(50)`` is com=50)
    result = check_against_pandas(np.array([1.0]), com=50, min_periods=min_periods)
    tm.assert_series_equal(pd.Series(result), pd.Series([1.0]))

    # pass in ints
    result2 = fusedopt.ewma(np.arange(50), span=10)
    assert result2.dtype == np.float64
    check_against_pandas(np.arange(50), span=10)


def test_ewma_series() -> None:
    """test_ewm.py::test_ewma_series, the mean, on the ``series`` fixture."""
    check_against_pandas(series_fixture(), com=10)


def test_ewma_frame() -> None:
    """test_ewm.py::test_ewma_frame, the mean, on the ``frame`` fixture."""
    check_against_pandas(frame_fixture(), com=10)


def test_ewma_span_com_args() -> None:
    """test_ewm.py::test_ewma_span_com_args."""
    a = check_against_pandas(series_fixture(), com=9.5)
    b = check_against_pandas(series_fixture(), span=20)
    tm.assert_almost_equal(a, b)
    check_refused_like_pandas({"com": 9.5, "span": 20}, EXCLUSIVE)
    check_refused_like_pandas({}, NONE_GIVEN)


def test_ewma_halflife_arg() -> None:
    """test_ewm.py::test_ewma_halflife_arg."""
    a = check_against_pandas(series_fixture(), com=13.932726172912965)
    b = check_against_pandas(series_fixture(), halflife=10.0)
    tm.assert_almost_equal(a, b)
    check_refused_like_pandas({"span": 20, "halflife": 50}, EXCLUSIVE)
    check_refused_like_pandas({"com": 9.5, "halflife": 50}, EXCLUSIVE)
    check_refused_like_pandas({"com": 9.5, "span": 20, "halflife": 50}, EXCLUSIVE)
    check_refused_like_pandas({}, NONE_GIVEN)


def test_ewm_alpha_arg() -> None:
    """test_ewm.py::test_ewm_alpha_arg (GH 10789)."""
    check_refused_like_pandas({}, NONE_GIVEN)
    check_refused_like_pandas({"com": 10.0, "alpha": 0.5}, EXCLUSIVE)
    check_refused_like_pandas({"span": 10.0, "alpha": 0.5}, EXCLUSIVE)
    check_refused_like_pandas({"halflife": 10.0, "alpha": 0.5}, EXCLUSIVE)


@pytest.mark.parametrize("numeric_only", [True, False])
def test_numeric_only_frame_mean(numeric_only: bool) -> None:
    """test_ewm.py::test_numeric_only_frame with the "mean" kernel (GH 46560): its frame's
    values, columns a and b (int64) or, without numeric_only, a, b and c (an object column, so
    the array is of dtype object)."""
    df = pd.DataFrame({"a": [1], "b": 2, "c": 3})
    df["c"] = df["c"].astype(object)
    columns = ["a", "b"] if numeric_only else ["a", "b", "c"]
    result = check_against_pandas(df[columns].to_numpy(), span=2, min_periods=1)
    expected = df[columns].agg(["mean"]).reset_index(drop=True).astype(float)
    tm.assert_frame_equal(pd.DataFrame(result, columns=columns), expected)


@pytest.mark.parametrize("dtype", [int, object])
def test_numeric_only_series_mean(dtype: type) -> None:
    """test_ewm.py::test_numeric_only_series with the "mean" kernel (numeric_only=False)."""
    result = check_against_pandas(np.array([1], dtype=dtype), span=2, min_periods=1)
    tm.assert_series_equal(pd.Series(result), pd.Series([1.0]))


# ---------------------------------------------------- moments/test_moments_consistency_ewm.py


@pytest.mark.parametrize("min_periods", [0, 2])
@pytest.mark.parametrize("ignore_na", [True, False])
@pytest.mark.parametrize("adjust", [True, False])
@pytest.mark.parametrize("data_index", range(len(ALL_DATA)))
def test_ewm_consistency_mean(data_index: int, adjust: bool, ignore_na: bool, min_periods: int):
    """moments/test_moments_consistency_ewm.py::test_ewm_consistency_mean over ``all_data``."""
    values = ALL_DATA[data_index]
    com = 3.0
    result = check_against_pandas(
        values, com=com, min_periods=min_periods, adjust=adjust, ignore_na=ignore_na
    )
    data = as_pandas(values.astype(np.float64))
    weights = as_pandas(create_mock_weights(values, com, adjust, ignore_na))
    expected = data.multiply(weights).cumsum().divide(weights.cumsum()).ffill()
    expected[data.expanding().count() < (max(min_periods, 1) if min_periods else 1)] = np.nan
    tm.assert_equal(as_pandas(result), expected.astype("float64"))


@pytest.mark.parametrize("min_periods", [0, 2])
@pytest.mark.parametrize("ignore_na", [True, False])
@pytest.mark.parametrize("adjust", [True, False])
@pytest.mark.parametrize("data_index", range(len(CONSISTENT_DATA)))
def test_ewm_consistency_consistent(data_index: int, adjust, ignore_na, min_periods) -> None:
    """moments/test_moments_consistency_ewm.py::test_ewm_consistency_consistent, the mean of a
    constant series is that constant once min_periods values are in (the corr half is out of
    scope)."""
    values = CONSISTENT_DATA[data_index]
    com = 3.0
    result = check_against_pandas(
        values, com=com, min_periods=min_periods, adjust=adjust, ignore_na=ignore_na
    )
    data = as_pandas(values.astype(np.float64))
    count_x = data.expanding().count()
    expected = data * np.nan
    expected[count_x >= max(min_periods, 1)] = np.nanmax(values)
    tm.assert_equal(as_pandas(result), expected)


# ------------------------------------------------ test_groupby.py, test_numba.py, test_online.py


def test_groupby_ewm_methods_mean() -> None:
    """test_groupby.py::TestEWM::test_methods["mean"] (GH 16037): one group, B = range(4)."""
    result = check_against_pandas(np.arange(4), com=1.0)
    expected = [0.0, 0.6666666666666666, 1.4285714285714286, 2.2666666666666666]
    tm.assert_series_equal(pd.Series(result), pd.Series(expected))


@pytest.mark.parametrize("ignore_na", [True, False])
@pytest.mark.parametrize("adjust", [True, False])
def test_cython_vs_numba_mean(adjust: bool, ignore_na: bool) -> None:
    """test_numba.py::TestEWM::test_cython_vs_numba, "mean" without grouper: the cython side."""
    check_against_pandas(np.arange(4), com=1.0, adjust=adjust, ignore_na=ignore_na)


@pytest.mark.parametrize("data", [np.eye(3), np.ones((2, 3)), np.ones((3, 2))], ids=str)
def test_table_method_ewm_mean(data: np.ndarray) -> None:
    """test_numba.py::TestTableMethod::test_table_method_ewm, "mean": the method="single" side
    (method="table" gives the same, pandas asserts)."""
    check_against_pandas(data, com=1)


@pytest.mark.parametrize("ignore_na", [True, False])
@pytest.mark.parametrize("adjust", [True, False])
@pytest.mark.parametrize(
    "data",
    [np.stack([np.arange(5), np.arange(5)], axis=1), np.arange(5).reshape(5, 1), np.arange(5)],
    ids=["frame", "one-column frame", "series"],
)
def test_online_vs_non_online_mean(data: np.ndarray, adjust: bool, ignore_na: bool) -> None:
    """test_online.py::TestEWM::test_online_vs_non_online_mean (GH 66522): the non-online mean
    (``ewm(0.5)`` is com=0.5)."""
    check_against_pandas(data, com=0.5, adjust=adjust, ignore_na=ignore_na)


def times_test_data() -> np.ndarray:
    """The data of test_ewma_with_times_equal_spacing and test_ewm_with_times_getitem."""
    data = np.arange(10.0)
    data[::2] = np.nan
    return data


@pytest.mark.parametrize("min_periods", [0, 2])
def test_ewma_with_times_equal_spacing_expected_side(min_periods: int) -> None:
    """test_ewm.py::test_ewma_with_times_equal_spacing: the expected side, ``ewm(halflife=1.0)``
    without times."""
    check_against_pandas(times_test_data(), halflife=1.0, min_periods=min_periods)


def test_ewm_with_times_getitem_expected_side() -> None:
    """test_ewm.py::test_ewm_with_times_getitem (GH 40164): the expected side on its frame of
    columns A and B, ``ewm(halflife=1.0)`` without times."""
    data = times_test_data()
    check_against_pandas(np.stack([data, data], axis=1), halflife=1.0)


# ------------------------------------------------------------------- what fusedopt does otherwise


@pytest.mark.parametrize("dtype", ["M8[ns]", "m8[ns]"])
def test_arrow_temporal_matches_numpy(dtype: str) -> None:
    """test_dtypes.py::test_arrow_temporal_matches_numpy (GH 66445), "ewm" with NumPy's
    datetime and timedelta: pandas refuses them (DataError), fusedopt raises TypeError naming
    the dtype."""
    values = np.array([1, 2, 3], dtype=dtype)
    with pytest.raises(pd.errors.DataError, match="No numeric types to aggregate"):
        pd.Series(values).ewm(span=2).mean()
    with pytest.raises(TypeError, match="dtype"):
        fusedopt.ewma(values, span=2)


def test_float32_input_gives_float32_where_pandas_gives_float64() -> None:
    """Docstring: "the result has ``x``'s float dtype"; check_against_pandas compares it with
    pandas' float64 result rounded once to float32."""
    values = series_fixture().astype(np.float32)
    assert pd.Series(values).ewm(com=10).mean().dtype == np.float64
    assert fusedopt.ewma(values, com=10).dtype == np.float32


@pytest.mark.parametrize(
    "values", [["1.5", 2, None], [True, 2.5, np.inf]], ids=["strings-none", "bool-inf"]
)
def test_object_input_is_read_as_pandas_reads_it(values: list) -> None:
    """pandas reads an object array with ``astype(float64)`` (window ``_prep_values``); so does
    fusedopt: numeric strings parse, None is NaN, inf is missing. The result is float64."""
    result = check_against_pandas(np.array(values, dtype=object), com=1)
    assert result.dtype == np.float64


@pytest.mark.parametrize("values", [["a", 1.0], [1 + 2j, 1.0]], ids=["string", "complex"])
def test_object_input_that_is_not_real_numbers_is_refused(values: list) -> None:
    """pandas refuses it (DataError), fusedopt raises TypeError naming the dtype."""
    x = np.array(values, dtype=object)
    with pytest.raises(pd.errors.DataError):
        pd.Series(x).ewm(com=1).mean()
    with pytest.raises(TypeError, match="dtype object"):
        fusedopt.ewma(x, com=1)


@pytest.mark.parametrize(
    ("min_periods", "error"), [(-1, ValueError), (-5, ValueError), (1.5, TypeError)]
)
def test_negative_or_fractional_min_periods_is_refused(min_periods, error: type) -> None:
    """Docstring: a negative ``min_periods`` is a ValueError and a non-integer one a TypeError,
    naming it. pandas 3.1.1 refuses neither: ``ExponentialMovingWindow`` stores
    ``max(int(min_periods), 1)``."""
    x = series_fixture()
    clamped = pd.Series(x).ewm(com=2, min_periods=min_periods).mean().to_numpy()
    assert_bit_identical(clamped, pandas_mean(x, com=2, min_periods=1))
    with pytest.raises(error, match="min_periods"):
        fusedopt.ewma(x, com=2, min_periods=min_periods)


@pytest.mark.parametrize("decay", [{"halflife": 1.0}, {"com": 1.0}, {"span": 3}, {"alpha": 0.5}])
def test_com_one_without_adjust_across_nans_keeps_pandas_2(decay: dict) -> None:
    """Docstring and spec 9: at com == 1 with adjust=False, after a NaN fusedopt keeps pandas 2's
    result (the spec's recursion, fusedopt.reference.ewma); pandas 3.0 changed that one case
    (pandas PR #66521, issue #66523). pandas' own tests never meet it (their com == 1 cases
    with adjust=False have no NaN); this uses test_ewma_with_times_equal_spacing's data with
    adjust=False."""
    data = times_test_data()
    pandas_result = pandas_mean(data, **decay, adjust=False)
    result = fusedopt.ewma(data, **decay, adjust=False)
    assert_bit_identical(result, reference.ewma(data, **decay, adjust=False))
    if int(pd.__version__.split(".")[0]) < 3:
        assert_bit_identical(result, pandas_result)
    else:
        # The same up to the first value after a gap behind the first observation (index 3),
        # different at every value after a gap (each is a NaN apart).
        assert_bit_identical(result[:3], pandas_result[:3])
        assert (result[3::2] != pandas_result[3::2]).all()
    # With ignore_na=True there is no decayed gap, and no difference.
    options = {**decay, "adjust": False, "ignore_na": True}
    check_against_pandas(data, **options)


def test_all_data_has_pandas_fixtures() -> None:
    """The port of moments/conftest.py has pandas' 8 series and 10 frames; 4 are constant (the
    all-ones series and [nan, 1, nan, 1, 1], each as a series and as a one-column frame)."""
    assert len(ALL_DATA) == 18
    assert len(CONSISTENT_DATA) == 4
