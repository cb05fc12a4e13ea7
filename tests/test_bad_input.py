"""Bad input raises a clear exception that names the culprit, and writes nothing.

TypeError for a wrong type or dtype, ValueError for everything else. Every multi-tensor case puts
the bad tensor LAST, so an implementation that validated lazily (tensor by tensor, while
updating) would already have written the earlier ones; a checksum of every buffer proves it did
not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import fusedopt
import fusedopt.functional as F
import fusedopt.keras_numpy as fk
from conftest import checksum

N = 3  # tensors per call; index N - 1 is the bad one
BAD = f"[{N - 1}]"


def assert_rejected(
    call: Callable[[], Any], buffers: list[np.ndarray], error: type, *names: str
) -> None:
    """``call`` raises ``error`` whose message names each of ``names``; no buffer changed."""
    before = checksum(*buffers)
    with pytest.raises(error) as raised:
        call()
    message = str(raised.value)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    assert checksum(*buffers) == before, "a rejected call wrote to a buffer"


def fresh(
    dtype: type = np.float32, shape: tuple[int, ...] = (40,), seed: int = 0
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for _ in range(N)]


def adam_buffers(dtype: type = np.float32) -> dict[str, list[np.ndarray]]:
    """One functional Adam call's lists, all valid; a case then spoils the last tensor of one."""
    return {
        "params": fresh(dtype, seed=1),
        "grads": fresh(dtype, seed=2),
        "exp_avgs": fresh(dtype, seed=3),
        "exp_avg_sqs": [np.abs(a) for a in fresh(dtype, seed=4)],
        "max_exp_avg_sqs": [np.abs(a) for a in fresh(dtype, seed=5)],
    }


def every_array(lists: dict[str, list[Any]]) -> list[np.ndarray]:
    return [a for arrays in lists.values() for a in arrays or () if isinstance(a, np.ndarray)]


def functional_adam(lists: dict[str, list[Any]], **options: Any) -> Callable[[], None]:
    return lambda: F.adam_(**lists, step=3, lr=0.1, amsgrad=True, **options)


# ------------------------------------------------------------------------ tensors: functional


def noncontiguous_1d(dtype: type) -> np.ndarray:
    return np.zeros(80, dtype)[::2]  # shape (40,), stride of two elements


def transposed_2d(dtype: type) -> np.ndarray:
    return np.zeros((8, 5), dtype).T  # (5, 8), Fortran order


def big_endian(dtype: type) -> np.ndarray:
    return np.zeros(40, np.dtype(dtype).newbyteorder(">"))


def read_only(dtype: type) -> np.ndarray:
    a = np.zeros(40, dtype)
    a.flags.writeable = False
    return a


WRONG_DTYPES = {
    "int32": lambda dtype: np.zeros(40, np.int32),
    "float16": lambda dtype: np.zeros(40, np.float16),
    "complex64": lambda dtype: np.zeros(40, np.complex64),
    "big_endian": big_endian,
}


@pytest.mark.parametrize("role", ["params", "grads", "exp_avg_sqs"])
@pytest.mark.parametrize("make", WRONG_DTYPES.values(), ids=WRONG_DTYPES.keys())
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_wrong_dtype_is_a_type_error(role: str, make: Callable, dtype: type) -> None:
    lists = adam_buffers(dtype)
    lists[role][-1] = make(dtype)
    assert_rejected(functional_adam(lists), every_array(lists), TypeError, role + BAD, "dtype")


@pytest.mark.parametrize("role", ["grads", "exp_avgs", "max_exp_avg_sqs"])
def test_dtype_different_from_the_param_is_a_type_error(role: str) -> None:
    lists = adam_buffers(np.float32)
    lists[role][-1] = lists[role][-1].astype(np.float64)
    assert_rejected(
        functional_adam(lists), every_array(lists), TypeError, role + BAD, "params" + BAD
    )


@pytest.mark.parametrize("role", ["grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"])
@pytest.mark.parametrize("shape", [(41,), (40, 1), (1, 40), ()], ids=str)
def test_shape_different_from_the_param_is_a_value_error(role: str, shape: tuple) -> None:
    lists = adam_buffers()
    lists[role][-1] = np.zeros(shape, np.float32)
    assert_rejected(functional_adam(lists), every_array(lists), ValueError, role + BAD, "shape")


@pytest.mark.parametrize("role", ["grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"])
def test_list_of_the_wrong_length_is_a_value_error(role: str) -> None:
    lists = adam_buffers()
    lists[role] = lists[role][:-1]
    assert_rejected(functional_adam(lists), every_array(lists), ValueError, role, f"expected {N}")


@pytest.mark.parametrize("role", ["params", "grads", "exp_avgs", "max_exp_avg_sqs"])
@pytest.mark.parametrize("make", [noncontiguous_1d, transposed_2d], ids=["strided", "transposed"])
def test_non_contiguous_buffer_is_a_value_error(role: str, make: Callable) -> None:
    lists = adam_buffers()
    bad = make(np.float32)
    if bad.shape != (40,):  # the 2-D case needs the whole last tensor to be 2-D
        for arrays in lists.values():
            arrays[-1] = np.zeros(bad.shape, np.float32)
    lists[role][-1] = bad
    assert_rejected(
        functional_adam(lists), every_array(lists), ValueError, role + BAD, "contiguous"
    )


@pytest.mark.parametrize("role", ["params", "exp_avg_sqs"])
def test_read_only_written_buffer_is_a_value_error(role: str) -> None:
    lists = adam_buffers()
    lists[role][-1] = read_only(np.float32)
    assert_rejected(functional_adam(lists), every_array(lists), ValueError, role + BAD, "read-only")


@pytest.mark.parametrize(
    "make, what",
    [(noncontiguous_1d, "not C-contiguous"), (transposed_2d, "not C-contiguous"),
     (read_only, "read-only")],
    ids=["strided", "transposed", "read-only"],
)  # fmt: skip
def test_a_param_no_step_could_update_is_refused_when_added(make: Callable, what: str) -> None:
    """A non-contiguous or read-only param was taken by the constructor and add_param_group,
    then refused by every step; a group cannot be taken out, so the optimizer was unusable."""
    good = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=rf"params\[1\] is {what}"):
        fusedopt.Adam([good, make(np.float32)])
    opt = fusedopt.Adam([good])
    with pytest.raises(ValueError, match=rf"params\[0\] is {what}"):
        opt.add_param_group({"params": [make(np.float32)]})
    assert len(opt.param_groups) == 1
    opt.step([np.ones(3, np.float32)])


def test_read_only_grad_is_fine_unless_grad_scale_writes_it_back() -> None:
    lists = adam_buffers()
    lists["grads"][-1] = read_only(np.float32)
    assert_rejected(
        functional_adam(lists, grad_scale=2.0),
        every_array(lists),
        ValueError,
        "grads" + BAD,
        "read-only",
    )
    before = checksum(*lists["params"])
    functional_adam(lists)()  # without grad_scale the grads are only read
    assert checksum(*lists["params"]) != before


@pytest.mark.parametrize(
    "alias",
    [
        lambda ls: ls["grads"].__setitem__(-1, ls["params"][-1]),  # grad is its param
        lambda ls: ls["grads"].__setitem__(-1, ls["params"][-1][:]),  # a view of its param
        lambda ls: ls["params"].__setitem__(-1, ls["params"][0]),  # the same param twice
        lambda ls: ls["exp_avgs"].__setitem__(-1, ls["params"][0]),  # a state is another param
        lambda ls: ls["exp_avg_sqs"].__setitem__(-1, ls["exp_avgs"][-1]),  # two states alike
    ],
    ids=[
        "grad_is_param",
        "grad_views_param",
        "param_twice",
        "state_is_other_param",
        "states_alike",
    ],
)
def test_overlapping_buffers_are_a_value_error(alias: Callable) -> None:
    lists = adam_buffers()
    alias(lists)
    assert_rejected(functional_adam(lists), every_array(lists), ValueError, "overlaps")


