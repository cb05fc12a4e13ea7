"""The thread pool: a child forked while another thread is mid-step gets a fresh pool whose
workers run its steps; a thread count outside [1, 1024] is refused by fusedopt.set_num_threads
and fusedopt_set_num_threads, and ignored in FUSEDOPT_NUM_THREADS."""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import fusedopt
import fusedopt.functional as F
import fusedopt.keras_numpy
from fusedopt import _core

LIBRARY = fusedopt.get_cmake_dir().parent.parent / "libfusedopt.so"
MAX_THREADS = 1024  # kMaxThreads in csrc/cpu/parallel.h
OK, VALUE_ERROR = 0, 2
# Above the 65536 elements under which a step runs on the calling thread.
SIZE = 1 << 20
# The other thread's tensor: its steps (~4 ms here) are much longer than the Python that the
# forking thread runs, holding the GIL, before fork(), so most forks land mid-step (with 0.75 ms
# steps of 1 << 20 elements only 1 to 3 forks in 5 did).
STEPPER_SIZE = 1 << 23
CHILD_TIMEOUT_S = 60
# Before the fix 3 to 5 children in 5 ran on one thread (their pool mutex inherited locked), so
# 8 all lucky is rare (under 1e-3); after it, none may.
FORKS = 8

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
needs_library = pytest.mark.skipif(
    not LIBRARY.is_file(), reason=f"no {LIBRARY.name} in the installed package (not Linux?)"
)


@pytest.fixture
def four_threads() -> Iterator[None]:
    """Four threads whatever the core count, so the workers exist to be seen."""
    previous = fusedopt.num_threads()
    fusedopt.set_num_threads(4)
    try:
        yield
    finally:
        fusedopt.set_num_threads(previous)


