"""Behaviours found by a review with hostile inputs: each test reproduces what went wrong."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import fusedopt
import fusedopt.functional as F
import fusedopt.keras_numpy as fk
from fusedopt import reference


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses bash's ulimit")
def test_a_step_runs_when_the_system_refuses_worker_threads() -> None:
    # 1000 threads of 8 MiB stacks do not fit in 3 GB of address space: the pool gets fewer
    # workers (it used to hang, destroying a condition variable its workers waited on).
    code = (
        "import numpy as np, fusedopt; fusedopt.set_num_threads(1000); "
        "p = [np.ones(200000)]; fusedopt.SGD(p, lr=0.1).step([np.ones(200000)]); "
        "print(p[0].min(), p[0].max())"
    )
    run = subprocess.run(
        ["bash", "-c", f'ulimit -v 3000000; exec "{sys.executable}" -c "{code}"'],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0.9", "0.9"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
def test_a_zero_learning_rate_leaves_a_negative_zero_param_alone(dtype: type, isa: str) -> None:
    # The vector lanes made each constant as 0 + c, which turned -lr = -0.0 into +0.0: a -0 param
    # became +0 in the vector body, and stayed -0 in the tail and on the scalar path, as in torch.
    params = np.full(37, -0.0, dtype)
    F.sgd_([params], [np.ones(37, dtype)], lr=0.0)
    assert np.all(np.signbit(params))


def _sgd_signs_functional(lrs: list[float]) -> list[bool]:
    signs = []
    for lr in lrs:
        p = np.array([-0.0], np.float32)
        F.sgd_([p], [np.ones(1, np.float32)], lr=lr)
        signs.append(bool(np.signbit(p[0])))
    return signs


def _sgd_signs_class(lrs: list[float]) -> list[bool]:
    p = np.array([-0.0], np.float32)
    opt, signs = fusedopt.SGD([p], lr=lrs[0]), []
    for lr in lrs:
        p[...] = -0.0
        opt.param_groups[0]["lr"] = lr
        opt.step([np.ones(1, np.float32)])
        signs.append(bool(np.signbit(p[0])))
    return signs


def _sgd_signs_keras_numpy(lrs: list[float]) -> list[bool]:
    v = np.array([-0.0], np.float32)
    opt, signs = fk.SGD(learning_rate=lrs[0]), []
    for lr in lrs:
        v[...] = -0.0
        opt.learning_rate = lr
        opt.apply([np.ones(1, np.float32)], [v])
        signs.append(bool(np.signbit(v[0])))
    return signs


def _sgd_signs_torch(lrs: list[float]) -> list[bool]:
    torch = pytest.importorskip("torch")
    import fusedopt.torch as ftorch

    p = torch.nn.Parameter(torch.tensor([-0.0]))
    opt, signs = ftorch.SGD([p], lr=lrs[0]), []
    for lr in lrs:
        with torch.no_grad():
            p.fill_(-0.0)
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.ones(1)
        opt.step()
        signs.append(bool(torch.signbit(p.detach())[0]))
    return signs


@pytest.mark.parametrize(
    "signs",
    [_sgd_signs_functional, _sgd_signs_class, _sgd_signs_keras_numpy, _sgd_signs_torch],
    ids=["functional", "class", "keras_numpy", "torch"],
)
def test_a_negative_zero_learning_rate_is_not_taken_for_a_cached_zero(signs) -> None:
    # -0.0 - (-0.0 * 1) is +0 and -0.0 - (0.0 * 1) is -0, in torch and Keras alike; the option
    # caches compared lr with ==, for which -0.0 == 0.0, and stepped lr=-0.0 with the options
    # of an earlier lr=0.0 (or the reverse), so the result depended on the calls before.
    assert signs([0.0, -0.0, 0.0, -0.0]) == [True, False, True, False]
    assert signs([-0.0, 0.0]) == [False, True]


def test_the_functional_api_reads_an_array_hyperparameter_changed_in_place() -> None:
    """The functional API reuses the last call's options when it is given the very same value
    objects: an array is the same object after an in-place change, so it must not be reused."""
    lr = np.array(0.1)
    p = np.ones(4)
    for _ in range(2):
        F.sgd_([p], [np.full(4, 0.5)], lr=lr)
        lr[()] = 10.0
    np.testing.assert_allclose(p, 1 - 0.05 - 5.0)
    rate = 0.25  # the same float object at each call: its options are reused
    for _ in range(2):
        F.sgd_([p], [np.full(4, 1.0)], lr=rate)
    np.testing.assert_allclose(p, 1 - 0.05 - 5.0 - 0.5)


def test_a_hyperparameter_changed_in_place_takes_effect() -> None:
    lr = np.array(0.1)
    p = np.ones(4)
    opt = fusedopt.SGD([p], lr=lr)
    opt.step([np.full(4, 0.5)])
    lr[()] = 10.0
    opt.step([np.full(4, 0.5)])
    np.testing.assert_allclose(p, 1 - 0.05 - 5.0)

    q, expected = np.ones(3), (np.ones(3), {})
    betas = [0.9, 0.999]
    opt = fusedopt.Adam([q], lr=0.1, betas=betas)
    for beta1 in (0.9, 0.0):
        opt.param_groups[0]["betas"][0] = beta1
        g = np.array([0.5, -1.0, 2.0]) * (1 + beta1)
        opt.step([g])
        expected = reference.torch_adam(*expected[:1], g, expected[1], lr=0.1, beta1=beta1)
    np.testing.assert_allclose(q, expected[0], rtol=1e-12)


def test_a_value_set_back_to_an_earlier_object_steps_with_that_values_options() -> None:
    """A step at the very value objects of the last one reuses the plan's options without
    reading them (step_if_unchanged); after lr a -> b -> a, the third step must use a's."""
    a, b = 0.5, 0.125
    p = np.ones(3)
    opt = fusedopt.SGD([p], lr=a)
    g = np.array([1.0, -2.0, 4.0])
    expected = np.ones(3)
    for lr in (a, a, b, b, a, a):
        opt.param_groups[0]["lr"] = lr
        opt.step([g])
        expected = expected - lr * g
        np.testing.assert_array_equal(p, expected)