def test_overlap_of_part_of_a_buffer_is_a_value_error() -> None:
    storage = np.zeros(100, np.float32)
    lists = adam_buffers()
    lists["params"][0] = storage[:40]
    lists["params"][-1] = storage[39:79]  # one element shared
    assert_rejected(functional_adam(lists), every_array(lists) + [storage], ValueError, "overlaps")


def per_tensor_scalar_call(alias: str) -> tuple[Callable[[], None], list[np.ndarray]]:
    """A functional ASGD or NAdam call whose per-tensor scalar arrays alias as ``alias`` says,
    and every array it may write."""
    params, grads = fresh(np.float64, (N,), seed=1), fresh(np.float64, (N,), seed=2)
    states, more_states = fresh(np.float64, (N,), seed=3), fresh(np.float64, (N,), seed=4)
    storage = np.arange(1.0, 2 * N + 1)
    first, second = {
        "etas_is_mus": (storage[:N], storage[:N]),
        "etas_overlaps_mus": (storage[:N], storage[N - 1 : 2 * N - 1]),
        "etas_is_a_grad": (grads[0], storage[:N]),
        "mus_views_a_grad": (storage[:N], grads[1][::-1]),
        "mu_products_is_a_grad": (grads[0], None),
    }[alias]

    def call() -> None:
        if second is None:
            F.nadam_(params, grads, states, more_states, step=1, lr=0.1, mu_products=first)
        else:
            F.asgd_(params, grads, states, step=1, lr=0.1, etas=first, mus=second)

    return call, params + grads + states + more_states + [storage]


@pytest.mark.parametrize(
    "alias",
    [
        "etas_is_mus",
        "etas_overlaps_mus",
        "etas_is_a_grad",
        "mus_views_a_grad",
        "mu_products_is_a_grad",
    ],
)
def test_aliased_per_tensor_scalars_are_a_value_error(alias: str) -> None:
    call, buffers = per_tensor_scalar_call(alias)
    assert_rejected(call, buffers, ValueError, "overlaps")


def test_non_ndarray_grad_is_a_type_error() -> None:
    lists = adam_buffers()
    lists["grads"][-1] = [0.0] * 40
    assert_rejected(
        functional_adam(lists), every_array(lists), TypeError, "grads" + BAD, "numpy.ndarray"
    )


@pytest.mark.parametrize(
    ("role", "error", "what"),
    [
        ("params", TypeError, "None"),
        ("grads", TypeError, "None"),
        ("exp_avgs", ValueError, "missing"),
    ],
)
def test_none_tensor_is_refused(role: str, error: type, what: str) -> None:
    lists = adam_buffers()
    lists[role][-1] = None
    assert_rejected(functional_adam(lists), every_array(lists), error, role + BAD, what)


def test_missing_state_list_is_an_error() -> None:
    lists = adam_buffers()
    lists["max_exp_avg_sqs"] = None  # amsgrad needs them
    assert_rejected(
        functional_adam(lists), every_array(lists), (TypeError, ValueError), "max_exp_avg_sqs"
    )


@pytest.mark.parametrize("step", [0, -1, [1, 1, 0]], ids=["zero", "negative", "last_zero"])
def test_step_below_one_is_a_value_error(step: Any) -> None:
    lists = adam_buffers()
    call = lambda: F.adam_(**lists, step=step, lr=0.1, amsgrad=True)  # noqa: E731
    assert_rejected(call, every_array(lists), ValueError, "step")


def test_every_functional_entry_point_validates_before_writing() -> None:
    params, grads, states = fresh(seed=1), fresh(seed=2), [np.abs(a) for a in fresh(seed=3)]
    more_states = [np.abs(a) for a in fresh(seed=4)]
    grads[-1] = grads[-1].astype(np.float64)
    buffers = params + grads + states + more_states
    calls = [
        lambda: F.sgd_(params, grads, states, lr=0.1, momentum=0.9),
        lambda: F.adagrad_(params, grads, states, step=1, lr=0.1),
        lambda: F.rmsprop_(params, grads, states, more_states, lr=0.1, momentum=0.9),
    ]
    for call in calls:
        assert_rejected(call, buffers, TypeError, "grads" + BAD)


def test_unknown_convention_is_a_value_error() -> None:
    lists = adam_buffers()
    assert_rejected(
        functional_adam(lists, convention="jax"), every_array(lists), ValueError, "convention"
    )


# ------------------------------------------------------------------------ tensors: classes

OPTIMIZERS = {
    "SGD": lambda ps: fusedopt.SGD(ps, lr=0.1, momentum=0.9),
    "Adagrad": lambda ps: fusedopt.Adagrad(ps, lr=0.1),
    "RMSprop": lambda ps: fusedopt.RMSprop(ps, lr=0.1, momentum=0.5, centered=True),
    "Adam": lambda ps: fusedopt.Adam(ps, lr=0.1, amsgrad=True),
    "AdamW": lambda ps: fusedopt.AdamW(ps, lr=0.1),
}


def trained(name: str) -> tuple[Any, list[np.ndarray]]:
    """An optimizer of every param, after one good step (so all its state exists)."""
    params = fresh(seed=6)
    opt = OPTIMIZERS[name](params)
    opt.step(fresh(seed=7))
    return opt, params


def optimizer_buffers(opt: Any, params: list[np.ndarray], grads: list[Any]) -> list[np.ndarray]:
    states = [
        v for entry in opt.state.values() for v in entry.values() if isinstance(v, np.ndarray)
    ]
    return params + [g for g in grads if isinstance(g, np.ndarray)] + states


def steps_of(opt: Any) -> dict[int, Any]:
    return {i: entry.get("step") for i, entry in opt.state.items()}


def scalar_states_of(opt: Any) -> dict[int, dict[str, Any]]:
    """Every state that is not an array (the step, NAdam's mu_product, ASGD's eta and mu), which
    a checksum of the buffers does not cover."""
    return {
        i: {k: v for k, v in entry.items() if not isinstance(v, np.ndarray)}
        for i, entry in opt.state.items()
    }