def adam_step(param: np.ndarray, grad: np.ndarray) -> list[np.ndarray]:
    """One Adam step on a copy of param: the param and both moments after it."""
    p = param.copy()
    opt = fusedopt.Adam([p], lr=1e-2, weight_decay=0.1)
    opt.step([grad])
    return [p, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"]]


def child_report(param: np.ndarray, grad: np.ndarray, expected: list[np.ndarray]) -> dict:
    """What the child checks: a large step equal to the sequential one, and the pool's threads."""
    try:
        got = adam_step(param, grad)
        return {
            "equal": all(np.array_equal(a, b) for a, b in zip(got, expected)),
            "threads": _core._threads_used_by_parallel_for(64),
        }
    except BaseException:
        return {"error": traceback.format_exc()}


def fork_with_os(report: Callable[[], dict]) -> dict:
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a multi-threaded process may deadlock: that is the case
        # under test.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(report()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], CHILD_TIMEOUT_S)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            return {"error": f"the child gave no answer in {CHILD_TIMEOUT_S} s (deadlock?)"}
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return json.loads(b"".join(chunks) or b'{"error": "the child died without an answer"}')


def _send_report(connection, report: Callable[[], dict]) -> None:
    connection.send(report())
    connection.close()


def fork_with_multiprocessing(report: Callable[[], dict]) -> dict:
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        process = context.Process(target=_send_report, args=(sender, report))
        process.start()
    sender.close()
    try:
        if not receiver.poll(CHILD_TIMEOUT_S):
            process.kill()
            return {"error": f"the child gave no answer in {CHILD_TIMEOUT_S} s (deadlock?)"}
        return receiver.recv()
    finally:
        process.join(CHILD_TIMEOUT_S)
        receiver.close()


def test_the_probe_sees_the_pool_workers(four_threads: None) -> None:
    """The probe the fork tests rely on reports the workers of a healthy pool."""
    assert _core._threads_used_by_parallel_for(64) > 1
    assert _core._threads_used_by_parallel_for(1) == 1


# A step over many tensors keeps the workers awake between its passes (its checks, then its
# kernels); after the step they must sleep, not spin: measured in a fresh interpreter, where no
# other library's threads (torch's OpenMP workers) run.
IDLE_AFTER_STEPS = """
import time
import numpy as np
import fusedopt

fusedopt.set_num_threads(2)
params = [np.zeros(40, np.float32) for _ in range(3000)]
opt = fusedopt.Adam(params, lr=1e-3)
for _ in range(20):
    opt.step([np.ones(40, np.float32) for _ in range(3000)])
time.sleep(0.05)
start = time.process_time()
time.sleep(0.5)
print(time.process_time() - start)
"""


def test_the_workers_do_not_spin_between_steps() -> None:
    run = subprocess.run(
        [sys.executable, "-c", IDLE_AFTER_STEPS], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    cpu_seconds = float(run.stdout)
    # A worker spinning through the sleep would use 0.5 s; sleeping, almost none.
    assert cpu_seconds < 0.05, f"{cpu_seconds:.3f} s of CPU time while idle after the steps"


# The first call of a fresh process that describes many arrays on the pool: pybind11's lookup
# of NumPy's array type, done once per process, imports NumPy and takes the GIL, which a pool
# thread must never do (it crashed this call, SIGSEGV, 20 runs in 20).
FIRST_CALL_OVER_MANY_ARRAYS = """
import numpy as np
import fusedopt
import fusedopt.functional

fusedopt.set_num_threads(2)
n = 3000
zeros = lambda: [np.zeros(40, np.float32) for _ in range(n)]
params = zeros()
fusedopt.functional.adam_(params, [np.ones(40, np.float32)] * n, zeros(), zeros(), step=1, lr=0.1)
print(float(params[-1][0]))
"""


@pytest.mark.parametrize("run", range(3))
def test_the_first_step_of_a_process_over_many_arrays_describes_them_on_the_pool(run: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", FIRST_CALL_OVER_MANY_ARRAYS],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) == pytest.approx(-0.1)


@needs_fork
@pytest.mark.parametrize("fork", [fork_with_os, fork_with_multiprocessing], ids=["os", "mp"])
def test_a_child_forked_mid_step_steps_correctly_on_its_own_worker_threads(
    fork: Callable[[Callable[[], dict]], dict], four_threads: None
) -> None:
    rng = np.random.default_rng(0)
    param = rng.standard_normal(SIZE, dtype=np.float32)
    grad = rng.standard_normal(SIZE, dtype=np.float32)
    fusedopt.set_num_threads(1)
    expected = adam_step(param, grad)  # the same step, on the calling thread alone
    fusedopt.set_num_threads(4)

    # Another thread steps a large tensor in a loop, so it holds the pool at most fork()s.
    stop, steps = threading.Event(), [0]

    def step_in_a_loop() -> None:
        p, g = np.zeros(STEPPER_SIZE, np.float32), np.ones(STEPPER_SIZE, np.float32)
        opt = fusedopt.Adam([p], lr=1e-3)
        while not stop.is_set():
            opt.step([g])
            steps[0] += 1

    stepper = threading.Thread(target=step_in_a_loop)
    stepper.start()
    try:
        while steps[0] < 3:  # it is stepping
            stop.wait(0.001)
        reports = [fork(lambda: child_report(param, grad, expected)) for _ in range(FORKS)]
    finally:
        stop.set()
        stepper.join()

    for report in reports:
        assert "error" not in report, report["error"]
    assert [r["equal"] for r in reports] == [True] * FORKS, "a child's step differs"
    single = [r["threads"] for r in reports if r["threads"] <= 1]
    assert not single, f"{len(single)} of {FORKS} children ran a parallel_for on one thread"
    # The parent's pool survived the forks.
    assert _core._threads_used_by_parallel_for(64) > 1
    np.testing.assert_array_equal(adam_step(param, grad)[0], expected[0])


def wait_for_child(pid: int, timeout_s: float) -> str:
    """The child's exit status as words; a child still running after timeout_s is killed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return f"exit {os.waitstatus_to_exitcode(status)}"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return f"no exit in {timeout_s} s (deadlock?)"


def numpy_adam(param: np.ndarray) -> Callable[[np.ndarray], None]:
    opt = fusedopt.Adam([param], lr=1e-3)
    return lambda grad: opt.step([grad])


def keras_numpy_adam(param: np.ndarray) -> Callable[[np.ndarray], None]:
    opt = fusedopt.keras_numpy.Adam(learning_rate=1e-3)
    return lambda grad: opt.apply([grad], [param])


def torch_adam(param: np.ndarray) -> Callable[[np.ndarray], None]:
    torch = pytest.importorskip("torch")
    import fusedopt.torch as ft

    tensor = torch.nn.Parameter(torch.from_numpy(param))
    opt = ft.Adam([tensor], lr=1e-3)

    def step(grad: np.ndarray) -> None:
        tensor.grad = torch.from_numpy(grad)
        opt.step()

    return step


@needs_fork
@pytest.mark.parametrize(
    "make", [numpy_adam, keras_numpy_adam, torch_adam], ids=["optim", "keras_numpy", "torch"]
)
def test_a_child_forked_while_another_thread_steps_the_same_optimizer_can_step_it(
    make: Callable[[np.ndarray], Callable[[np.ndarray], None]],
) -> None:
    """The other thread holds the optimizer's lock (and often its plan's mutex) at most forks:
    the fork waits for its native step to end, but the thread needs the GIL, which the forking
    thread holds, to release the lock. The child has a fresh lock and registers its arrays
    again. Steps below the pool's threshold, which run on the stepping thread."""
    param, grad = np.zeros(60_000, np.float32), np.ones(60_000, np.float32)
    step = make(param)
    stop, steps = threading.Event(), [0]

    def step_in_a_loop() -> None:
        while not stop.is_set():
            step(grad)
            steps[0] += 1

    stepper = threading.Thread(target=step_in_a_loop)
    stepper.start()
    outcomes = []
    try:
        while steps[0] < 3:
            stop.wait(0.001)
        for _ in range(FORKS):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                try:
                    step(grad)
                    step(grad)
                finally:
                    os._exit(0)
            outcomes.append(wait_for_child(pid, 20))
            if outcomes[-1] != "exit 0":
                break
    finally:
        stop.set()
        stepper.join()
    assert outcomes == ["exit 0"] * FORKS
    step(grad)  # the parent's optimizer still steps


# A step's tensors of equal elements (one grad value everywhere) stay equal elementwise: a child
# that sees two values in one was forked in the middle of a step.
TORN_SIZE = 1 << 23  # a step of some 30 ms on one thread: most forks land in one
# Before the fix 4 to 6 forks in 10 landed mid-step and saw a param half-updated (when the step ran
# on its own thread: one thread set, or the pool busy with another thread's step), so 16 clean
# forks were under 1e-4 likely; after it, the fork waits for every step in progress, so none is
# torn.
TORN_FORKS = 16


def adam_in_a_loop() -> tuple[Callable[[], None], Callable[[], list[np.ndarray]]]:
    p, g = np.ones(TORN_SIZE, np.float32), np.full(TORN_SIZE, 0.1, np.float32)
    opt = fusedopt.Adam([p], lr=1e-3)
    opt.step([g])
    return lambda: opt.step([g]), lambda: [p, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"]]


def lamb_in_a_loop() -> tuple[Callable[[], None], Callable[[], list[np.ndarray]]]:
    """Two passes a step (the norms, then the update): the fork must not land between them."""
    p, g = np.ones(TORN_SIZE, np.float32), np.full(TORN_SIZE, 0.1, np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    steps = iter(range(1, 2**62))
    return lambda: F.lamb_(p, g, m, v, step=next(steps), lr=1e-3), lambda: [p, m, v]


@needs_fork
@pytest.mark.parametrize(
    "threads, steppers",
    [
        (1, [adam_in_a_loop]),  # every step on its own thread
        (1, [lamb_in_a_loop]),
        (2, [adam_in_a_loop, adam_in_a_loop]),  # the step that finds the pool busy runs inline
    ],
    ids=["one_thread-adam", "one_thread-lamb", "pool_busy-adam"],
)
def test_a_fork_waits_for_every_step_in_progress_whatever_its_size_or_threads(
    threads: int, steppers: list[Callable]
) -> None:
    """README: a process forked while another thread is in a step waits for that step to finish.
    It did only for a step holding the pool: a step on its calling thread (one thread, a step
    under 65536 elements, or the pool busy) was copied into the child half-done."""
    previous = fusedopt.num_threads()
    fusedopt.set_num_threads(threads)
    made = [make() for make in steppers]
    stop = threading.Event()

    def step_in_a_loop(step: Callable[[], None]) -> None:
        while not stop.is_set():
            step()

    threads_stepping = [threading.Thread(target=step_in_a_loop, args=(s,)) for s, _ in made]
    for t in threads_stepping:
        t.start()
    outcomes: list[str] = []
    try:
        for _ in range(TORN_FORKS):
            stop.wait(0.005)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                whole = all(a.min() == a.max() for _, arrays in made for a in arrays())
                os._exit(0 if whole else 1)
            outcomes.append(wait_for_child(pid, CHILD_TIMEOUT_S))
            if outcomes[-1] != "exit 0":
                break
    finally:
        stop.set()
        for t in threads_stepping:
            t.join()
        fusedopt.set_num_threads(previous)
    assert outcomes == ["exit 0"] * TORN_FORKS  # exit 1: the child saw a step half-done


# Below 1 the message names n and the bound 1; above the limit it names n and the limit.
@pytest.mark.parametrize("n", [0, -1, MAX_THREADS + 1, 4096, 2**31 - 1])
def test_set_num_threads_refuses_counts_outside_1_to_the_limit(n: int) -> None:
    before = fusedopt.num_threads()
    bound = 1 if n < 1 else MAX_THREADS
    with pytest.raises(ValueError, match=rf"^n must be .*\b{bound}\b.*got {n}$"):
        fusedopt.set_num_threads(n)
    assert fusedopt.num_threads() == before


def test_set_num_threads_accepts_1_and_the_limit() -> None:
    before = fusedopt.num_threads()
    try:
        for n in (1, MAX_THREADS):  # only stored: no step runs, so no pool of 1023 workers
            fusedopt.set_num_threads(n)
            assert fusedopt.num_threads() == n
    finally:
        fusedopt.set_num_threads(before)


@pytest.mark.parametrize("n", [2.5, 2.0, True, False, "2", None, np.float64(2)])
def test_set_num_threads_refuses_what_is_not_an_integer_naming_n(n: object) -> None:
    before = fusedopt.num_threads()
    with pytest.raises(TypeError, match=r"\bn must be an int"):
        fusedopt.set_num_threads(n)  # type: ignore[arg-type]
    assert fusedopt.num_threads() == before


def test_set_num_threads_takes_numpy_integers() -> None:
    before = fusedopt.num_threads()
    try:
        fusedopt.set_num_threads(np.int64(2))
        assert fusedopt.num_threads() == 2
    finally:
        fusedopt.set_num_threads(before)


@needs_library
@pytest.mark.parametrize("n", [0, -1, MAX_THREADS + 1, 4096, 2**31 - 1])
def test_c_set_num_threads_refuses_counts_outside_1_to_the_limit(n: int) -> None:
    lib = ctypes.CDLL(str(LIBRARY))
    lib.fusedopt_last_error.restype = ctypes.c_char_p
    before = lib.fusedopt_num_threads()
    assert lib.fusedopt_set_num_threads(ctypes.c_int32(n)) == VALUE_ERROR
    message = lib.fusedopt_last_error().decode()
    bound = 1 if n < 1 else MAX_THREADS
    assert re.fullmatch(rf"n must be .*\b{bound}\b.*got {n}", message), message
    assert lib.fusedopt_num_threads() == before
    assert lib.fusedopt_set_num_threads(ctypes.c_int32(MAX_THREADS)) == OK
    assert lib.fusedopt_num_threads() == MAX_THREADS
    assert lib.fusedopt_set_num_threads(ctypes.c_int32(before)) == OK


# The thread count at load, in a fresh process, of the Python module and of libfusedopt.
COUNTS_AT_LOAD = f"""
import ctypes, json, pathlib
import fusedopt
library = pathlib.Path({str(LIBRARY)!r})
c = ctypes.CDLL(str(library)).fusedopt_num_threads() if library.is_file() else None
print(json.dumps([fusedopt.num_threads(), c]))
"""


def counts_at_load(value: str | None) -> list:
    env = {k: v for k, v in os.environ.items() if k != "FUSEDOPT_NUM_THREADS"}
    if value is not None:
        env["FUSEDOPT_NUM_THREADS"] = value
    result = subprocess.run(
        [sys.executable, "-c", COUNTS_AT_LOAD], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_fusedopt_num_threads_in_the_environment_sets_the_count() -> None:
    python_count, c_count = counts_at_load("3")
    assert python_count == 3
    assert c_count in (3, None)


@pytest.mark.parametrize(
    "value", ["0", "-2", "abc", "4x", "2.5", str(MAX_THREADS + 1), "4096", "99999999999999999999"]
)
def test_an_invalid_fusedopt_num_threads_falls_back_to_the_default(value: str) -> None:
    assert counts_at_load(value) == counts_at_load(None)


# ------------------------------------------------------- the default: the CPUs the process may use


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs sched_setaffinity (Linux) and two CPUs allowed to this process",
)
def test_the_default_thread_count_follows_the_affinity_mask() -> None:
    """A process allowed one CPU (taskset, a cpuset, a container) starts one thread, not one per
    CPU of the machine; FUSEDOPT_NUM_THREADS still overrides."""
    cpu = min(os.sched_getaffinity(0))
    program = f"import os; os.sched_setaffinity(0, {{{cpu}}}); {COUNTS_AT_LOAD}"
    env = {k: v for k, v in os.environ.items() if k != "FUSEDOPT_NUM_THREADS"}
    for value, expected in ((None, 1), ("3", 3)):
        if value is not None:
            env["FUSEDOPT_NUM_THREADS"] = value
        result = subprocess.run(
            [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        python_count, c_count = json.loads(result.stdout)
        assert python_count == expected
        assert c_count in (expected, None)


def write(path: Any, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# (/proc/self/cgroup, {file under the cgroup root: contents}, the limit in CPUs, 0 for none)
CGROUPS = {
    "v2, no files": ("0::/a/b\n", {}, 0),
    "v2, unlimited": ("0::/a/b\n", {"a/b/cpu.max": "max 100000\n"}, 0),
    "v2, 1.5 CPUs rounded up": ("0::/a/b\n", {"a/b/cpu.max": "150000 100000\n"}, 2),
    "v2, a parent's smaller quota": (
        "0::/a/b\n",
        {"a/b/cpu.max": "300000 100000\n", "a/cpu.max": "200000 100000\n"},
        2,
    ),
    "v2, the root's quota (a container's namespace)": ("0::/\n", {"cpu.max": "400000 100000"}, 4),
    "v1, cpu,cpuacct": (
        "5:memory:/x\n4:cpu,cpuacct:/docker/abc\n",
        {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
         "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"},
        1,
    ),
    "v1, no quota": (
        "1:cpu:/\n",
        {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
        0,
    ),
    "v1, group not visible, the mount's root quota": (
        "1:cpu:/docker/abc\n",
        {"cpu/cpu.cfs_quota_us": "250000\n", "cpu/cpu.cfs_period_us": "100000\n"},
        3,
    ),
    "v1, a controller list without cpu": (
        "1:cpuacct,cpuset:/\n",
        {"cpuacct,cpuset/cpu.cfs_quota_us": "100000\n",
         "cpuacct,cpuset/cpu.cfs_period_us": "100000\n"},
        0,
    ),
    "malformed lines": ("garbage\n::\n0::\n", {"cpu.max": "nonsense"}, 0),
}  # fmt: skip


@pytest.mark.parametrize("name", CGROUPS)
def test_cgroup_cpu_quota_is_read_from_the_process_groups(name: str, tmp_path: Any) -> None:
    self_cgroup, files, expected = CGROUPS[name]
    write(tmp_path / "self_cgroup", self_cgroup)
    for relative, text in files.items():
        write(tmp_path / "root" / relative, text)
    assert (
        _core._cgroup_cpu_limit(str(tmp_path / "self_cgroup"), str(tmp_path / "root")) == expected
    )
