"""Exponentially weighted moving average with pandas ``ewm(...).mean()`` semantics (spec 9)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from fusedopt import _core
from fusedopt._engine import as_flag, as_number


def _center_of_mass(
    com: float | None, span: float | None, halflife: float | None, alpha: float | None
) -> float:
    """pandas' ``get_center_of_mass``, operation for operation, so alpha' = 1 / (1 + com) comes
    out bit-identical to pandas' (alpha does not always survive the round trip, spec section 9)."""
    given = {
        name: value
        for name, value in (("com", com), ("span", span), ("halflife", halflife), ("alpha", alpha))
        if value is not None
    }
    if len(given) > 1:
        raise ValueError("com, span, halflife, and alpha are mutually exclusive")
    if not given:
        raise ValueError("Must pass one of com, span, halflife, or alpha")
    ((name, value),) = given.items()
    number = as_number(value, name)  # TypeError naming it: a string, an array of several numbers
    # A Python or NumPy number is computed with as given, as pandas does (a float32 alpha in
    # float32); a one-element array as its float.
    x = value if isinstance(value, numbers.Real) else number
    if name == "com":
        if not x >= 0:
            raise ValueError("com must satisfy: com >= 0")
        return float(x)
    if name == "span":
        if not x >= 1:
            raise ValueError("span must satisfy: span >= 1")
        return float((x - 1) / 2)
    if name == "halflife":
        if not x > 0:
            raise ValueError("halflife must satisfy: halflife > 0")
        decay = 1 - np.exp(np.log(0.5) / x)
        return float(1 / decay - 1)
    if not 0 < x <= 1:
        raise ValueError("alpha must satisfy: 0 < alpha <= 1")
    return float((1 - x) / x)


def _nullable_as_float64(x: Any, mask: np.ndarray | None) -> np.ndarray | None:
    """A pandas object with a nullable dtype (boolean, Int64 with pd.NA) as float64, NA as NaN,
    through its own to_numpy, as pandas reads it; None for anything else."""
    to_numpy = getattr(x, "to_numpy", None)
    if mask is not None or to_numpy is None:
        return None
    try:
        return np.asarray(to_numpy(dtype=np.float64, na_value=np.nan))
    except (TypeError, ValueError):
        return None


def ewma(
    x: np.ndarray,
    *,
    com: float | None = None,
    span: float | None = None,
    halflife: float | None = None,
    alpha: float | None = None,
    adjust: bool = True,
    ignore_na: bool = False,
    min_periods: int | None = 0,
    axis: int = 0,
) -> np.ndarray:
    """Exponentially weighted mean of every series of ``x``, as pandas ``ewm(...).mean()``.

    ``x`` is 1-D (one series) or 2-D with the series running along ``axis`` (``axis=0``: each
    column is a series, as in a DataFrame). Give exactly one of ``com``, ``span``, ``halflife``,
    ``alpha``. Missing values (NaN, and ±inf and masked values, which pandas reads as missing)
    are handled as pandas does (leading ones give NaN, later ones carry the last mean forward,
    ``ignore_na`` decides whether gaps decay the weights), and ``min_periods``
    counts observations. Computed in float64 (as pandas does); the result has ``x``'s float
    dtype, or float64 for other input (integers, bools, and object arrays, which are read with
    ``astype(float64)`` as pandas reads them). At com == 1 with ``adjust=False`` and a NaN, the
    result is pandas 2's (pandas 3.0 changed that one case; see spec section 9). Unlike pandas,
    which clamps ``min_periods`` to ``max(int(min_periods), 1)``, a negative ``min_periods`` is a
    ValueError and a non-integer one a TypeError (None, as in pandas, counts from the first
    observation); and unlike pandas, which reads any object's
    truth, ``adjust`` and ``ignore_na`` are True or False (or 1 or 0): ``adjust="no"`` is a
    TypeError, not True.
    """
    com_value = _center_of_mass(com, span, halflife, alpha)
    if min_periods is None:  # pandas' None: every mean from the first observation on
        min_periods = 0
    if isinstance(min_periods, bool) or not isinstance(min_periods, int | np.integer):
        raise TypeError(f"min_periods must be an integer, got {min_periods!r}")
    if min_periods < 0:
        raise ValueError("min_periods must be >= 0")
    # Strict where pandas reads any object's truth ('no' would be True), as the optimizers' flags.
    adjust, ignore_na = as_flag(adjust, "adjust"), as_flag(ignore_na, "ignore_na")
    if isinstance(axis, bool | np.bool_) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis must be an integer, got {axis!r}")  # True would be axis 1
    # A masked array's data is checked as any array's, then its masked values are missing, as
    # pandas reads them (np.asarray would drop the mask).
    mask = np.ma.getmaskarray(x) if np.ma.isMaskedArray(x) else None
    array = np.asarray(np.ma.getdata(x)) if mask is not None else np.asarray(x)
    if array.dtype.kind == "O":
        # pandas reads an object array as float64 (window _prep_values: ensure_float64), so
        # None is NaN and numeric strings parse; pandas' nullable dtypes (a boolean column with
        # pd.NA) convert through their own to_numpy; what does not convert is no real number.
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError) as error:
            array = _nullable_as_float64(x, mask)
            if array is None:
                raise TypeError(
                    f"x must hold real numbers, got dtype object, not all float64: {error}"
                ) from None
    if array.dtype.kind not in "fiub":
        raise TypeError(f"x must hold real numbers, got dtype {array.dtype}")
    if mask is not None and mask.any():
        array = np.where(mask, np.nan, array.astype(np.float64))
        result_dtype = np.ma.getdata(x).dtype  # a masked float32 array's mean is float32 too
    else:
        result_dtype = array.dtype
    if array.ndim not in (1, 2):
        raise ValueError(f"x must be 1-D or 2-D, got {array.ndim}-D")
    if axis not in (0, 1, -1, -2) or (array.ndim == 1 and axis not in (0, -1)):
        raise ValueError(f"axis {axis} is out of bounds for a {array.ndim}-D array")
    if not (result_dtype.kind == "f" and result_dtype.itemsize >= 4):
        result_dtype = np.dtype(np.float64)
    values = np.ascontiguousarray(array, dtype=np.float64)
    out = np.empty_like(values)
    if values.ndim == 1:
        length, num_series, time_stride, series_stride = values.shape[0], 1, 1, 0
    elif axis % 2 == 0:
        length, num_series = values.shape
        time_stride, series_stride = num_series, 1
    else:
        num_series, length = values.shape
        time_stride, series_stride = 1, length
    if values.size:
        _core.ewma(
            values,
            out,
            length,
            num_series,
            time_stride,
            series_stride,
            com_value,
            adjust,
            ignore_na,
            # No series is longer than the native count: beyond it, every mean is NaN alike.
            min(int(min_periods), np.iinfo(np.int64).max),
        )
    # The float64 input goes before the result's cast is made: float32 input peaks at 4 times
    # its result's bytes instead of 5 (the core reads float64 and refuses an out over its x).
    del values
    return out.astype(result_dtype, copy=False)