BAD_GRADS = {
    "wrong_dtype": (lambda: np.zeros(40, np.float64), TypeError, "dtype"),
    "wrong_shape": (lambda: np.zeros(39, np.float32), ValueError, "shape"),
    "strided": (lambda: noncontiguous_1d(np.float32), ValueError, "contiguous"),
    "list": (lambda: [0.0] * 40, TypeError, "numpy.ndarray"),
    "none": (lambda: None, TypeError, "None"),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("bad", BAD_GRADS, ids=BAD_GRADS.keys())
def test_optimizer_step_with_a_bad_grad_changes_nothing(name: str, bad: str) -> None:
    opt, params = trained(name)
    make, error, what = BAD_GRADS[bad]
    grads: list[Any] = fresh(seed=8)
    grads[-1] = make()
    steps = steps_of(opt)
    assert_rejected(
        lambda: opt.step(grads), optimizer_buffers(opt, params, grads), error, "grads" + BAD, what
    )
    assert steps_of(opt) == steps


# Over two slices of 1024 tensors: a step checks and describes these grads on the pool's threads.
MANY = 3000
# Bad grads in two slices, the later one first in the list: the error names the first by index.
BAD_AT = (2900, 1500)


@pytest.mark.parametrize("bad", [*BAD_GRADS, "aliasing", "big_endian", "float16"], ids=str)
def test_a_bad_grad_among_many_tensors_is_named_by_the_first_index_and_changes_nothing(
    bad: str,
) -> None:
    previous = fusedopt.num_threads()
    fusedopt.set_num_threads(2)
    try:
        params = [np.full(40, 1.0, np.float32) for _ in range(MANY)]
        opt = fusedopt.Adam(params, lr=0.1)
        opt.step([np.ones(40, np.float32) for _ in range(MANY)])
        grads: list[Any] = [np.ones(40, np.float32) for _ in range(MANY)]
        if bad in BAD_GRADS:
            make, error, what = BAD_GRADS[bad]
        elif bad == "aliasing":
            make, error, what = None, ValueError, "overlaps params"
        else:  # a dtype fusedopt updates elsewhere, or one it does not: both named
            make = lambda: np.zeros(40, ">f4" if bad == "big_endian" else np.float16)  # noqa: E731
            error, what = TypeError, "dtype"
        for i in BAD_AT:
            grads[i] = params[i] if make is None else make()
        steps = steps_of(opt)
        assert_rejected(
            lambda: opt.step(grads),
            optimizer_buffers(opt, params, grads),
            error,
            f"grads[{min(BAD_AT)}]",
            what,
        )
        assert steps_of(opt) == steps
        grads[BAD_AT[0]] = grads[BAD_AT[1]] = np.ones(40, np.float32)
        opt.step(grads)  # the same optimizer steps again once the grads are good
        assert all(p[0] < 1.0 for p in params)
    finally:
        fusedopt.set_num_threads(previous)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_step_with_a_grad_aliasing_its_param_changes_nothing(name: str) -> None:
    opt, params = trained(name)
    grads = fresh(seed=8)
    grads[-1] = params[-1]
    assert_rejected(
        lambda: opt.step(grads), optimizer_buffers(opt, params, grads), ValueError, "overlaps"
    )


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_step_with_too_few_grads_changes_nothing(name: str) -> None:
    opt, params = trained(name)
    grads = fresh(seed=8)[:-1]
    assert_rejected(
        lambda: opt.step(grads),
        optimizer_buffers(opt, params, grads),
        ValueError,
        "grads",
        "expected 3",
    )


@pytest.mark.parametrize(
    "grads",
    [None, lambda: (g for g in fresh(seed=8)), lambda: {0: 1}, lambda: "grads", lambda: 3.0],
    ids=["None", "generator", "dict", "str", "float"],
)
def test_optimizer_step_with_grads_that_are_not_a_list_is_a_type_error_naming_grads(
    grads: Any,
) -> None:
    opt, params = trained("Adam")
    given = grads() if grads is not None else None
    assert_rejected(lambda: opt.step(given), optimizer_buffers(opt, params, []), TypeError, "grads")


def test_keras_apply_with_grads_that_are_not_iterable_is_a_type_error_naming_grads() -> None:
    variables = fresh()
    opt = fk.Adam(learning_rate=0.1)
    assert_rejected(lambda: opt.apply(None, variables), variables, TypeError, "grads")
    assert_rejected(lambda: opt.apply(3.0, variables), variables, TypeError, "grads")
    assert opt.iterations == 0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_param_made_read_only_after_construction_is_refused_by_the_step(name: str) -> None:
    """Construction refuses a read-only param (and a non-contiguous one: see
    test_a_param_no_step_could_update_is_refused_when_added); one made read-only after it is
    refused by the first step, with nothing changed."""
    params = fresh(seed=6)
    opt = OPTIMIZERS[name](params)
    params[-1].flags.writeable = False
    grads = [np.ones_like(p, order="C") for p in params]
    steps = steps_of(opt)
    assert_rejected(
        lambda: opt.step(grads), optimizer_buffers(opt, params, grads), ValueError, "params" + BAD
    )
    assert steps_of(opt) == steps


@pytest.mark.parametrize("cls", [fusedopt.SGD, fusedopt.Adam, fusedopt.AdamW])
def test_read_only_grad_with_grad_scale_changes_nothing(cls: type) -> None:
    params = fresh(seed=6)
    opt = cls(params, lr=0.1)
    grads = fresh(seed=8)
    grads[-1] = read_only(np.float32)
    assert_rejected(
        lambda: opt.step(grads, grad_scale=4.0),
        params + grads,
        ValueError,
        "grads" + BAD,
        "read-only",
    )
    opt.step(grads)  # read-only is fine when nothing writes the grads back


@pytest.mark.parametrize(
    ("make", "error", "what"),
    [
        (lambda: np.zeros(4, np.int64), TypeError, "dtype"),
        (lambda: np.zeros(4, np.longdouble), TypeError, "dtype"),
        (lambda: np.zeros(4, np.complex128), TypeError, "dtype"),
        (lambda: big_endian(np.float32), TypeError, "dtype"),
        (lambda: [0.0, 1.0], TypeError, "numpy.ndarray"),
    ],
    ids=["int64", "longdouble", "complex128", "big_endian", "list"],
)
def test_optimizer_construction_rejects_a_bad_param(make: Callable, error: type, what: str) -> None:
    params: list[Any] = fresh()
    params[-1] = make()
    for cls in (fusedopt.SGD, fusedopt.Adagrad, fusedopt.RMSprop, fusedopt.Adam, fusedopt.AdamW):
        with pytest.raises(error, match=r"params\[2\].*" + what):
            cls(params)
        with pytest.raises(error, match=what):
            cls([{"params": params[:1]}, {"params": params[1:]}])


def test_same_param_twice_is_refused_when_the_second_group_is_added() -> None:
    params = fresh()
    opt = fusedopt.Adam(params)
    with pytest.raises(ValueError, match=r"params\[0\]"):
        opt.add_param_group({"params": [params[0]]})
    assert len(opt.param_groups) == 1


def test_same_param_twice_in_one_list_is_refused_at_construction() -> None:
    params = fresh()
    params[-1] = params[0]
    with pytest.raises(ValueError, match=r"params\[2\] appears twice"):
        fusedopt.Adam(params, lr=0.1)


def test_same_param_twice_is_refused_by_the_core_before_any_write() -> None:
    params = fresh()
    params[-1] = params[0]
    states = [[np.zeros_like(p) for p in params] for _ in range(2)]
    grads = fresh(seed=2)
    assert_rejected(
        lambda: F.adam_(params, grads, *states, step=1, lr=0.1),
        params + grads + states[0] + states[1],
        ValueError,
        "overlaps",
    )


def test_empty_parameter_list_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="params"):
        fusedopt.Adam([])


# ------------------------------------------------------------------------ hyperparameters

