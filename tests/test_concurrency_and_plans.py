"""Threads, and the registered buffers of plans.

One optimizer's steps are serialized by its lock: two threads stepping it give the result of the
same number of steps in turn, never a crash or a lost update (before the lock, two threads taking
the first step of one Adam freed a buffer the kernel was reading). Different optimizers step in
parallel. A plan registers params and states once; whatever happens to them afterwards (replaced,
resized, made read-only, swapped by load_state_dict, freed) is caught before anything is written
through a stale description.
"""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

import fusedopt
import fusedopt.functional as F
import fusedopt.keras_numpy as fk
from conftest import checksum

SIZE = 1 << 17  # above the single-thread threshold: steps use the pool and release the GIL


def run_threads(target: Callable[[], None], count: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - reported to the test
            errors.append(error)

    threads = [threading.Thread(target=guarded) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


OPTIMIZERS = {
    "adam": lambda p: fusedopt.Adam(p, lr=1e-2),
    "adamw": lambda p: fusedopt.AdamW(p, lr=1e-2),
    "sgd_momentum": lambda p: fusedopt.SGD(p, lr=1e-2, momentum=0.9),
    "rmsprop_momentum": lambda p: fusedopt.RMSprop(p, lr=1e-2, momentum=0.9),
    "nadam": lambda p: fusedopt.NAdam(p, lr=1e-2),
    "asgd": lambda p: fusedopt.ASGD(p, lr=1e-2, t0=2),
}


def sequential(make: Callable, grads: list[np.ndarray], steps: int) -> tuple[list, dict]:
    params = [np.zeros(g.size, g.dtype) for g in grads]
    opt = make(params)
    for _ in range(steps):
        opt.step(grads)
    return params, opt.state


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for i in expected:
        assert actual[i].keys() == expected[i].keys()
        for name, value in expected[i].items():
            np.testing.assert_array_equal(actual[i][name], value, err_msg=f"state[{i}][{name}]")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_two_threads_taking_the_first_step_give_two_steps(name: str) -> None:
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(n).astype(np.float32) for n in (SIZE, 7)]
    for _ in range(5):  # the crash needed a race: try it several times
        params = [np.zeros(g.size, np.float32) for g in grads]
        opt = OPTIMIZERS[name](params)
        assert run_threads(lambda opt=opt: opt.step(grads), 2) == []
        expected_params, expected_state = sequential(OPTIMIZERS[name], grads, 2)
        for actual, expected in zip(params, expected_params):
            np.testing.assert_array_equal(actual, expected)
        assert_same_state(opt.state, expected_state)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_concurrent_steps_on_one_optimizer_are_serialized(name: str) -> None:
    """Four threads, five steps each, the same grads: exactly twenty steps, none lost (before
    the lock, SGD lost up to 124,120 of 300,000 element updates and Adam reused step counts)."""
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal(SIZE) for _ in range(2)]
    params = [np.zeros(SIZE) for _ in range(2)]
    opt = OPTIMIZERS[name](params)

    def five_steps() -> None:
        for _ in range(5):
            opt.step(grads)

    assert run_threads(five_steps, 4) == []
    expected_params, expected_state = sequential(OPTIMIZERS[name], grads, 20)
    for actual, expected in zip(params, expected_params):
        np.testing.assert_array_equal(actual, expected)
    assert_same_state(opt.state, expected_state)