def test_a_group_dict_subclass_is_read_through_its_own_getitem() -> None:
    class TenfoldLr(dict):
        def __getitem__(self, key):
            value = super().__getitem__(key)
            return value * 10 if key == "lr" else value

    p = np.ones(2)
    opt = fusedopt.SGD([p], lr=0.01)
    opt.step([np.ones(2)])
    opt.step([np.ones(2)])  # now on the path that compares the group's values in C++
    opt.param_groups[0] = TenfoldLr(opt.param_groups[0])
    opt.step([np.ones(2)])
    opt.step([np.ones(2)])
    np.testing.assert_allclose(p, 1 - 2 * 0.01 - 2 * 0.1)


def test_a_group_key_whose_eq_empties_param_groups_mid_check_does_not_crash() -> None:
    """A key hashing like "lr" is compared with it (its __eq__ runs) when the step looks the
    group's values up; here that empties the list being read."""
    p = np.ones(2)
    opt = fusedopt.SGD([p], lr=0.5)
    armed = False

    class Colliding:
        def __hash__(self) -> int:
            return hash("lr")

        def __eq__(self, other: object) -> bool:
            if armed:
                opt.param_groups.clear()
            return False

    opt.step([np.ones(2)])
    group = {Colliding(): None}  # first, so that a lookup of "lr" meets it first
    group.update(opt.param_groups[0])
    opt.param_groups[0] = group
    opt.step([np.ones(2)])
    np.testing.assert_allclose(p, [0.0, 0.0])
    armed = True
    try:
        opt.step([np.ones(2)])
    except (IndexError, KeyError, ValueError):
        pass  # what a step over groups that vanished may say
    assert not opt.param_groups
    assert np.array_equal(p, [0.0, 0.0]) or np.array_equal(p, [-0.5, -0.5])  # at most one step


def test_an_optimizer_reset_by_its_own_hyperparameter_check_steps_as_reset() -> None:
    """User code that runs while a step checks the groups (here a key's __eq__) may reset the
    optimizer: the step then uses the new state, not the plan it read before."""
    p = np.zeros(2)
    opt = fusedopt.SGD([p], lr=1.0, momentum=0.9)
    armed = False

    class ResetsWhenCompared:
        def __hash__(self) -> int:
            return hash("lr")

        def __eq__(self, other: object) -> bool:
            nonlocal armed
            if armed:
                armed = False
                opt.reset_state()
            return False

    g = np.ones(2)
    opt.step([g])
    opt.step([g])
    group = {ResetsWhenCompared(): None}
    group.update(opt.param_groups[0])
    opt.param_groups[0] = group
    before = p.copy()
    armed = True
    opt.step([g])
    np.testing.assert_array_equal(before - p, g)  # a first step's momentum: the grad itself
    np.testing.assert_array_equal(opt.state[0]["momentum_buffer"], g)