NAN = math.nan
BAD_HYPERPARAMETERS = [
    (fusedopt.SGD, dict(lr=-0.1), "lr"),
    (fusedopt.SGD, dict(lr=NAN), "lr"),
    (fusedopt.SGD, dict(lr=math.inf), "lr"),
    (fusedopt.SGD, dict(momentum=-0.5), "momentum"),
    (fusedopt.SGD, dict(dampening=float("nan"), momentum=0.9), "dampening"),
    (fusedopt.SGD, dict(weight_decay=-1e-4), "weight_decay"),
    (fusedopt.SGD, dict(nesterov=True, momentum=0.0), "nesterov"),
    (fusedopt.SGD, dict(nesterov=True, momentum=0.9, dampening=0.1), "nesterov"),
    (fusedopt.Adagrad, dict(lr=-1.0), "lr"),
    (fusedopt.Adagrad, dict(lr_decay=-1.0), "lr_decay"),
    (fusedopt.Adagrad, dict(eps=-1e-10), "eps"),
    (fusedopt.Adagrad, dict(weight_decay=NAN), "weight_decay"),
    (fusedopt.Adagrad, dict(initial_accumulator_value=-0.1), "initial_accumulator_value"),
    (fusedopt.RMSprop, dict(alpha=-0.1), "alpha"),
    (fusedopt.RMSprop, dict(eps=-1.0), "eps"),
    (fusedopt.RMSprop, dict(momentum=-0.1), "momentum"),
    (fusedopt.RMSprop, dict(weight_decay=-0.1), "weight_decay"),
    (fusedopt.Adam, dict(lr=NAN), "lr"),
    (fusedopt.Adam, dict(betas=(1.0, 0.999)), "beta"),
    (fusedopt.Adam, dict(betas=(0.9, -0.1)), "beta"),
    (fusedopt.Adam, dict(betas=(0.9, NAN)), "beta"),
    (fusedopt.Adam, dict(betas=0.9), "betas"),
    (fusedopt.Adam, dict(eps=-1e-8), "eps"),
    (fusedopt.Adam, dict(weight_decay=-0.01), "weight_decay"),
    (fusedopt.AdamW, dict(weight_decay=-0.01), "weight_decay"),
    (fusedopt.AdamW, dict(betas=(0.9, 1.5)), "beta"),
    # The algorithms of spec sections 13-20, named as the user spelled the argument.
    (fusedopt.Adadelta, dict(lr=-0.1), "lr"),
    (fusedopt.Adadelta, dict(rho=1.5), "rho"),
    (fusedopt.Adadelta, dict(rho=-0.1), "rho"),
    (fusedopt.Adadelta, dict(rho=NAN), "rho"),
    (fusedopt.Adadelta, dict(eps=-1e-6), "eps"),
    (fusedopt.Adadelta, dict(weight_decay=-0.1), "weight_decay"),
    (fusedopt.Adadelta, dict(weight_decay=NAN), "weight_decay"),
    (fusedopt.Adamax, dict(lr=NAN), "lr"),
    (fusedopt.Adamax, dict(betas=(1.0, 0.999)), "betas[0]"),
    (fusedopt.Adamax, dict(betas=(NAN, 0.999)), "betas[0]"),
    (fusedopt.Adamax, dict(betas=(0.9, -0.1)), "betas[1]"),
    (fusedopt.Adamax, dict(eps=-1.0), "eps"),
    (fusedopt.Adamax, dict(weight_decay=-0.5), "weight_decay"),
    (fusedopt.NAdam, dict(lr=-1.0), "lr"),
    (fusedopt.NAdam, dict(betas=(-0.1, 0.999)), "betas[0]"),
    (fusedopt.NAdam, dict(betas=(0.9, 1.0)), "betas[1]"),
    (fusedopt.NAdam, dict(eps=NAN), "eps"),
    (fusedopt.NAdam, dict(momentum_decay=-4e-3), "momentum_decay"),
    (fusedopt.NAdam, dict(momentum_decay=NAN), "momentum_decay"),
    (fusedopt.NAdam, dict(weight_decay=-0.1, decoupled_weight_decay=True), "weight_decay"),
    (fusedopt.RAdam, dict(lr=-1e-3), "lr"),
    (fusedopt.RAdam, dict(betas=(1.0, 0.999)), "betas[0]"),
    (fusedopt.RAdam, dict(betas=(0.9, NAN)), "betas[1]"),
    (fusedopt.RAdam, dict(betas=(0.9, 1.5)), "betas[1]"),
    (fusedopt.RAdam, dict(eps=-1e-8), "eps"),
    (fusedopt.RAdam, dict(weight_decay=NAN), "weight_decay"),
    (fusedopt.Rprop, dict(lr=-0.01), "lr"),
    (fusedopt.Rprop, dict(lr=NAN), "lr"),
    (fusedopt.Rprop, dict(etas=(1.2, 0.5)), "etas[0]"),  # out of order
    (fusedopt.Rprop, dict(etas=(0.0, 1.2)), "etas[0]"),
    (fusedopt.Rprop, dict(etas=(-0.5, 1.2)), "etas[0]"),
    (fusedopt.Rprop, dict(etas=(1.0, 1.2)), "etas[0]"),
    (fusedopt.Rprop, dict(etas=(NAN, 1.2)), "etas[0]"),
    (fusedopt.Rprop, dict(etas=(0.5, 1.0)), "etas[1]"),
    (fusedopt.Rprop, dict(etas=(0.5, 0.9)), "etas[1]"),
    (fusedopt.Rprop, dict(etas=(0.5, NAN)), "etas[1]"),
    (fusedopt.Rprop, dict(etas=0.5), "etas"),
    (fusedopt.ASGD, dict(lr=-0.01), "lr"),
    (fusedopt.ASGD, dict(lr=NAN), "lr"),
    (fusedopt.ASGD, dict(weight_decay=-0.1), "weight_decay"),
    (fusedopt.ASGD, dict(weight_decay=NAN), "weight_decay"),
    (fusedopt.Lion, dict(lr=-1e-4), "lr"),
    (fusedopt.Lion, dict(betas=(1.1, 0.99)), "betas[0]"),
    (fusedopt.Lion, dict(betas=(NAN, 0.99)), "betas[0]"),
    (fusedopt.Lion, dict(betas=(0.9, -0.1)), "betas[1]"),
    (fusedopt.Lion, dict(weight_decay=-0.1), "weight_decay"),
    (fusedopt.Lion, dict(weight_decay=NAN), "weight_decay"),
]


def hyper_id(case: tuple) -> str:
    cls, options, _ = case
    return cls.__name__ + "-" + "-".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("case", BAD_HYPERPARAMETERS, ids=map(hyper_id, BAD_HYPERPARAMETERS))
def test_invalid_hyperparameter_is_refused_at_construction(case: tuple) -> None:
    cls, options, name = case
    with pytest.raises(ValueError, match=re.escape(name)):
        cls(fresh(), **options)


# initial_accumulator_value is read only when a param is added (as in torch), not at a step.
GROUP_HYPERPARAMETERS = [c for c in BAD_HYPERPARAMETERS if "initial_accumulator_value" not in c[1]]


@pytest.mark.parametrize("case", GROUP_HYPERPARAMETERS, ids=map(hyper_id, GROUP_HYPERPARAMETERS))
def test_invalid_hyperparameter_set_in_param_groups_is_refused_at_step(case: tuple) -> None:
    cls, options, name = case
    params = fresh()
    opt = cls(params, lr=0.1, momentum=0.9) if cls is fusedopt.SGD else cls(params, lr=0.1)
    opt.step(fresh(seed=1))
    opt.param_groups[0].update(options)
    grads = fresh(seed=2)
    scalar_states = scalar_states_of(opt)
    assert_rejected(
        lambda: opt.step(grads), optimizer_buffers(opt, params, grads), ValueError, name
    )
    assert scalar_states_of(opt) == scalar_states


def test_invalid_hyperparameter_in_an_added_group_is_refused() -> None:
    opt = fusedopt.Adam(fresh())
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [np.zeros(3, np.float32)], "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_non_numeric_hyperparameter_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="lr"):
        fusedopt.SGD(fresh(), lr="fast")


@pytest.mark.parametrize(
    "cls", [fusedopt.SGD, fusedopt.Adagrad, fusedopt.RMSprop, fusedopt.Adam, fusedopt.AdamW]
)
def test_unknown_keyword_is_a_type_error(cls: type) -> None:
    with pytest.raises(TypeError, match="momentun"):
        cls(fresh(), lr=0.1, momentun=0.9)