def test_different_optimizers_step_in_parallel_with_their_own_results() -> None:
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(SIZE).astype(np.float32)]
    optimizers = [OPTIMIZERS[name]([np.zeros(SIZE, np.float32)]) for name in OPTIMIZERS]
    barrier = threading.Barrier(len(optimizers))

    def run(opt: Any) -> Callable[[], None]:
        def steps() -> None:
            barrier.wait()
            for _ in range(3):
                opt.step(grads)

        return steps

    threads = [threading.Thread(target=run(opt)) for opt in optimizers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, opt in zip(OPTIMIZERS, optimizers):
        expected, _ = sequential(OPTIMIZERS[name], grads, 3)
        np.testing.assert_array_equal(opt.param_groups[0]["params"][0], expected[0], err_msg=name)


def test_load_state_dict_racing_steps_leaves_a_consistent_optimizer() -> None:
    rng = np.random.default_rng(4)
    grads = [rng.standard_normal(SIZE)]
    params = [np.zeros(SIZE)]
    opt = fusedopt.Adam(params, lr=1e-2)
    opt.step(grads)
    saved = opt.state_dict()
    stop = threading.Event()

    def step_loop() -> None:
        while not stop.is_set():
            opt.step(grads)

    def load_loop() -> None:
        for _ in range(20):
            opt.load_state_dict(saved)
        stop.set()

    stepper = threading.Thread(target=step_loop)
    stepper.start()
    load_loop()
    stepper.join()
    state = opt.state[0]
    assert state["step"] >= 1
    assert np.all(np.isfinite(state["exp_avg"])) and np.all(state["exp_avg_sq"] >= 0)


def test_a_grads_list_changed_by_another_thread_mid_step_is_safe() -> None:
    """The step keeps a reference to every grad it reads: a list item replaced (and its array
    freed) by another thread cannot pull memory from under the kernel."""
    params = [np.zeros(SIZE) for _ in range(4)]
    opt = fusedopt.SGD(params, lr=0.1)
    grads = [np.ones(SIZE) for _ in range(4)]
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            grads[1] = np.ones(SIZE)

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        for _ in range(50):
            opt.step(grads)
    finally:
        stop.set()
        churner.join()
    expected = np.zeros(SIZE)
    reference = fusedopt.SGD([expected], lr=0.1)
    for _ in range(50):
        reference.step([np.ones(SIZE)])
    for p in params:
        np.testing.assert_array_equal(p, expected)


def test_a_grads_list_emptied_while_the_step_copies_it_is_read_as_it_is_then() -> None:
    """A step copies the grads list into a tuple; making the tuple may collect garbage, whose
    finalizer here empties the list: the copy reads the list as it is after that (empty: refused),
    never the items it had."""
    params = [np.zeros(4, np.float32) for _ in range(40)]
    opt = fusedopt.Adam(params, lr=0.1)
    opt.step([np.ones(4, np.float32) for _ in range(40)])
    grads = [np.ones(4, np.float32) for _ in range(40)]

    class EmptiesTheGrads:
        def __del__(self) -> None:
            grads.clear()

    step = opt._plan.step  # bound here: binding allocates
    gc.collect()
    gc.disable()
    threshold = gc.get_threshold()
    try:
        cycle = EmptiesTheGrads()
        cycle.itself = cycle  # freed by the collector only
        del cycle
        refused = ""
        gc.set_threshold(gc.get_count()[0])  # the next allocation, the tuple's, collects
        gc.enable()
        try:  # no pytest.raises: entering it allocates, which would collect before the step
            step(grads, None, None)
        except ValueError as error:
            refused = str(error)
    finally:
        gc.set_threshold(*threshold)
        gc.enable()
    assert re.search("expected 40 arrays .*, got 0", refused), refused
    assert all(np.array_equal(p, params[0]) for p in params)


def test_a_grad_scale_that_steps_another_optimizer_leaves_this_step_alone() -> None:
    """The grad scale is read first: its __float__ is code, here stepping another optimizer on
    this thread, which reuses this thread's buffers of grad descriptions."""
    params = [np.zeros(4, np.float32) for _ in range(8)]
    opt = fusedopt.SGD(params, lr=1.0)
    opt.step([np.zeros(4, np.float32) for _ in range(8)])
    other = fusedopt.SGD([np.zeros(4, np.float32) for _ in range(8)], lr=1.0)
    other.step([np.zeros(4, np.float32) for _ in range(8)])

    class Scale:
        def __float__(self) -> float:
            other._plan.step([np.full(4, 100.0, np.float32) for _ in range(8)], None, None)
            gc.collect()
            return 1.0

    opt._plan.step([np.ones(4, np.float32) for _ in range(8)], Scale(), None)
    for p in params:
        np.testing.assert_array_equal(p, np.full(4, -1.0, np.float32))


def test_finalizers_of_grads_freed_by_a_step_never_see_its_emptied_tuple() -> None:
    """Another thread empties the grads list while the kernels run: the step's tuple then holds
    the arrays' last references and drops them, running their finalizers; the tuple is out of
    the collector's sight by then (a finalizer reading it through gc.get_referrers crashed)."""
    count, size = 16, 1 << 18  # a step of several milliseconds
    opt = fusedopt.Adam([np.zeros(size, np.float32) for _ in range(count)], lr=0.1)
    seen: list[tuple] = []

    class Watched(np.ndarray):
        others: list = []  # weak references to the grads of the current step

        def __del__(self) -> None:  # looks for a tuple holding the other grads, and reads it
            # The step's first finalizer looks (a search of every object the collector tracks:
            # 0.05 s in a process that imported torch, too long for each of 16 a step).
            references, Watched.others = Watched.others, []
            for reference in references:
                other = reference()
                if other is None or other is self:
                    continue
                for holder in gc.get_referrers(other):
                    if type(holder) is tuple and len(holder) == count:
                        seen.append(tuple(type(item).__name__ for item in holder))
                return

    current: list[list] = [[]]
    started, stop = threading.Event(), threading.Event()

    def empty_the_list() -> None:
        while not stop.is_set():
            if started.wait(0.05):
                started.clear()
                time.sleep(0.002)  # into the step's kernels, which run without the GIL
                current[0].clear()

    emptier = threading.Thread(target=empty_the_list)
    emptier.start()
    try:
        for _ in range(30):
            current[0] = [np.ones(size, np.float32).view(Watched) for _ in range(count)]
            Watched.others = [weakref.ref(g) for g in current[0]]
            started.set()
            try:
                opt.step(current[0])
            except ValueError:  # emptied before the step read it
                pass
    finally:
        stop.set()
        emptier.join()
    assert all("NoneType" not in names for names in seen)


def test_keras_apply_from_two_threads_is_serialized() -> None:
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(SIZE).astype(np.float32)]
    variables = [np.zeros(SIZE, np.float32)]
    opt = fk.Adam(learning_rate=1e-2)
    assert run_threads(lambda: [opt.apply(grads, variables) for _ in range(3)], 2) == []
    assert opt.iterations == 6
    expected = [np.zeros(SIZE, np.float32)]
    other = fk.Adam(learning_rate=1e-2)
    for _ in range(6):
        other.apply(grads, expected)
    np.testing.assert_array_equal(variables[0], expected[0])


