"""A step's division by a constant (a grad scale, a bias correction) is the float division, bit
for bit, on every ISA: float32 lanes may compute it as a double product by the reciprocal where
that is exact (docs/spec.md A.9; the AVX-512 kernels do, the AVX2 ones divide). Read through
SGD's grad scale, whose unscaled grads are written back: the kernels' own quotients, over every
float32 of the subnormal range and of one binade, the edges of the normal range, and a sample of
all the rest."""

from __future__ import annotations

import numpy as np
import pytest

import fusedopt.functional as F

# (divisor, what it exercises): the product unless d is an even integer, not a power of two.
DIVISORS = [
    (np.float32(1 - 0.9), "Adam's first bias correction at t = 1"),
    (np.float32(np.sqrt(1 - 0.999**3)), "the root of the second at t = 3"),
    (np.float32(1 - 0.999**100), "a second bias correction"),
    (np.float32(1 / 3), "a third"),
    (np.nextafter(np.float32(2), np.float32(0)), "the largest divisor below 2"),
    (np.float32(2**-130), "a subnormal divisor"),
    (np.float32(65536), "a GradScaler's power of two"),
    (np.float32(3), "an odd integer"),
    (np.float32(98), "an even integer, not a power of two: divided"),
    (np.float32(1e30), "a large even integer: divided"),
    (np.float32(1000.5), "a large divisor that is not an integer"),
]


def binade(exponent: int) -> np.ndarray:
    """The bits of every positive float32 with this biased exponent (0: subnormals and zero)."""
    return (np.uint32(exponent) << np.uint32(23)) | np.arange(2**23, dtype=np.uint32)


@pytest.fixture(scope="module")
def values() -> np.ndarray:
    rng = np.random.default_rng(7)
    bits = np.concatenate([
        binade(0),  # quotients in the subnormal range, where a quotient can be a midpoint
        binade(127),  # [1, 2): every mantissa
        binade(1)[::97], binade(254)[::97],  # the edges of the normal range: underflow, overflow
        rng.integers(0, 2**32, 2**20, dtype=np.uint64).astype(np.uint32),  # signs, inf, NaN
        np.array([0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000], dtype=np.uint32),
    ])  # fmt: skip
    return bits.view(np.float32)


def same_bits(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Equal bits, any NaN equal to any NaN (their payloads are not specified)."""
    unsigned = np.uint32 if actual.dtype == np.float32 else np.uint64
    both_nan = np.isnan(actual) & np.isnan(expected)
    return both_nan | (actual.view(unsigned) == expected.view(unsigned))


@pytest.mark.parametrize("divisor,why", DIVISORS, ids=[why for _, why in DIVISORS])
def test_float32_quotients_are_the_float_division(isa: str, values, divisor, why) -> None:
    grads = values.copy()
    with np.errstate(all="ignore"):
        expected = values / divisor
    F.sgd_([np.zeros_like(grads)], [grads], lr=0.0, grad_scale=float(divisor))
    wrong = ~same_bits(grads, expected)
    assert not wrong.any(), (
        f"{why}: {wrong.sum()} quotients differ, e.g. {values[wrong][:3]} / {divisor} gave "
        f"{grads[wrong][:3]}, not {expected[wrong][:3]}"
    )


def test_float64_quotients_are_the_division(isa: str) -> None:
    rng = np.random.default_rng(3)
    values = rng.integers(0, 2**64, 2**16, dtype=np.uint64).view(np.float64)
    for divisor in (1 - 0.9, 1 / 3, 3.0, 65536.0):
        grads = values.copy()
        with np.errstate(all="ignore"):
            expected = values / divisor
        F.sgd_([np.zeros_like(grads)], [grads], lr=0.0, grad_scale=divisor)
        assert same_bits(grads, expected).all(), divisor