@pytest.mark.parametrize("cls", [fusedopt.SGD, fusedopt.Adam])
def test_unknown_key_in_a_param_group_is_a_value_error(cls: type) -> None:
    with pytest.raises(ValueError, match="momentun"):
        cls([{"params": fresh(), "momentun": 0.9}])
    opt = cls(fresh())
    with pytest.raises(ValueError, match="momentun"):
        opt.add_param_group({"params": [np.zeros(2, np.float32)], "momentun": 0.9})


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: fk.SGD(momentum=1.5), "momentum"),
        (lambda: fk.SGD(momentum=-0.1), "momentum"),
        (lambda: fk.SGD(learning_rate=-0.01), "learning_rate"),
        (lambda: fk.SGD(learning_rate=NAN), "learning_rate"),
        (lambda: fk.Adam(beta_1=1.0), "beta_1"),
        (lambda: fk.Adam(beta_2=-0.5), "beta_2"),
        (lambda: fk.Adam(epsilon=-1e-7), "epsilon"),
        (lambda: fk.Adagrad(initial_accumulator_value=-1.0), "initial_accumulator_value"),
        (lambda: fk.RMSprop(rho=-0.9), "rho"),
        (lambda: fk.AdamW(weight_decay=None), "weight_decay"),
        (lambda: fk.AdamW(weight_decay=-0.004), "weight_decay"),
        (lambda: fk.Adam(clipnorm=1.0, clipvalue=1.0), "clipnorm"),
        (lambda: fk.SGD(clipvalue=1.0, global_clipnorm=1.0), "global_clipnorm"),
        (lambda: fk.SGD(clipnorm=-1.0), "clipnorm"),
    ],
    ids=[
        "sgd_momentum_above_1",
        "sgd_momentum_negative",
        "lr_negative",
        "lr_nan",
        "beta_1_one",
        "beta_2_negative",
        "epsilon_negative",
        "accumulator_negative",
        "rho_negative",
        "adamw_weight_decay_none",
        "adamw_weight_decay_negative",
        "two_clips",
        "two_clips_global",
        "clipnorm_negative",
    ],
)
def test_keras_invalid_hyperparameter_is_a_value_error(make: Callable, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make()


def test_keras_invalid_learning_rate_set_later_is_refused_and_kept() -> None:
    opt = fk.Adam(learning_rate=0.01)
    with pytest.raises(ValueError, match="learning_rate"):
        opt.learning_rate = -1.0
    assert opt.learning_rate == np.float32(0.01)


# The Keras-convention algorithms of spec sections 14-21 (and a few of the original ones): each
# bad value must be refused naming Keras' argument, at construction and when set later.
KERAS_BAD_HYPERPARAMETERS = [
    (fk.Lion, dict(beta_1=0.0), "beta_1"),  # Keras' own refusal: Lion would be SignSGD
    (fk.Lion, dict(beta_1=-0.5), "beta_1"),
    (fk.Lion, dict(beta_1=1.5), "beta_1"),
    (fk.Lion, dict(beta_1=NAN), "beta_1"),
    (fk.Lion, dict(beta_2=-0.1), "beta_2"),
    (fk.Lion, dict(weight_decay=-0.1), "weight_decay"),
    (fk.Adadelta, dict(rho=1.5), "rho"),
    (fk.Adadelta, dict(rho=-0.1), "rho"),
    (fk.Adadelta, dict(rho=NAN), "rho"),
    (fk.Adadelta, dict(epsilon=-1e-7), "epsilon"),
    (fk.Adadelta, dict(weight_decay=NAN), "weight_decay"),
    (fk.Adamax, dict(beta_1=1.0), "beta_1"),
    (fk.Adamax, dict(beta_2=NAN), "beta_2"),
    (fk.Adamax, dict(epsilon=NAN), "epsilon"),
    (fk.Adamax, dict(weight_decay=-0.5), "weight_decay"),
    (fk.Nadam, dict(beta_1=-0.1), "beta_1"),
    (fk.Nadam, dict(beta_2=1.0), "beta_2"),
    (fk.Nadam, dict(epsilon=-1e-7), "epsilon"),
    (fk.Nadam, dict(weight_decay=-0.1), "weight_decay"),
    (fk.Lamb, dict(beta_1=1.0), "beta_1"),
    (fk.Lamb, dict(beta_2=-0.5), "beta_2"),
    (fk.Lamb, dict(beta_2=NAN), "beta_2"),
    (fk.Lamb, dict(epsilon=-1e-7), "epsilon"),
    (fk.Lamb, dict(weight_decay=-0.01), "weight_decay"),
    (fk.SGD, dict(momentum=1.5), "momentum"),
    (fk.Adam, dict(beta_1=1.0), "beta_1"),
    (fk.RMSprop, dict(rho=-0.9), "rho"),
]
KERAS_BAD_LEARNING_RATES = [
    (cls, dict(learning_rate=rate), "learning_rate")
    for cls in (fk.Adadelta, fk.Adamax, fk.Nadam, fk.Lion, fk.Lamb)
    for rate in (-0.01, NAN)
]


@pytest.mark.parametrize(
    "case",
    KERAS_BAD_HYPERPARAMETERS + KERAS_BAD_LEARNING_RATES,
    ids=map(hyper_id, KERAS_BAD_HYPERPARAMETERS + KERAS_BAD_LEARNING_RATES),
)
def test_keras_invalid_hyperparameter_is_refused_at_construction(case: tuple) -> None:
    cls, options, name = case
    with pytest.raises(ValueError, match=re.escape(name)):
        cls(**options)


@pytest.mark.parametrize(
    "case", KERAS_BAD_HYPERPARAMETERS, ids=map(hyper_id, KERAS_BAD_HYPERPARAMETERS)
)
def test_keras_invalid_hyperparameter_set_later_is_refused_at_apply(case: tuple) -> None:
    """Set as an attribute between steps (as a callback would): the next apply refuses it,
    naming it, and writes nothing: variables, slots, iterations and Nadam's u_product stay."""
    cls, options, name = case
    variables = fresh(seed=6)
    opt = cls(learning_rate=0.1)
    opt.apply(fresh(seed=7), variables)
    for key, value in options.items():
        setattr(opt, key, value)
    grads = fresh(seed=8)
    iterations = opt.iterations
    u_product = getattr(opt, "u_product", None)
    assert_rejected(
        lambda: opt.apply(grads, variables), variables + grads + opt.variables, ValueError, name
    )
    assert opt.iterations == iterations
    assert getattr(opt, "u_product", None) == u_product


def functional_call(name: str) -> tuple[Callable[[str], None], list[np.ndarray]]:
    """A call of ``fusedopt.functional.<name>`` with valid arrays and hyperparameters, taking
    only the convention; and every buffer it may write."""
    params, grads = fresh(seed=1), fresh(seed=2)
    states = {
        "radam_": {"exp_avgs": fresh(seed=3), "exp_avg_sqs": fresh(seed=4)},
        "rprop_": {"prevs": fresh(seed=3), "step_sizes": fresh(seed=4)},
        "asgd_": {"axs": fresh(seed=3), "etas": np.full(N, 0.1), "mus": np.ones(N)},
        "lamb_": {"exp_avgs": fresh(seed=3), "exp_avg_sqs": fresh(seed=4)},
    }[name]
    for key in ("exp_avg_sqs", "step_sizes"):
        if key in states:
            states[key] = [np.abs(a) for a in states[key]]
    step = {} if name == "rprop_" else {"step": 2}
    function = getattr(F, name)

    def call(convention: str) -> None:
        function(params, grads, **states, **step, lr=0.1, convention=convention)

    buffers = params + grads
    for value in states.values():  # a list per state buffer; ASGD's etas and mus are one array
        buffers += value if isinstance(value, list) else [value]
    return call, buffers


@pytest.mark.parametrize(
    ("name", "refused", "offered"),
    [
        ("radam_", "keras", "torch"),
        ("rprop_", "keras", "torch"),
        ("asgd_", "keras", "torch"),
        ("lamb_", "torch", "keras"),
    ],
)
def test_functional_refuses_the_convention_an_algorithm_lacks(
    name: str, refused: str, offered: str
) -> None:
    """RAdam, Rprop and ASGD exist only in torch's convention, LAMB only in Keras': asking for
    the other is a ValueError naming ``convention``, before anything is written; the same call
    with the convention offered goes through."""
    call, buffers = functional_call(name)
    assert_rejected(lambda: call(refused), buffers, ValueError, "convention")
    before = checksum(*buffers)
    call(offered)
    assert checksum(*buffers) != before


def test_keras_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="momentun"):
        fk.SGD(momentun=0.9)