class _CallingBack(Sequence):
    """A grads sequence, or an lr, whose reading calls back into the optimizer being stepped."""

    def __init__(self, call: Callable[[], Any], values: Any) -> None:
        self.call, self.values, self.calls = call, values, 0

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> Any:
        self.calls += 1
        self.call()
        return self.values[i]

    def __float__(self) -> float:
        self.calls += 1
        self.call()
        return float(self.values)


@pytest.mark.parametrize("what", ["grads", "lr"])
def test_user_code_run_by_a_step_may_call_back_into_the_optimizer(what: str) -> None:
    """A step holds the optimizer's lock while it reads the grads sequence and the group's
    values, which may be user code calling state_dict(): a non-reentrant lock hung there."""
    params = [np.ones(8, np.float32)]
    opt = fusedopt.SGD(params, lr=0.5)
    grads: Any = [np.ones(8, np.float32)]
    callback = _CallingBack(opt.state_dict, grads if what == "grads" else 0.5)
    if what == "grads":
        grads = callback
    else:
        opt.param_groups[0]["lr"] = callback
    worker = threading.Thread(target=opt.step, args=(grads,), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the step hung on its own lock"
    assert callback.calls > 0
    np.testing.assert_array_equal(params[0], np.full(8, 0.5, np.float32))


# ----------------------------------------------------------------------- registered buffers


def trained(n: int = 3) -> tuple[Any, list[np.ndarray]]:
    rng = np.random.default_rng(6)
    params = [rng.standard_normal(40).astype(np.float32) for _ in range(n)]
    opt = fusedopt.Adam(params, lr=1e-2)
    opt.step([rng.standard_normal(40).astype(np.float32) for _ in range(n)])
    return opt, params


def every_buffer(opt: Any, params: list[np.ndarray]) -> list[np.ndarray]:
    return params + [v for e in opt.state.values() for v in e.values() if isinstance(v, np.ndarray)]


# 3 params: the registered arrays are compared on the calling thread; 2000 params (6000 arrays):
# a slice each on the pool's threads. The one changed is first, in the middle or last.
@pytest.mark.parametrize("n, changed", [(3, 1), (2000, 0), (2000, 1234), (2000, 1999)])
def test_a_state_resized_in_place_is_caught_before_any_write(n: int, changed: int) -> None:
    previous = fusedopt.num_threads()
    fusedopt.set_num_threads(2)  # the pool's threads, even on a one-core runner
    try:
        check_a_state_resized_in_place_is_caught(n, changed)
    finally:
        fusedopt.set_num_threads(previous)


def check_a_state_resized_in_place_is_caught(n: int, changed: int) -> None:
    opt, params = trained(n)
    buffer = opt.state[changed]["exp_avg"]
    buffer.resize(20, refcheck=False)  # new memory, new shape: the registered description is stale
    before = checksum(*every_buffer(opt, params))
    with pytest.raises(ValueError, match=rf"exp_avg\[{changed}\] has shape \(20,\)"):
        opt.step([np.ones(40, np.float32)] * n)
    assert checksum(*every_buffer(opt, params)) == before


def test_a_param_resized_in_place_is_caught_before_any_write() -> None:
    opt, params = trained()
    params[2].resize(41, refcheck=False)
    before = checksum(*every_buffer(opt, params))
    with pytest.raises(ValueError, match=r"\[2\] has shape"):
        opt.step([np.ones(40, np.float32)] * 2 + [np.ones(41, np.float32)])
    assert checksum(*every_buffer(opt, params)) == before


def test_a_param_made_read_only_after_registration_is_refused() -> None:
    opt, params = trained()
    params[0].flags.writeable = False
    before = checksum(*every_buffer(opt, params))
    with pytest.raises(ValueError, match=r"params\[0\] is read-only"):
        opt.step([np.ones(40, np.float32)] * 3)
    assert checksum(*every_buffer(opt, params)) == before
    params[0].flags.writeable = True
    opt.step([np.ones(40, np.float32)] * 3)


def test_a_grad_aliasing_a_registered_state_is_refused() -> None:
    opt, params = trained()
    state = opt.state[2]["exp_avg_sq"]
    before = checksum(*every_buffer(opt, params))
    with pytest.raises(ValueError, match=r"grads\[0\] overlaps exp_avg_sq\[2\]"):
        opt.step([state, np.ones(40, np.float32), np.ones(40, np.float32)])
    assert checksum(*every_buffer(opt, params)) == before


def test_grads_overlapping_registered_buffers_anywhere_are_found() -> None:
    """The plan searches each grad among its registered buffers starting from where the previous
    grad was found: grads in address order, in reverse and shuffled, each either its own array or
    a slice of any param or state (its first, middle or last element), must all be judged as a
    scan over every registered buffer judges them."""
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 50, size=60)
    params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    opt = fusedopt.Adam(params, lr=1e-3)
    opt.step([np.ones_like(p) for p in params])
    registered = [(f"params[{i}]", p) for i, p in enumerate(params)] + [
        (f"{key}[{i}]", opt.state[i][key])
        for i in range(len(params))
        for key in ("exp_avg", "exp_avg_sq")
    ]
    for trial in range(200):
        # Allocated in this order, so their addresses mostly follow it.
        order = {0: np.arange, 1: lambda n: np.arange(n)[::-1]}.get(trial % 3, rng.permutation)
        order = order(len(params))
        grads: list[Any] = [None] * len(params)
        for j in order:
            grads[j] = np.ones_like(params[j])
        clash = None
        if trial % 4:
            name, buffer = registered[rng.integers(len(registered))]
            j = int(order[rng.integers(len(order))])
            if buffer.size >= params[j].size:
                spare = buffer.size - params[j].size
                first = [0, spare // 2, spare][trial % 3]
                grads[j] = buffer[first : first + params[j].size]
                clash = (j, name)
        before = checksum(*every_buffer(opt, params))
        if clash is None:
            opt.step(grads)
            continue
        expected = rf"grads\[{clash[0]}\] overlaps {re.escape(clash[1])} "
        with pytest.raises(ValueError, match=expected):
            opt.step(grads)
        assert checksum(*every_buffer(opt, params)) == before


def test_states_swapped_by_load_state_dict_are_the_ones_updated() -> None:
    opt, params = trained()
    saved = opt.state_dict()
    opt.step([np.ones(40, np.float32)] * 3)
    old = opt.state[0]["exp_avg"]
    opt.load_state_dict(saved)
    new = opt.state[0]["exp_avg"]
    assert new is not old
    frozen = old.copy()
    opt.step([np.ones(40, np.float32)] * 3)
    np.testing.assert_array_equal(old, frozen)  # the replaced buffer is left alone
    assert not np.array_equal(new, saved["state"][0]["exp_avg"])


def test_misaligned_arrays_give_the_aligned_result() -> None:
    """A float32 view at a byte offset of 1 is accepted (contiguous, writeable): every load and
    store is an unaligned one, with the same result bit for bit."""
    rng = np.random.default_rng(7)
    n = 1000
    values = [rng.standard_normal(n).astype(np.float32) for _ in range(2)]

    def misaligned(a: np.ndarray) -> np.ndarray:
        view = np.frombuffer(bytearray(a.nbytes + 1), np.float32, offset=1)
        view[:] = a
        return view

    aligned_params, odd_params = [values[0].copy()], [misaligned(values[0])]
    assert not odd_params[0].flags.aligned
    for params in (aligned_params, odd_params):
        opt = fusedopt.Adam(params, lr=1e-2)
        for _ in range(3):
            opt.step([misaligned(values[1])])
    np.testing.assert_array_equal(odd_params[0], aligned_params[0])


# ------------------------------------------------------------------ functional cached plans


def test_functional_calls_on_new_arrays_at_old_addresses_use_the_new_arrays() -> None:
    """A cached plan is found by the arrays' identities: arrays freed and replaced (often at the
    same address) are stepped as the new arrays, in their own memory."""
    rng = np.random.default_rng(8)
    for round_ in range(20):
        p = rng.standard_normal(64)
        m, v = np.zeros(64), np.zeros(64)
        g = rng.standard_normal(64)
        expected = p.copy()
        fusedopt.Adam([expected], lr=0.1).step([g])
        F.adam_(p, g, m, v, step=1, lr=0.1)
        np.testing.assert_array_equal(p, expected, err_msg=f"round {round_}")
        del p, m, v
        gc.collect()


def test_functional_sees_a_state_list_changed_between_calls() -> None:
    p, g = np.zeros(16), np.ones(16)
    m1, v1, m2, v2 = (np.zeros(16) for _ in range(4))
    F.adam_(p, g, m1, v1, step=1, lr=0.1)
    F.adam_(p, g, m2, v2, step=2, lr=0.1)  # same param, other states
    assert np.all(m1 > 0)
    np.testing.assert_array_equal(m2, m1)  # each set of states took one step from zero


def test_functional_loop_calls_step_the_cached_plan_and_any_other_call_takes_the_checked_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A training loop's call (the very option objects of the last call, the arrays a cached plan
    registered) steps that plan from the generated function itself; a call with anything else
    goes through _run and its checks. Either way the trajectory is the class's, bit for bit."""
    runs: dict[str, int] = {}
    for function in (F.adam_, F.rmsprop_):
        run = function.__globals__["_run"]
        name = function.__name__

        def counted(*args: Any, run: Any = run, name: str = name) -> None:
            runs[name] = runs.get(name, 0) + 1
            run(*args)

        monkeypatch.setitem(function.__globals__, "_run", counted)

    rng = np.random.default_rng(12)
    params = [rng.standard_normal(8), rng.standard_normal(3)]
    grads = [rng.standard_normal(8), rng.standard_normal(3)]
    expected = [p.copy() for p in params]
    reference = fusedopt.Adam(expected, lr=0.01)
    exp_avgs, exp_avg_sqs = [np.zeros(8), np.zeros(3)], [np.zeros(8), np.zeros(3)]
    lr = 0.01
    for step in range(1, 4):
        reference.step(grads)
        F.adam_(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr)
    assert runs == {"adam_": 1}  # the first call made the plan; the others stepped it
    reference.step(grads)
    F.adam_(params, grads, exp_avgs, exp_avg_sqs, step=4, lr=float("0.01"))  # equal, not the same
    assert runs == {"adam_": 2}
    exp_avgs[1] = exp_avgs[1].copy()  # an array the plan did not register
    reference.step(grads)
    F.adam_(params, grads, exp_avgs, exp_avg_sqs, step=5, lr=lr)
    assert runs == {"adam_": 3}
    reference.step(grads)
    F.adam_(params, grads, exp_avgs, exp_avg_sqs, step=6, lr=lr)  # the new plan's arrays
    assert runs == {"adam_": 3}
    reference.step(grads)
    F.adam_(params, tuple(grads), exp_avgs, exp_avg_sqs, step=7, lr=lr)  # a tuple of grads
    assert runs == {"adam_": 4}
    for p, e in zip(params, expected):
        np.testing.assert_array_equal(p, e)
    np.testing.assert_array_equal(exp_avgs[1], reference.state[1]["exp_avg"])

    # A list subclass presents its arrays through its own methods, which _run honours (it makes
    # a list of one) and the native step, reading the list itself, would not.
    class Presenting(list):
        def __init__(self, stored: list, presented: list) -> None:
            super().__init__(stored)
            self.presented = presented

        def __iter__(self) -> Any:
            return iter(self.presented)

        def __len__(self) -> int:
            return len(self.presented)

        def __getitem__(self, index: Any) -> Any:
            return self.presented[index]

    presented = [np.zeros(8), np.zeros(3)]
    registered = [a.copy() for a in exp_avgs]
    F.adam_(params, grads, Presenting(exp_avgs, presented), exp_avg_sqs, step=8, lr=lr)
    assert runs == {"adam_": 5}
    assert np.all(presented[0] != 0)  # the presented arrays took the step
    for a, before in zip(exp_avgs, registered):  # and the lists' own items did not
        np.testing.assert_array_equal(a, before)

    # An algorithm that reads no t: a loop leaves step out.
    params, grads = [rng.standard_normal(5)], [rng.standard_normal(5)]
    expected = [params[0].copy()]
    reference_rmsprop = fusedopt.RMSprop(expected, lr=lr)
    square_avgs = [np.zeros(5)]
    for _ in range(3):
        reference_rmsprop.step(grads)
        F.rmsprop_(params, grads, square_avgs, lr=lr)
    assert runs["rmsprop_"] == 1
    np.testing.assert_array_equal(params[0], expected[0])