def test_a_param_groups_list_subclass_is_read_through_its_own_methods() -> None:
    class TenfoldLr(list):
        def __iter__(self):
            for group in list.__iter__(self):
                yield {**group, "lr": group["lr"] * 10}

    p = np.ones(2)
    opt = fusedopt.SGD([p], lr=0.01)
    opt.step([np.ones(2)])
    opt.step([np.ones(2)])
    opt.param_groups = TenfoldLr(opt.param_groups)
    opt.step([np.ones(2)])
    opt.step([np.ones(2)])
    np.testing.assert_allclose(p, 1 - 2 * 0.01 - 2 * 0.1)


def test_a_class_with_fewer_than_two_hyperparameters_can_be_declared() -> None:
    from fusedopt.optim import Hyperparameter, Optimizer

    class FixedSGD(Optimizer):
        _algorithm = "sgd"
        _hyperparameters = ()

    class SGDWithLrOnly(Optimizer):
        _algorithm = "sgd"
        _hyperparameters = (Hyperparameter("lr"),)

    p, q = np.ones(2), np.ones(2)
    fixed = FixedSGD([p])
    with_lr = SGDWithLrOnly([q], lr=0.5)
    for _ in range(2):
        fixed.step([np.ones(2)])
        with_lr.step([np.ones(2)])
    np.testing.assert_allclose(q, 1 - 2 * 0.5)
    assert fixed._values_of(fixed.param_groups[0]) == ()
    assert with_lr._values_of(with_lr.param_groups[0]) == (0.5,)


def test_replacing_a_groups_params_is_refused_not_ignored() -> None:
    old, new = np.ones(3), np.ones(3)
    opt = fusedopt.SGD([old], lr=0.1)
    opt.param_groups[0]["params"] = [new]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\] was replaced"):
        opt.step([np.ones(3)])
    np.testing.assert_array_equal(old, 1.0)
    with pytest.raises(AttributeError):
        fusedopt.SGD([old], lr=0.1).param_groups[0]["params"].append(new)


def test_an_optimizer_with_only_empty_groups_steps_as_a_no_op() -> None:
    opt = fusedopt.SGD([{"params": []}], lr=0.1)
    opt.step([])
    assert opt.state == {}


@pytest.mark.parametrize("value", [None, b"1", "0.1"])
def test_a_non_numeric_learning_rate_is_a_type_error(value: object) -> None:
    with pytest.raises(TypeError, match="lr"):
        fusedopt.SGD([np.ones(2)], lr=value)


@pytest.mark.parametrize(
    ("step", "error", "match"),
    [
        (2.5, TypeError, "whole number"),
        ([1, 2], ValueError, "one per param"),
        (0, ValueError, ">= 1"),
    ],
)
def test_functional_step_is_checked(step: object, error: type, match: str) -> None:
    p, g, m, v = np.ones(3), np.ones(3), np.zeros(3), np.zeros(3)
    with pytest.raises(error, match=match):
        F.adam_([p], [g], [m], [v], step=step, lr=0.1)
    np.testing.assert_array_equal(p, 1.0)


def test_keras_apply_with_no_gradient_at_all_is_an_error() -> None:
    opt = fk.SGD(learning_rate=0.1)
    with pytest.raises(ValueError, match="No gradients provided"):
        opt.apply([None], [np.ones(2)])
    assert opt.iterations == 0


@pytest.mark.parametrize("adjust", [True, False])
@pytest.mark.parametrize("ignore_na", [True, False])
def test_ewma_reads_infinities_as_missing_like_pandas(adjust: bool, ignore_na: bool) -> None:
    x = np.array([1.0, np.inf, 2.0, -np.inf, 3.0, np.nan, 4.0])
    kwargs = dict(alpha=0.3, adjust=adjust, ignore_na=ignore_na)
    np.testing.assert_array_equal(fusedopt.ewma(x, **kwargs), reference.ewma(x, **kwargs))
    np.testing.assert_array_equal(
        fusedopt.ewma(np.array([np.inf, 1.0, 2.0]), alpha=0.5), [np.nan, 1.0, 5 / 3]
    )
    pd = pytest.importorskip("pandas")
    expected = pd.Series(x).ewm(**kwargs).mean().to_numpy()
    np.testing.assert_array_equal(fusedopt.ewma(x, **kwargs), expected)
    table = np.stack([x, x[::-1]], axis=1)
    np.testing.assert_array_equal(
        fusedopt.ewma(table, **kwargs), pd.DataFrame(table).ewm(**kwargs).mean().to_numpy()
    )