@pytest.mark.parametrize(
    ("bad", "error", "name"),
    [
        (
            lambda vs: [np.zeros(40, np.float32)] * 2 + [np.zeros(40, np.float64)],
            TypeError,
            "grads" + BAD,
        ),
        (
            lambda vs: [np.zeros(40, np.float32)] * 2 + [np.zeros(41, np.float32)],
            ValueError,
            "grads" + BAD,
        ),
        (lambda vs: [np.zeros(40, np.float32)] * 2, ValueError, "grads"),
    ],
    ids=["dtype", "shape", "length"],
)
def test_keras_apply_with_bad_grads_changes_nothing(bad: Callable, error: type, name: str) -> None:
    variables = fresh(seed=6)
    opt = fk.Adam(learning_rate=0.1, amsgrad=True)
    opt.apply(fresh(seed=7), variables)
    grads = fresh(seed=8)
    if name.endswith(BAD):
        grads[-1] = bad(variables)[-1]
    else:
        grads = bad(variables)
    buffers = variables + grads + opt.variables
    iterations = opt.iterations
    assert_rejected(lambda: opt.apply(grads, variables), buffers, error, name)
    assert opt.iterations == iterations


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (2.0, TypeError),
        (True, TypeError),
        ("2", TypeError),
        (-1, ValueError),
        (2**62 + 1, ValueError),
    ],
)
def test_keras_iterations_set_to_what_no_step_can_count_is_refused(value: Any, error: type) -> None:
    """It was taken, and the next apply failed in the binding, naming nothing."""
    variables = fresh()
    opt = fk.Adam(learning_rate=0.1)
    opt.apply(fresh(seed=1), variables)
    with pytest.raises(error, match="iterations"):
        opt.iterations = value
    assert opt.iterations == 1
    opt.iterations = np.int64(5)  # a whole number of any integer type
    assert opt.apply(fresh(seed=2), variables) == 6