# 10,000 params: their 30,000 arrays are compared with the cached plan's registered ones. The one
# replaced is the first, a middle one or the last.
@pytest.mark.parametrize("role, index", [("params", 0), ("exp_avgs", 5000), ("exp_avg_sqs", 9999)])
def test_functional_over_many_arrays_sees_one_replaced_between_calls(role: str, index: int) -> None:
    previous = fusedopt.num_threads()
    fusedopt.set_num_threads(2)  # the pool's threads, even on a one-core runner
    try:
        rng = np.random.default_rng(10)
        n = 10_000
        arrays = {
            "params": [rng.standard_normal(8) for _ in range(n)],
            "exp_avgs": [np.zeros(8) for _ in range(n)],
            "exp_avg_sqs": [np.zeros(8) for _ in range(n)],
        }
        grads = [rng.standard_normal(8) for _ in range(n)]
        expected = [p.copy() for p in arrays["params"]]
        reference = fusedopt.Adam(expected, lr=0.1)
        lists = arrays["params"], grads, arrays["exp_avgs"], arrays["exp_avg_sqs"]
        for step in range(1, 5):  # the plan registered at the first, used by the others
            reference.step(grads)
            F.adam_(*lists, step=step, lr=0.1)
        old = arrays[role][index]
        replacement = old.copy()
        arrays[role][index] = replacement  # the cached plan registered `old`
        reference.step(grads)
        F.adam_(*lists, step=5, lr=0.1)
        for i, (p, e) in enumerate(zip(arrays["params"], expected)):
            np.testing.assert_array_equal(p, e, err_msg=f"params[{i}]")
        state = reference.state[index]["exp_avg" if role == "exp_avgs" else "exp_avg_sq"]
        if role != "params":
            np.testing.assert_array_equal(replacement, state)  # the list's array took the step
        assert not np.array_equal(old, replacement)  # and the registered one did not
    finally:
        fusedopt.set_num_threads(previous)