def test_ewma_reads_masked_values_as_missing() -> None:
    x = np.ma.masked_array([1.0, 100.0, 3.0], mask=[0, 1, 0])
    np.testing.assert_array_equal(
        fusedopt.ewma(x, alpha=0.5), fusedopt.ewma(np.array([1.0, np.nan, 3.0]), alpha=0.5)
    )


def test_ewma_infinities_in_many_series_side_by_side_match_the_reference(isa: str) -> None:
    rng = np.random.default_rng(9)
    table = rng.standard_normal((300, 37))
    table[rng.random(table.shape) < 0.05] = np.inf
    table[rng.random(table.shape) < 0.05] = -np.inf
    table[rng.random(table.shape) < 0.05] = np.nan
    for adjust in (True, False):
        kwargs = dict(com=2.5, adjust=adjust, min_periods=3)
        np.testing.assert_array_equal(
            fusedopt.ewma(table, **kwargs), reference.ewma(table, **kwargs)
        )


class _InterruptedAsItReturns:
    """A plan whose step runs and then raises KeyboardInterrupt, once among all such plans, as
    a Ctrl-C that arrived during the native step is raised when it returns (Python delivers
    signals between bytecodes)."""

    pending = [True]

    def __init__(self, plan: object) -> None:
        self._plan = plan

    def __getattr__(self, name: str) -> object:
        return getattr(self._plan, name)

    def step(self, *args: object) -> object:
        result = self._plan.step(*args)
        if self.pending.pop() if self.pending else False:
            raise KeyboardInterrupt
        return result


def test_an_interrupt_as_the_first_numpy_step_returns_keeps_that_step(monkeypatch) -> None:
    """The step took place, so its bookkeeping must too: SGD's first-step rule applied again at
    the next step (its momentum buffer 0.5 instead of 0.95)."""
    import fusedopt.optim

    make_plan = fusedopt.optim.make_plan
    results = []
    for interrupted in (False, True):
        if interrupted:
            monkeypatch.setattr(_InterruptedAsItReturns, "pending", [True])
            monkeypatch.setattr(
                fusedopt.optim,
                "make_plan",
                lambda *a, **k: _InterruptedAsItReturns(make_plan(*a, **k)),
            )
        params = [np.ones(8, np.float32)]
        opt = fusedopt.SGD(params, lr=0.1, momentum=0.9)
        try:
            opt.step([np.full(8, 0.5, np.float32)])
            assert not interrupted
        except KeyboardInterrupt:
            assert interrupted
        opt.step([np.full(8, 0.5, np.float32)])
        results.append((params[0].copy(), opt.state[0]["momentum_buffer"].copy()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_an_interrupt_as_the_first_torch_step_returns_keeps_that_step(monkeypatch, name) -> None:
    """fusedopt.torch took back the state its first step had made (a refusal writes nothing),
    though the params had been updated: Adam's step count restarted, SGD's momentum buffer too."""
    torch = pytest.importorskip("torch")
    import fusedopt.torch as ftorch
    from fusedopt import _core

    make = _core.TorchPlan
    results = []
    for interrupted in (False, True):
        if interrupted:
            monkeypatch.setattr(_InterruptedAsItReturns, "pending", [True])
            monkeypatch.setattr(
                _core, "TorchPlan", lambda *a, **k: _InterruptedAsItReturns(make(*a, **k))
            )
        p = torch.nn.Parameter(torch.ones(8))
        opt = getattr(ftorch, name)([p], lr=0.1, **({"momentum": 0.9} if name == "SGD" else {}))
        p.grad = torch.full((8,), 0.5)
        try:
            opt.step()
            assert not interrupted
        except KeyboardInterrupt:
            assert interrupted
        p.grad = torch.full((8,), 0.25)
        opt.step()
        results.append([p.detach().clone(), *(v.clone() for v in opt.state[p].values())])
    for a, b in zip(*results):
        assert torch.equal(a, b)