@pytest.mark.parametrize("kept", ["exp_avg", "master"])
def test_a_param_sharing_memory_with_a_kept_array_is_refused_when_added(kept: str) -> None:
    """A view of a state (or of a bfloat16 param's float32 master) added as a param: every step
    refused it as overlapping that state, and a group cannot be taken out, so the optimizer was
    stuck. Refused in add_param_group, naming the state; nothing added, the next step runs."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = np.dtype(ml_dtypes.bfloat16) if kept == "master" else np.float32
    param = np.ones(8, dtype)
    opt = fusedopt.Adam([param], lr=0.1, **({"master_weights": True} if kept == "master" else {}))
    opt.step([np.ones(8, dtype)])
    state = opt.state[0][kept]
    assert_rejected(
        lambda: opt.add_param_group({"params": [state[2:6]]}),
        [param, state],
        ValueError,
        f"state[0][{kept!r}]",
        "params[0]",
    )
    assert len(opt.param_groups) == 1
    opt.step([np.ones(8, dtype)])
    assert opt.state[0]["step"] == 2


@pytest.mark.parametrize("edit", ["append", "remove", "delete_key"])
def test_param_groups_edited_in_place_are_refused_saying_how(edit: str) -> None:
    """A group appended to param_groups without add_param_group (its params never registered),
    a group taken out, a hyperparameter deleted: the step refuses with a message naming the
    problem (a bare IndexError or KeyError('eps') before), and nothing is modified."""
    params = fresh(seed=1)
    opt = fusedopt.Adam(params[:2], lr=0.1)
    opt.add_param_group({"params": [params[2]]})
    grads = fresh(seed=2)
    opt.step(grads)
    if edit == "append":
        opt.param_groups.append({"params": (np.zeros(3, np.float32),), **opt.defaults})
        error, words = ValueError, ("param_groups holds 3 groups", "add_param_group")
    elif edit == "remove":
        del opt.param_groups[1]
        error, words = ValueError, ("param_groups holds 1 groups", "cannot be taken out")
    else:
        del opt.param_groups[1]["eps"]
        error, words = KeyError, ("param_groups[1] has no 'eps'",)
    buffers = params + [opt.state[i][k] for i in range(3) for k in ("exp_avg", "exp_avg_sq")]
    assert_rejected(lambda: opt.step(grads), buffers, error, *words)


def test_keras_errors_name_the_slots_as_keras_does() -> None:
    """keras_numpy's state shows Keras' slot names (momentum, velocity): an error about a state
    names it so, not by fusedopt's native name (exp_avg), and by the caller's position; a
    variable listed twice in a built optimizer's apply is named as such, not as two states
    that overlap."""
    variables = fresh(seed=3)
    opt = fk.Adam(learning_rate=0.1)
    opt.apply(fresh(seed=4), variables)
    grads = fresh(seed=5)
    grads[1] = opt.state[1]["momentum"]
    assert_rejected(
        lambda: opt.apply(grads, variables),
        variables,
        ValueError,
        "grads[1] overlaps the momentum of trainable_variables[1]",
    )
    twice = [variables[0], variables[0], variables[2]]
    with pytest.raises(ValueError, match=r"trainable_variables\[1\]: the same array appears"):
        opt.apply(fresh(seed=6), twice)
    assert opt.iterations == 1


def test_keras_the_last_iterations_count_is_reached_and_no_step_follows() -> None:
    """From 2**62 - 1 an apply steps to 2**62, the last count; the next apply is refused before
    it writes (the count's own check came after the update had written the variables)."""
    variables = fresh()
    opt = fk.Adam(learning_rate=0.1)
    opt.apply(fresh(seed=1), variables)
    opt.iterations = 2**62 - 1
    assert opt.apply(fresh(seed=2), variables) == 2**62
    opt.iterations = opt.iterations  # a count an apply reached can be set again
    assert_rejected(
        lambda: opt.apply(fresh(seed=3), variables),
        variables + [opt.state[i][k] for i in range(N) for k in ("momentum", "velocity")],
        ValueError,
        "2**62",
    )
    assert opt.iterations == 2**62


def test_keras_apply_to_a_variable_it_was_not_built_with_is_a_value_error() -> None:
    variables = fresh(seed=6)
    opt = fk.SGD(learning_rate=0.1)
    opt.apply(fresh(seed=7), variables)
    stranger = [variables[0], variables[1], np.zeros(40, np.float32)]
    assert_rejected(
        lambda: opt.apply(fresh(seed=8), stranger),
        variables + stranger,
        ValueError,
        "trainable_variables" + BAD,
    )


def test_keras_build_rejects_a_wrong_dtype() -> None:
    variables: list[Any] = fresh()
    variables[-1] = np.zeros(40, np.int32)
    with pytest.raises(TypeError, match=r"variables\[2\]"):
        fk.Adam().apply(fresh(seed=1), variables)


def _read_only(variables: list[np.ndarray]) -> np.ndarray:
    array = np.zeros(40, np.float32)
    array.flags.writeable = False
    return array


UNSTEPPABLE_VARIABLES = {  # a variable no step could update, made beside the good ones
    "not-contiguous": (lambda variables: np.zeros(80, np.float32)[::2], "is not C-contiguous"),
    "read-only": (_read_only, "is read-only"),
    "overlapping": (lambda variables: variables[0][:], "shares memory with"),
}


@pytest.mark.parametrize("how", ["apply", "build"])
@pytest.mark.parametrize("case", UNSTEPPABLE_VARIABLES)
def test_keras_a_refused_first_build_leaves_the_optimizer_unbuilt(case: str, how: str) -> None:
    """A variable no step could update is refused before anything is built: the optimizer keeps
    no variables and no slots, and a retry with corrected variables is built for those (it was
    refused as 'not one of the variables this optimizer was built with')."""
    make, what = UNSTEPPABLE_VARIABLES[case]
    variables = fresh()
    bad = [*variables[:-1], make(variables)]
    opt = fk.Adam(learning_rate=0.1, amsgrad=True)
    role = "trainable_variables" if how == "apply" else "variables"
    call = (lambda: opt.apply(fresh(seed=1), bad)) if how == "apply" else lambda: opt.build(bad)
    assert_rejected(call, variables, ValueError, f"{role}{BAD}", what)
    assert not opt.built and opt.iterations == 0
    assert opt.variables == [] and opt.state == {}
    opt.apply(fresh(seed=1), variables)
    reference = fresh()
    fk.Adam(learning_rate=0.1, amsgrad=True).apply(fresh(seed=1), reference)
    for a, b in zip(variables, reference):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------ state dicts


def sample_state_dict() -> tuple[Any, list[np.ndarray], dict]:
    params = fresh(seed=9)
    opt = fusedopt.Adam([{"params": params[:2]}, {"params": params[2:], "amsgrad": True}], lr=0.1)
    opt.step(fresh(seed=10))
    return opt, params, opt.state_dict()


def spoil_groups(sd: dict) -> None:
    sd["param_groups"] = sd["param_groups"][:1]


def spoil_group_size(sd: dict) -> None:
    sd["param_groups"][1]["params"] = [2, 3]


def spoil_shape(sd: dict) -> None:
    sd["state"][2]["exp_avg_sq"] = np.zeros(41, np.float32)


def spoil_name(sd: dict) -> None:
    sd["state"][2]["exp_avg_squared"] = sd["state"][2].pop("exp_avg_sq")


def spoil_step(sd: dict) -> None:
    sd["state"][2]["step"] = -1


def spoil_fractional_step(sd: dict) -> None:
    sd["state"][2]["step"] = 1.5


def spoil_index(sd: dict) -> None:
    sd["state"][3] = sd["state"][2]


def spoil_hyperparameter(sd: dict) -> None:
    sd["param_groups"][1]["lr"] = -0.1


def spoil_unknown_hyperparameter(sd: dict) -> None:
    sd["param_groups"][1]["momentun"] = 0.9


def spoil_dtype(sd: dict) -> None:
    sd["state"][2]["exp_avg"] = np.zeros(40, np.int32)


def spoil_missing_buffer(sd: dict) -> None:
    del sd["state"][2]["exp_avg_sq"]


def spoil_missing_step(sd: dict) -> None:
    del sd["state"][2]["step"]


def spoil_only_a_step(sd: dict) -> None:
    sd["state"][2] = {"step": 3}


def live_buffer_ids(opt: Any) -> dict[tuple[int, str], int]:
    return {
        (i, n): id(v)
        for i, e in opt.state.items()
        for n, v in e.items()
        if isinstance(v, np.ndarray)
    }


SPOILERS = [
    (spoil_groups, ValueError, "param groups"),
    (spoil_group_size, ValueError, "size"),
    (spoil_shape, ValueError, "shape"),
    (spoil_name, ValueError, "exp_avg_squared"),
    (spoil_step, ValueError, "step"),
    (spoil_fractional_step, ValueError, "step"),
    (spoil_index, ValueError, "param 3"),
    (spoil_hyperparameter, ValueError, "lr"),
    (spoil_unknown_hyperparameter, ValueError, "momentun"),
    (spoil_dtype, TypeError, "dtype"),
    (spoil_missing_buffer, ValueError, "state[2] has no 'exp_avg_sq'"),
    (spoil_missing_step, ValueError, "state[2] has no 'step'"),
    (spoil_only_a_step, ValueError, "state[2] has no 'exp_avg'"),
]


@pytest.mark.parametrize(
    ("spoil", "error", "what"), SPOILERS, ids=[s[0].__name__ for s in SPOILERS]
)
def test_state_dict_that_does_not_fit_is_refused_and_changes_nothing(
    spoil: Callable, error: type, what: str
) -> None:
    opt, params, sd = sample_state_dict()
    spoil(sd)
    before = opt.state_dict()
    live = optimizer_buffers(opt, params, [])
    live_ids = live_buffer_ids(opt)
    assert_rejected(lambda: opt.load_state_dict(sd), live, error, what)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for i, entry in before["state"].items():
        assert after["state"][i].keys() == entry.keys()
        for name, value in entry.items():
            np.testing.assert_array_equal(after["state"][i][name], value)
    assert live_buffer_ids(opt) == live_ids, "a refused load replaced a live buffer"


INCOMPLETE_ENTRIES = {  # the class, its options, the states dropped: the first is named
    "nadam_mu_product": (fusedopt.NAdam, {}, ("mu_product",)),
    "asgd_eta_and_mu": (fusedopt.ASGD, {}, ("eta", "mu")),
    "asgd_ax": (fusedopt.ASGD, {}, ("ax",)),
    "rmsprop_square_avg": (fusedopt.RMSprop, dict(momentum=0.9), ("square_avg",)),
    "adagrad_sum": (fusedopt.Adagrad, {}, ("sum",)),
    "rprop_step": (fusedopt.Rprop, {}, ("step",)),
    "lion_exp_avg": (fusedopt.Lion, {}, ("exp_avg",)),
}


@pytest.mark.parametrize("case", INCOMPLETE_ENTRIES)
def test_a_stepped_entry_without_a_state_its_algorithm_keeps_is_refused(case: str) -> None:
    """torch raises KeyError at the next step; loading it would start that state again beside
    the carried-over ones (a zero second moment under a trained first moment)."""
    cls, options, dropped = INCOMPLETE_ENTRIES[case]
    params = fresh(seed=9)
    opt = cls(params, **options)
    opt.step(fresh(seed=10))
    sd = opt.state_dict()
    sd["state"][1] = {k: v for k, v in sd["state"][1].items() if k not in dropped}
    live = optimizer_buffers(opt, params, [])
    scalars = scalar_states_of(opt)
    named = f"state[1] has no '{dropped[0]}'"
    assert_rejected(lambda: opt.load_state_dict(sd), live, ValueError, named)
    assert scalar_states_of(opt) == scalars


def test_flat_state_dict_with_a_foreign_key_is_refused() -> None:
    opt, params, sd = sample_state_dict()
    flat = fusedopt.flatten_state_dict(sd)
    flat["other/0/exp_avg"] = np.zeros(40, np.float32)
    assert_rejected(
        lambda: opt.load_state_dict(flat), optimizer_buffers(opt, params, []), ValueError, "other/0"
    )
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict({"exp_avg": np.zeros(3)})


# ------------------------------------------------------------------------ ewma

EWMA_BAD = [
    (dict(com=1.0, span=3.0), ValueError, "mutually exclusive"),
    (dict(alpha=0.5, halflife=2.0), ValueError, "mutually exclusive"),
    ({}, ValueError, "Must pass one of"),
    (dict(com=-0.5), ValueError, "com"),
    (dict(com=NAN), ValueError, "com"),
    (dict(span=0.5), ValueError, "span"),
    (dict(alpha=0.0), ValueError, "alpha"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(halflife=0.0), ValueError, "halflife"),
    (dict(halflife=-1.0), ValueError, "halflife"),
    (dict(com=1.0, min_periods=-1), ValueError, "min_periods"),
    (dict(com=1.0, min_periods=1.5), TypeError, "min_periods"),
    (dict(com=1.0, axis=2), ValueError, "axis"),
    (dict(com=1.0, axis=-3), ValueError, "axis"),
    # Used to raise NumPy's "truth value ambiguous", a bare TypeError, or run with bool('no').
    (dict(com=np.array([1.0, 2.0])), TypeError, "com"),
    (dict(com="1"), TypeError, "com"),
    (dict(span=1j), TypeError, "span"),
    (dict(halflife=None, alpha=[0.5, 0.5]), TypeError, "alpha"),
    (dict(com=1.0, adjust="no"), TypeError, "adjust"),
    (dict(com=1.0, ignore_na="no"), TypeError, "ignore_na"),
    (dict(com=1.0, adjust=2), TypeError, "adjust"),
    (dict(com=1.0, axis=True), TypeError, "axis"),
    (dict(com=1.0, axis=1.0), TypeError, "axis"),
]


@pytest.mark.parametrize(
    ("options", "error", "what"), EWMA_BAD, ids=[str(o) for o, _, _ in EWMA_BAD]
)
def test_ewma_bad_arguments(options: dict, error: type, what: str) -> None:
    x = np.arange(12.0).reshape(4, 3)
    before = checksum(x)
    with pytest.raises(error, match=what):
        fusedopt.ewma(x, **options)
    assert checksum(x) == before


@pytest.mark.parametrize(
    ("x", "error", "what"),
    [
        (np.zeros((2, 3, 4)), ValueError, "3-D"),
        (np.zeros(()), ValueError, "0-D"),
        (np.zeros(4, np.complex128), TypeError, "dtype"),
        (np.array(["a", "b"]), TypeError, "dtype"),
    ],
    ids=["3d", "0d", "complex", "strings"],
)
def test_ewma_bad_input_array(x: np.ndarray, error: type, what: str) -> None:
    with pytest.raises(error, match=what):
        fusedopt.ewma(x, com=1.0)


def test_ewma_axis_one_of_a_series_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="axis"):
        fusedopt.ewma(np.zeros(5), com=1.0, axis=1)