def test_functional_loops_over_two_models_in_turn_step_each_as_its_class() -> None:
    """Two lists of params stepped in turn in one thread: each call finds its own plan, the last
    one stepped (_PlanCache.last) or another by its key, and follows its class bit for bit."""
    rng = np.random.default_rng(13)
    models = [[rng.standard_normal(5), rng.standard_normal(2)] for _ in range(2)]
    classes = [fusedopt.Adam([p.copy() for p in params], lr=0.01) for params in models]
    states = [
        ([np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params])
        for params in models
    ]
    lr = 0.01
    for step in range(1, 5):
        for params, reference, (exp_avgs, exp_avg_sqs) in zip(models, classes, states):
            grads = [rng.standard_normal(p.shape) for p in params]
            reference.step(grads)
            F.adam_(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr)
    for params, reference in zip(models, classes):
        for p, e in zip(params, reference.param_groups[0]["params"]):
            np.testing.assert_array_equal(p, e)


def test_functional_call_refused_with_new_options_leaves_the_loop_on_its_own() -> None:
    """A refused call whose new options the plan took before it refused (a bad grad) is
    forgotten with them: the loop's next call steps at its own options, as the class does."""
    params, exp_avgs, exp_avg_sqs = [np.zeros(8)], [np.zeros(8)], [np.zeros(8)]
    reference = fusedopt.Adam([np.zeros(8)], lr=0.1)
    grads = [np.full(8, 0.5)]
    lr = 0.1
    for step in (1, 2):
        reference.step(grads)
        F.adam_(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr)
    with pytest.raises(TypeError):
        F.adam_(params, [np.ones(8, np.float32)], exp_avgs, exp_avg_sqs, step=3, lr=0.5)
    for step in (3, 4):
        reference.step(grads)
        F.adam_(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr)
    np.testing.assert_array_equal(params[0], reference.param_groups[0]["params"][0])


def test_functional_cached_plans_keep_no_array_alive() -> None:
    import weakref

    p = np.zeros(8)
    ref = weakref.ref(p)
    F.sgd_(p, np.ones(8), lr=0.1)
    del p
    gc.collect()
    assert ref() is None


def test_functional_plan_refuses_a_grad_aliasing_a_state() -> None:
    p, m, v = np.zeros(16), np.zeros(16), np.zeros(16)
    F.adam_(p, np.ones(16), m, v, step=1, lr=0.1)
    before = checksum(p, m, v)
    with pytest.raises(ValueError, match=r"grads\[0\] overlaps exp_avgs\[0\]"):
        F.adam_(p, m, m, v, step=2, lr=0.1)
    assert checksum(p, m, v) == before


def test_functional_from_two_threads_on_their_own_arrays() -> None:
    rng = np.random.default_rng(9)
    grads = rng.standard_normal(SIZE)
    results = {}

    def run(key: int) -> Callable[[], None]:
        def steps() -> None:
            p, m, v = np.zeros(SIZE), np.zeros(SIZE), np.zeros(SIZE)
            for t in range(1, 6):
                F.adam_(p, grads, m, v, step=t, lr=0.01 * key)
            results[key] = p

        return steps

    threads = [threading.Thread(target=run(k)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in (1, 2):
        p, m, v = np.zeros(SIZE), np.zeros(SIZE), np.zeros(SIZE)
        for t in range(1, 6):
            F.adam_(p, grads, m, v, step=t, lr=0.01 * key)
        np.testing.assert_array_equal(results[key], p)


def _made_at(address: int, make: Callable[[int], Any], tries: int, kept: list) -> Any:
    """An object `make(i)` that Python's allocator placed at `address` (a block just freed: the
    next one of its size class), or None after `tries`; every object made is kept in `kept`, so
    that each try gets another block."""
    for i in range(tries):
        kept.append(make(i))
        if id(kept[-1]) == address:
            return kept[-1]
    return None


@pytest.mark.parametrize("role", ["params", "exp_avgs"])
def test_a_cached_plan_given_another_object_at_a_registered_address_refuses_it(role: str) -> None:
    """A cached plan compares its lists' items with the registered arrays by address. A non-array
    made where a registered array was freed has the address but is no array: the step refuses it,
    naming it, and writes nothing."""
    arrays = {name: [np.zeros(16)] for name in ("params", "exp_avgs", "exp_avg_sqs")}
    grads = [np.ones(16)]
    lists = arrays["params"], grads, arrays["exp_avgs"], arrays["exp_avg_sqs"]
    for step in (1, 2):  # the second call steps the cached plan
        F.adam_(*lists, step=step, lr=0.1)
    address = id(arrays[role][0])
    object_size = np.ndarray.__basicsize__ - sys.getsizeof(b"")  # the same size class as arrays
    arrays[role].pop()  # the list held the last reference: the array is freed
    impostor = _made_at(address, lambda _: bytes(object_size), 10_000, [])
    if impostor is None:
        pytest.skip("the allocator placed no object of the size at the freed array's address")
    arrays[role].append(impostor)
    before = checksum(*(a for name, items in arrays.items() if name != role for a in items))
    with pytest.raises(TypeError, match=rf"{role}\[0\]"):
        F.adam_(*lists, step=3, lr=0.1)
    assert checksum(*(a for name, items in arrays.items() if name != role for a in items)) == before
    assert arrays[role][0] == bytes(object_size)


def test_a_cached_plan_given_an_array_of_another_dtype_at_a_registered_address_refuses_it() -> None:
    """A registered array whose dtype object is its own (made with metadata, or by unpickling)
    takes it along when it dies; another dtype may then be made at that address, and an array of
    it at the array's address, over the same memory. The plan keeps its dtypes alive, so that the
    fingerprints, which compare dtypes by address, tell them apart: the float32 array is refused
    (its grad and states are float64), where it was stepped as 16 float64 values, 128 bytes over
    its 64 (a write past its end)."""
    memory = np.zeros(64)  # the arrays' memory, kept by this test

    def over_memory(dtype: Any) -> np.ndarray:
        return np.ndarray((16,), dtype=dtype, buffer=memory)

    own = np.dtype(np.float64, metadata={"made": "here"})
    params = [over_memory(own)]
    del own
    grads, exp_avgs, exp_avg_sqs = [np.ones(16)], [np.zeros(16)], [np.zeros(16)]
    for step in (1, 2):  # the second call steps the cached plan
        F.adam_(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=0.1)
    address, dtype_address = id(params[0]), id(params[0].dtype)
    params.pop()  # the array and, but for the plan, its dtype die
    gc.collect()
    kept: list = []  # every object made on the way
    other = _made_at(dtype_address, lambda i: np.dtype("f4", metadata={"try": i}), 20_000, kept)
    dtype = other if other is not None else np.float32
    array = _made_at(address, lambda _: over_memory(dtype), 10_000, kept)
    if array is None:
        pytest.skip("the allocator placed no array at the freed array's address")
    memory[:] = 0
    params.append(array)
    before = checksum(memory, *exp_avgs, *exp_avg_sqs)
    with pytest.raises(TypeError, match=r"dtype"):
        F.adam_(params, grads, exp_avgs, exp_avg_sqs, step=3, lr=0.1)
    assert checksum(memory, *exp_avgs, *exp_avg_sqs) == before


def test_a_cached_plan_refuses_to_step_once_a_registered_array_died() -> None:
    """A borrowed plan holds its arrays for the step from its weak references: one whose array is
    gone says so rather than step freed memory."""
    p, m, v = np.zeros(16), np.zeros(16), np.zeros(16)
    ms = [m]
    F.adam_([p], [np.ones(16)], ms, [v], step=1, lr=0.1)
    plan, _ = F._cache.plans[("adam", 1, id(p))]  # this thread's plan for these arrays
    del m, ms
    gc.collect()
    before = checksum(p, v)
    with pytest.raises(ValueError, match="no longer exists"):
        plan.step([np.ones(16)], None, 2)
    assert checksum(p, v) == before


# Another thread drops the last reference to the states (and param) of a functional call while its
# native step runs with the GIL released. A cached plan keeps only weak references, so before the
# step held the arrays itself it wrote into memory already returned to the system (64 MiB arrays:
# malloc maps and unmaps them on their own) and the interpreter died of SIGSEGV. Each round runs
# the cached plan's path (a second call on the same arrays) and the first call's (new states),
# each with the lists emptied about 5 ms into a step of some 50 ms. Run in a subprocess: what
# fails is the process.
_DROPPED_MID_STEP = """
import threading, time
import numpy as np
from fusedopt.functional import adam_

N = 1 << 24
params, grads = [np.zeros(N, np.float32)], [np.full(N, 0.1, np.float32)]
ms, vs = [None], [None]
go, dropped = threading.Event(), threading.Event()

def drop():
    while go.wait() and ms[0] is not None:
        go.clear()
        time.sleep(0.005)
        ms[0] = vs[0] = np.zeros(1, np.float32)  # the step's states lose their last reference
        dropped.set()

def interfered(step):
    dropped.clear()
    go.set()
    try:
        adam_(params, grads, ms, vs, step=step, lr=1e-3)
    except ValueError:
        pass  # the lists changed before the step took its arrays: refused, nothing freed used
    dropped.wait()

dropper = threading.Thread(target=drop)
dropper.start()
for round in range(4):
    ms[0], vs[0] = np.zeros(N, np.float32), np.zeros(N, np.float32)
    adam_(params, grads, ms, vs, step=1, lr=1e-3)  # the plan, cached
    interfered(2)  # through the cached plan
    ms[0], vs[0] = np.zeros(N, np.float32), np.zeros(N, np.float32)
    interfered(1)  # a plan made for these states, stepped at once
ms[0] = None
go.set()
dropper.join()
print("survived")
"""


def test_functional_arrays_dropped_by_another_thread_mid_step_stay_alive_for_the_step() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _DROPPED_MID_STEP],
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr}"
    assert result.stdout.strip() == "survived"


def test_a_zero_size_array_listed_many_times_keeps_its_reference_count() -> None:
    """A zero-size array passes the overlap checks, so the functional API may see it thousands
    of times in one call; the references its step holds were counted on several pool threads at
    once, which lost updates (the count drifted by thousands a call)."""
    import sys

    empty = np.zeros(0, np.float32)
    grad = np.zeros(0, np.float32)
    arrays = [empty] * 5000
    before = sys.getrefcount(empty)
    for step in range(1, 21):
        F.adam_(arrays, [grad] * 5000, arrays, arrays, step=step, lr=1e-3)
    assert sys.getrefcount(empty) == before