# ------------------------------------------------------- errors of the right type, naming the cause


def adam_with_state() -> Any:
    params = fresh()
    opt = fusedopt.Adam(params, lr=0.1)
    opt.step(fresh(seed=1))
    return opt, params


def corrupt(key: str, value: Any) -> Callable[[dict], dict]:
    def spoil(sd: dict) -> dict:
        sd[key] = value
        return sd

    return spoil


def step_of_param_0(value: Any) -> Callable[[dict], dict]:
    def spoil(sd: dict) -> dict:
        sd["state"][0]["step"] = value
        return sd

    return spoil


def without_params(sd: dict) -> dict:
    del sd["param_groups"][0]["params"]
    return sd


CORRUPTED_STATE_DICTS = {
    "step_inf": (step_of_param_0(math.inf), ValueError, "step"),
    "step_1e30": (step_of_param_0(1e30), ValueError, "step"),
    "step_nan": (step_of_param_0(math.nan), ValueError, "step"),
    "step_negative": (step_of_param_0(-1), ValueError, "step"),
    "step_text": (step_of_param_0("3"), TypeError, "step"),
    "step_bool": (step_of_param_0(True), TypeError, "state[0]['step']"),  # as param ids refuse it
    "step_numpy_bool": (step_of_param_0(np.array(True)), TypeError, "state[0]['step']"),
    "state_none": (corrupt("state", None), TypeError, "state"),
    "state_list": (corrupt("state", []), TypeError, "state"),
    "groups_none": (corrupt("param_groups", None), TypeError, "param_groups"),
    "group_without_params": (without_params, ValueError, "params"),
}


@pytest.mark.parametrize("case", CORRUPTED_STATE_DICTS, ids=CORRUPTED_STATE_DICTS.keys())
def test_a_corrupted_state_dict_raises_a_named_error_and_changes_nothing(case: str) -> None:
    spoil, error, what = CORRUPTED_STATE_DICTS[case]
    opt, params = adam_with_state()
    sd = spoil(opt.state_dict())
    live = optimizer_buffers(opt, params, [])
    steps = steps_of(opt)
    assert_rejected(lambda: opt.load_state_dict(sd), live, error, what)
    assert steps_of(opt) == steps


def test_a_flat_state_dict_with_a_non_string_key_is_refused() -> None:
    opt, params = adam_with_state()
    flat = dict(fusedopt.flatten_state_dict(opt.state_dict()))
    flat[7] = np.zeros(3)
    assert_rejected(
        lambda: opt.load_state_dict(flat), optimizer_buffers(opt, params, []), TypeError, "7"
    )


@pytest.mark.parametrize("option", ["clipnorm", "global_clipnorm", "clipvalue"])
@pytest.mark.parametrize("grad", [[1.0, 2.0], "grad"], ids=["list", "str"])
def test_keras_clipping_a_grad_that_is_not_an_array_is_a_type_error(option: str, grad: Any) -> None:
    variables = fresh()
    opt = fk.Adam(learning_rate=0.1, **{option: 1.0})
    grads: list[Any] = fresh(seed=1)
    grads[1] = grad
    assert_rejected(lambda: opt.apply(grads, variables), variables, TypeError, "grads[1]")
    assert opt.iterations == 0


def test_a_one_element_list_hyperparameter_is_accepted_and_usable() -> None:
    """torch accepts a one-element tensor for a hyperparameter; a one-element list is read the
    same way, at construction, at every step and in load_state_dict (it used to be accepted and
    then refused at every step)."""
    params = fresh()
    opt = fusedopt.RMSprop(params, lr=0.1, momentum=[0.5])
    opt.step(fresh(seed=1))
    assert "momentum_buffer" in opt.state[0]
    reference_params = fresh()
    fusedopt.RMSprop(reference_params, lr=0.1, momentum=0.5).step(fresh(seed=1))
    for a, b in zip(params, reference_params):
        np.testing.assert_array_equal(a, b)
    opt.load_state_dict(opt.state_dict())
    opt.step(fresh(seed=2))


FUNCTIONAL_BAD_ARGUMENTS = [
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(lr=None), TypeError, "lr"),
    (dict(lr=0.1, convention=None), ValueError, "convention"),
    (dict(lr=0.1, momentum=0.9, nesterov="yes"), TypeError, "nesterov"),
    (dict(lr=0.1, grad_scale="2"), TypeError, "grad_scale"),
    (dict(lr=0.1, maximize=2), TypeError, "maximize"),
    (dict(lr=0.1, first_step="yes"), TypeError, "first_step"),
    # Checked as the classes check it, stochastic_rounding on or off (it was ignored when off).
    (dict(lr=0.1, seed="x"), TypeError, "seed"),
    (dict(lr=0.1, seed=-1), ValueError, "seed"),
]


@pytest.mark.parametrize(
    "kwargs, error, what",
    FUNCTIONAL_BAD_ARGUMENTS,
    ids=[next(k for k in reversed(c[0])) for c in FUNCTIONAL_BAD_ARGUMENTS],
)
def test_functional_bad_arguments_name_the_argument(kwargs: dict, error: type, what: str) -> None:
    params, grads, buffers = fresh(), fresh(seed=1), [np.zeros(40, np.float32) for _ in range(3)]
    assert_rejected(
        lambda: F.sgd_(params, grads, buffers, **kwargs), params + grads + buffers, error, what
    )


@pytest.mark.parametrize("step", [2**63, 2**62 + 1, -(2**63)])
def test_functional_step_out_of_range_is_refused(step: int) -> None:
    params, grads = fresh(), fresh(seed=1)
    states = [[np.zeros(40, np.float32) for _ in range(3)] for _ in range(2)]
    buffers = params + grads + states[0] + states[1]
    assert_rejected(
        lambda: F.adam_(params, grads, *states, step=step, lr=0.1), buffers, ValueError, "step"
    )


def test_params_that_share_memory_are_refused_when_added() -> None:
    """Views of one array as two params: every step refused them, and a group cannot be taken
    out. Refused at construction and in add_param_group, naming both, nothing added."""
    storage = np.ones(10, np.float32)
    with pytest.raises(ValueError, match=r"params\[1\] shares memory with params\[0\]"):
        fusedopt.Adam([storage[:6], storage[4:]])
    opt = fusedopt.Adam([storage[:5]])
    with pytest.raises(ValueError, match=r"shares memory with params\[0\] of param_groups\[0\]"):
        opt.add_param_group({"params": [storage[4:]]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [storage[5:]]})  # beside it, not over it
    opt.step([np.ones(5, np.float32), np.ones(5, np.float32)])
