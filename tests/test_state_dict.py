"""state_dict / load_state_dict: a saved optimizer resumes bit for bit, in memory and on disk."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

import fusedopt
import fusedopt.keras_numpy as fk
from fusedopt import reference

SHAPES = [(7,), (3, 5), (0,), (65,)]


def make_params(dtype: type, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for shape in SHAPES]


def make_grads(rng: np.random.Generator, params: list[np.ndarray]) -> list[np.ndarray]:
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


def groups(params: list[np.ndarray], first: dict, second: dict) -> list[dict]:
    """Two groups with their own options: the first two params, then the rest."""
    return [{"params": params[:2], **first}, {"params": params[2:], **second}]


# Each maker builds an optimizer with two groups whose variants differ, so the state holds
# every kind of buffer the class has (and params without some of them).
MAKERS: dict[str, Callable[[list[np.ndarray]], Any]] = {
    "SGD": lambda ps: fusedopt.SGD(
        groups(ps, dict(momentum=0.9, nesterov=True), dict(momentum=0.0)),
        lr=0.05,
        weight_decay=0.01,
    ),
    "SGD_dampening": lambda ps: fusedopt.SGD(
        groups(ps, dict(momentum=0.8, dampening=0.3), dict(momentum=0.5, maximize=True)), lr=0.05
    ),
    "Adagrad": lambda ps: fusedopt.Adagrad(
        groups(ps, dict(lr_decay=0.1), dict(initial_accumulator_value=0.3)), lr=0.05
    ),
    "RMSprop": lambda ps: fusedopt.RMSprop(
        groups(ps, dict(centered=True, momentum=0.7), dict(weight_decay=0.1)), lr=0.01
    ),
    "RMSprop_momentum": lambda ps: fusedopt.RMSprop(
        groups(ps, dict(momentum=0.5), dict(centered=True)), lr=0.01, alpha=0.9
    ),
    "Adam": lambda ps: fusedopt.Adam(
        groups(ps, dict(amsgrad=True), dict(betas=(0.8, 0.99))), lr=0.01, weight_decay=0.02
    ),
    "AdamW": lambda ps: fusedopt.AdamW(
        groups(ps, dict(amsgrad=True, maximize=True), dict(weight_decay=0.1)), lr=0.01
    ),
}


def copy_state_dict(sd: dict) -> dict:
    return {
        "state": {
            i: {k: np.copy(v) if isinstance(v, np.ndarray) else v for k, v in e.items()}
            for i, e in sd["state"].items()
        },
        "param_groups": [dict(g) for g in sd["param_groups"]],
    }


def assert_same_state(a: Any, b: Any) -> None:
    """Identical state (keys, steps and every buffer bit for bit) in two optimizers."""
    sa, sb = a.state, b.state
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys(), f"state of params[{i}]"
        for name, value in sa[i].items():
            if isinstance(value, np.ndarray):
                assert sb[i][name].dtype == value.dtype
                np.testing.assert_array_equal(sb[i][name], value, err_msg=f"state[{i}][{name}]")
            else:
                assert sb[i][name] == value, f"state[{i}][{name}]"


def train(opt: Any, params: list[np.ndarray], rng: np.random.Generator, steps: int) -> None:
    for _ in range(steps):
        opt.step(make_grads(rng, params))


def continue_alike(
    a: Any, params_a: list[np.ndarray], b: Any, params_b: list[np.ndarray], steps: int, seed: int
) -> None:
    """Steps two optimizers with the same gradients: their params and state must stay
    bit-identical."""
    train(a, params_a, np.random.default_rng(seed), steps)
    train(b, params_b, np.random.default_rng(seed), steps)
    for p, q in zip(params_a, params_b):
        np.testing.assert_array_equal(q, p)
    assert_same_state(a, b)


def resume_and_compare(name: str, dtype: type, load: Callable[[Any, dict], None]) -> None:
    """Train k steps, save, load into a fresh optimizer over copies of the params, continue
    both with the same gradients: the trajectories must be bit-identical."""
    params = make_params(dtype)
    opt = MAKERS[name](params)
    train(opt, params, np.random.default_rng(1), steps=3)
    saved = opt.state_dict()
    copies = [p.copy() for p in params]
    resumed = MAKERS[name](copies)
    load(resumed, saved)
    assert_same_state(opt, resumed)
    assert resumed.param_groups[1]["params"][0] is copies[2]
    continue_alike(opt, params, resumed, copies, steps=4, seed=2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", MAKERS)
def test_round_trip_in_memory_resumes_bit_for_bit(name: str, dtype: type) -> None:
    resume_and_compare(name, dtype, lambda opt, sd: opt.load_state_dict(sd))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", MAKERS)
def test_round_trip_through_npz_resumes_bit_for_bit(name: str, dtype: type, tmp_path: Any) -> None:
    path = tmp_path / "optimizer.npz"

    def through_file(opt: Any, sd: dict) -> None:
        np.savez(path, **fusedopt.flatten_state_dict(sd))
        with np.load(path) as flat:  # allow_pickle stays False: every entry is a plain array
            opt.load_state_dict(flat)

    resume_and_compare(name, dtype, through_file)


def test_flat_state_dict_holds_only_arrays_and_keeps_dtypes() -> None:
    params = make_params(np.float32)
    opt = MAKERS["Adam"](params)
    train(opt, params, np.random.default_rng(1), steps=2)
    flat = fusedopt.flatten_state_dict(opt.state_dict())
    assert all(isinstance(v, np.ndarray) for v in flat.values())
    assert flat["state/0/exp_avg"].dtype == np.float32
    assert flat["state/0/max_exp_avg_sq"].shape == SHAPES[0]
    assert "state/2/max_exp_avg_sq" not in flat  # the second group has no amsgrad
    assert int(flat["state/3/step"]) == 2


def test_state_dict_holds_copies() -> None:
    params = make_params(np.float64)
    opt = MAKERS["Adam"](params)
    train(opt, params, np.random.default_rng(1), steps=2)
    sd = opt.state_dict()
    live = opt.state[0]["exp_avg"]
    before = live.copy()
    sd["state"][0]["exp_avg"][...] = 123.0
    sd["state"][0]["step"] = 99
    sd["param_groups"][0]["lr"] = 5.0
    sd["param_groups"][0]["params"].append(7)
    np.testing.assert_array_equal(live, before)
    assert opt.state[0]["step"] == 2
    assert opt.param_groups[0]["lr"] == 0.01
    assert opt.param_groups[0]["params"][1] is params[1]


def test_loaded_buffers_are_copies_of_the_state_dict() -> None:
    params = make_params(np.float64)
    opt = MAKERS["RMSprop"](params)
    train(opt, params, np.random.default_rng(1), steps=2)
    sd = opt.state_dict()
    resumed = MAKERS["RMSprop"]([p.copy() for p in params])
    resumed.load_state_dict(sd)
    saved = sd["state"][0]["square_avg"].copy()
    resumed.step(make_grads(np.random.default_rng(3), params))
    np.testing.assert_array_equal(sd["state"][0]["square_avg"], saved)
    sd["state"][1]["grad_avg"][...] = 7.0
    assert not np.any(resumed.state[1]["grad_avg"] == 7.0)


def test_state_dict_indexes_params_across_groups() -> None:
    params = make_params(np.float32)
    sd = MAKERS["SGD"](params).state_dict()
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    assert sd["param_groups"][0]["momentum"] == 0.9
    assert sd["param_groups"][1]["momentum"] == 0.0


def test_hyperparameters_changed_in_the_state_dict_are_restored() -> None:
    """A group's lr, betas and amsgrad come from the state dict, and the next steps use them."""
    rng = np.random.default_rng(4)
    p0 = rng.standard_normal(20)
    opt = fusedopt.Adam([p0.copy()], lr=0.01)
    g = rng.standard_normal(20)
    opt.step([g])
    sd = opt.state_dict()
    sd["param_groups"][0].update(lr=0.2, betas=(0.5, 0.75), amsgrad=True, weight_decay=0.1)
    p = opt.param_groups[0]["params"][0].copy()
    resumed = fusedopt.Adam([p], lr=0.01)
    resumed.load_state_dict(sd)
    group = resumed.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["amsgrad"], group["weight_decay"]) == (
        0.2,
        (0.5, 0.75),
        True,
        0.1,
    )
    assert group["params"][0] is p
    expected, state = reference.torch_adam(p0, g, {}, lr=0.01)
    for _ in range(3):
        g = rng.standard_normal(20)
        resumed.step([g])
        expected, state = reference.torch_adam(
            expected, g, state, lr=0.2, beta1=0.5, beta2=0.75, amsgrad=True, weight_decay=0.1
        )
    np.testing.assert_allclose(p, expected, rtol=1e-12)


def test_hyperparameters_survive_the_npz_round_trip(tmp_path: Any) -> None:
    opt = fusedopt.Adam([np.zeros(3)], lr=0.01)
    opt.param_groups[0].update(lr=0.25, betas=(0.5, 0.6), amsgrad=True)
    np.savez(tmp_path / "s.npz", **fusedopt.flatten_state_dict(opt.state_dict()))
    resumed = fusedopt.Adam([np.zeros(3)])
    resumed.load_state_dict(np.load(tmp_path / "s.npz"))
    group = resumed.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["amsgrad"]) == (0.25, (0.5, 0.6), True)


def test_state_dict_of_numpy_hyperparameters_is_plain_python() -> None:
    """lr held as a NumPy scalar (as a schedule might write it) is saved as a float."""
    opt = fusedopt.SGD([np.zeros(3)], lr=0.1)
    opt.param_groups[0]["lr"] = np.float32(0.5)
    saved = opt.state_dict()["param_groups"][0]["lr"]
    assert type(saved) is float and saved == 0.5


@pytest.mark.parametrize("lr", [Fraction(1, 10), Decimal("0.1")], ids=["Fraction", "Decimal"])
def test_state_dict_of_fraction_and_decimal_hyperparameters_is_plain_python(lr: Any) -> None:
    """Taken as torch takes them (and kept in param_groups as given), then saved as the float
    every step used: flatten_state_dict refused them, JSON having no such number."""
    opt = fusedopt.Adam([np.zeros(3)], lr=lr, betas=(Fraction(9, 10), 0.999))
    opt.step([np.ones(3)])
    assert opt.param_groups[0]["lr"] is lr
    flat = fusedopt.flatten_state_dict(opt.state_dict())
    resumed = fusedopt.Adam([np.zeros(3)])
    resumed.load_state_dict(flat)
    group = resumed.param_groups[0]
    assert type(group["lr"]) is float and group["lr"] == 0.1 and group["betas"] == (0.9, 0.999)


def test_sgd_state_dict_has_no_step_and_resumes_past_the_first_step() -> None:
    """torch's SGD keeps no step; a loaded buffer must not be treated as a first step."""
    rng = np.random.default_rng(5)
    p = rng.standard_normal(10)
    opt = fusedopt.SGD([p], lr=0.1, momentum=0.9, dampening=0.5)
    opt.step([rng.standard_normal(10)])
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"momentum_buffer"}
    q = p.copy()
    resumed = fusedopt.SGD([q], lr=0.1, momentum=0.9, dampening=0.5)
    resumed.load_state_dict(sd)
    g = rng.standard_normal(10)
    opt.step([g])
    resumed.step([g.copy()])
    np.testing.assert_array_equal(q, p)


def test_refused_step_leaves_no_state_behind() -> None:
    """A step the core refuses creates no buffers, so saving and loading afterwards resumes as
    if it never happened (a zero SGD buffer would otherwise skip torch's first-step rule)."""
    p = np.ones(4)
    opt = fusedopt.SGD([p], lr=0.1, momentum=0.9, dampening=0.5)
    with pytest.raises(TypeError, match=r"grads\[0\]"):
        opt.step([np.ones(4, np.float32)])
    assert opt.state == {}
    q = np.ones(4)
    resumed = fusedopt.SGD([q], lr=0.1, momentum=0.9, dampening=0.5)
    resumed.load_state_dict(opt.state_dict())
    opt.step([np.ones(4)])
    resumed.step([np.ones(4)])
    np.testing.assert_array_equal(q, p)
    np.testing.assert_array_equal(p, 0.9)  # the first step copies the gradient: buf = g


@pytest.mark.parametrize("name", MAKERS)
def test_reset_state_restarts_as_a_fresh_optimizer(name: str) -> None:
    params = make_params(np.float64)
    opt = MAKERS[name](params)
    train(opt, params, np.random.default_rng(1), steps=3)
    opt.reset_state()
    copies = [p.copy() for p in params]
    fresh = MAKERS[name](copies)
    assert_same_state(opt, fresh)
    continue_alike(opt, params, fresh, copies, steps=2, seed=6)


def test_state_buffers_are_created_and_loaded_state_by_state(monkeypatch: Any) -> None:
    """Every param's exp_avg, then every param's exp_avg_sq, when created and when loaded: one
    state's buffers of consecutive params are allocated one after another, as a step streams
    them (side by side per param, they cost Adam over 1000 x 1000 about 8%)."""
    import fusedopt.optim

    made: list[tuple[str, int]] = []
    params = [np.ones(1000, np.float32) for _ in range(3)]
    full_like, state_array = fusedopt.optim._full_like, fusedopt.optim._state_array

    def full_like_recorded(param: Any, value: float, dtype: str) -> Any:
        made.append(("new", next(i for i, p in enumerate(params) if p is param)))
        return full_like(param, value, dtype)

    def state_array_recorded(value: Any, param: Any, i: int, name: str, *rest: Any) -> Any:
        made.append((name, i))
        return state_array(value, param, i, name, *rest)

    monkeypatch.setattr(fusedopt.optim, "_full_like", full_like_recorded)
    monkeypatch.setattr(fusedopt.optim, "_state_array", state_array_recorded)
    opt = fusedopt.Adam(params, amsgrad=True)
    opt.step([np.ones(1000, np.float32)] * 3)
    assert made == [("new", 0), ("new", 1), ("new", 2)] * 3
    made.clear()
    sd = opt.state_dict()
    fusedopt.Adam(params, amsgrad=True).load_state_dict(sd)
    names = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    assert made == [(name, i) for name in names for i in range(3)]


def test_saved_states_map_to_params_through_the_saved_groups_ids_as_torch_maps_them() -> None:
    """A state dict whose groups list their param ids in another order (one made by hand, or by
    a tool that numbers params its own way): the k-th id listed is the k-th param, as
    torch.optim's load_state_dict maps it, not the param whose index is the id."""
    params = [np.full(3, float(i), np.float32) for i in range(3)]
    opt = fusedopt.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    opt.step([np.full(3, float(i + 1), np.float32) for i in range(3)])
    sd = copy_state_dict(opt.state_dict())
    ids = [2, 0, 1]  # saved param 0 is id 2, 1 is id 0, 2 is id 1
    permuted = {
        "state": {ids[i]: entry for i, entry in sd["state"].items()},
        "param_groups": [
            {**sd["param_groups"][0], "params": ids[:2]},
            {**sd["param_groups"][1], "params": ids[2:]},
        ],
    }
    resumed = fusedopt.Adam(
        [{"params": [p.copy() for p in params[:2]]}, {"params": [params[2].copy()]}], lr=0.1
    )
    resumed.load_state_dict(permuted)
    assert_same_state(opt, resumed)
    torch = pytest.importorskip("torch")
    tensors = [torch.zeros(3, requires_grad=True) for _ in range(3)]
    reference = torch.optim.Adam([{"params": tensors[:2]}, {"params": tensors[2:]}], lr=0.1)
    state = permuted["state"]
    tensor_state = {k: {n: torch.as_tensor(v) for n, v in e.items()} for k, e in state.items()}
    reference.load_state_dict({"state": tensor_state, "param_groups": permuted["param_groups"]})
    for i, t in enumerate(tensors):  # torch put saved param i's state on param i too
        np.testing.assert_array_equal(
            reference.state[t]["exp_avg"].numpy(), sd["state"][i]["exp_avg"]
        )


def test_a_refusal_names_the_saved_state_by_its_id() -> None:
    """Messages name an entry as the state dict keys it (its saved id), not by the position of
    the param it maps to."""
    params = [np.full(3, float(i), np.float32) for i in range(3)]
    opt = fusedopt.Adam(params, lr=0.1)
    opt.step([np.ones(3, np.float32)] * 3)
    sd = copy_state_dict(opt.state_dict())
    ids = [10, 20, 30]
    renumbered = {
        "state": {ids[i]: entry for i, entry in sd["state"].items()},
        "param_groups": [{**sd["param_groups"][0], "params": ids}],
    }
    del renumbered["state"][30]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"state\[30\] has no 'exp_avg_sq'"):
        fusedopt.Adam([p.copy() for p in params], lr=0.1).load_state_dict(renumbered)
    renumbered["state"][30]["exp_avg_sq"] = np.zeros(4, np.float32)
    with pytest.raises(
        ValueError, match=r"state\[30\]\['exp_avg_sq'\] has shape \(4,\), params\[2\]"
    ):
        fusedopt.Adam([p.copy() for p in params], lr=0.1).load_state_dict(renumbered)
    renumbered["state"][30]["exp_avg_sq"] = np.zeros(3, np.float32)
    renumbered["state"][20]["step"] = 2.5
    with pytest.raises(ValueError, match=r"state\[20\]\['step'\] must be a whole number"):
        fusedopt.Adam([p.copy() for p in params], lr=0.1).load_state_dict(renumbered)


def test_a_param_id_listed_twice_is_refused() -> None:
    params = [np.ones(3, np.float32) for _ in range(2)]
    opt = fusedopt.Adam(params, lr=0.1)
    opt.step([np.ones(3, np.float32)] * 2)
    sd = copy_state_dict(opt.state_dict())
    sd["param_groups"][0]["params"] = [1, 1]
    with pytest.raises(ValueError, match="param id 1 is listed twice"):
        fusedopt.Adam([p.copy() for p in params], lr=0.1).load_state_dict(sd)


def test_two_state_keys_naming_one_param_are_refused() -> None:
    """1 and '1' (a dict's keys, np.int64(1) and 1.0 are the key 1 itself), as a param id
    listed twice in the groups is: the later entry silently won."""
    other = "1"
    params = [np.ones(3, np.float32) for _ in range(2)]
    opt = fusedopt.Adam(params, lr=0.1)
    opt.step([np.ones(3, np.float32)] * 2)
    sd = copy_state_dict(opt.state_dict())
    sd["state"][other] = {k: np.copy(v) for k, v in sd["state"][0].items()}
    before = copy_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match=f"state keys 1 and {other!r} both name param id 1"):
        opt.load_state_dict(sd)
    for name, value in before["state"][1].items():
        np.testing.assert_array_equal(opt.state[1][name], value)


@pytest.mark.parametrize("key", [" 1", "0_1", "01", "+1", "\u0661", b"1"])
def test_a_param_id_that_is_not_an_int_s_digits_is_refused(key: Any) -> None:
    """int() reads all of these as 1 (two of them could name one param); a state dict holds ints,
    or their digits as str() writes them (through JSON)."""
    params = [np.ones(3, np.float32) for _ in range(2)]
    opt = fusedopt.Adam(params, lr=0.1)
    opt.step([np.ones(3, np.float32)] * 2)
    sd = copy_state_dict(opt.state_dict())
    sd["state"][key] = sd["state"].pop(1)
    with pytest.raises(TypeError, match="param ids must be whole numbers"):
        opt.load_state_dict(sd)
    sd = copy_state_dict(opt.state_dict())
    sd["param_groups"][0]["params"] = [0, key]
    with pytest.raises(TypeError, match="param ids must be whole numbers"):
        opt.load_state_dict(sd)
    flat = fusedopt.flatten_state_dict(opt.state_dict())
    flat[f"state/{key}/step"] = flat.pop("state/1/step")
    with pytest.raises(ValueError, match="not a param index"):
        opt.load_state_dict(flat)


def test_param_ids_as_strings_of_digits_load() -> None:
    """A state dict written through JSON has string keys: they still map as the ints do."""
    params = [np.ones(3, np.float32) for _ in range(2)]
    opt = fusedopt.Adam(params, lr=0.1)
    opt.step([np.ones(3, np.float32), np.full(3, 2.0, np.float32)])
    sd = copy_state_dict(opt.state_dict())
    sd["state"] = {str(i): entry for i, entry in sd["state"].items()}
    sd["param_groups"][0]["params"] = ["0", "1"]
    resumed = fusedopt.Adam([p.copy() for p in params], lr=0.1)
    resumed.load_state_dict(sd)
    assert_same_state(opt, resumed)


def test_adagrad_fills_every_sum_from_the_constructors_value_as_torch_does() -> None:
    """torch's Adagrad fills the sums of every group at construction from its constructor's
    initial_accumulator_value, a group's own unread, and a param added later from its defaults'."""
    first, second, added = np.zeros(2), np.zeros(2), np.zeros(2)
    opt = fusedopt.Adagrad(
        [{"params": [first]}, {"params": [second], "initial_accumulator_value": 0.25}],
        lr=0.1,
        initial_accumulator_value=0.5,
    )
    opt.add_param_group({"params": [added], "initial_accumulator_value": 0.75})
    np.testing.assert_array_equal([opt.state[i]["sum"] for i in range(3)], np.full((3, 2), 0.5))


def test_state_is_empty_before_the_first_step_except_adagrad_sums() -> None:
    params = make_params(np.float32)
    assert MAKERS["Adam"](params).state == {}
    state = MAKERS["Adagrad"](params).state
    assert sorted(state) == [0, 1, 2, 3]
    np.testing.assert_array_equal(state[2]["sum"], np.full(SHAPES[2], 0.3, np.float32))
    np.testing.assert_array_equal(state[0]["sum"], 0.0)


def test_load_into_an_unstepped_optimizer_then_save_again_is_identical() -> None:
    params = make_params(np.float32)
    opt = MAKERS["AdamW"](params)
    train(opt, params, np.random.default_rng(1), steps=2)
    sd = opt.state_dict()
    resumed = MAKERS["AdamW"]([p.copy() for p in params])
    resumed.load_state_dict(copy_state_dict(sd))
    again = resumed.state_dict()
    assert again["param_groups"] == sd["param_groups"]
    for i, entry in sd["state"].items():
        for key, value in entry.items():
            np.testing.assert_array_equal(again["state"][i][key], value)


@pytest.mark.parametrize(
    "step", [2**53 + 1, 2**62 - 1, 2**62, 2**63 - 2], ids=["2**53+1", "2**62-1", "2**62", "2**63-2"]
)
def test_large_step_counts_load_exactly(step: int, tmp_path: Any) -> None:
    """Integers are read as integers: a float64 on the way would round 2**53 + 1 and 2**62 - 1.
    Every count a step reaches loads again (2**62 + 1, stepped from 2**62, was refused)."""
    params = make_params(np.float32)
    opt = MAKERS["Adam"](params)
    train(opt, params, np.random.default_rng(1), steps=1)
    saved = opt.state_dict()
    for entry in saved["state"].values():
        entry["step"] = step
    target = MAKERS["Adam"]([p.copy() for p in params])
    target.load_state_dict(saved)
    assert [e["step"] for e in target.state.values()] == [step] * len(params)
    path = tmp_path / "optimizer.npz"
    np.savez(path, **fusedopt.flatten_state_dict(target.state_dict()))
    again = MAKERS["Adam"]([p.copy() for p in params])
    with np.load(path) as flat:
        again.load_state_dict(flat)
    assert [e["step"] for e in again.state.values()] == [step] * len(params)
    again.step(make_grads(np.random.default_rng(3), params))
    assert [e["step"] for e in again.state.values()] == [step + 1] * len(params)
    target.load_state_dict(again.state_dict())
    assert [e["step"] for e in target.state.values()] == [step + 1] * len(params)


def test_the_last_step_count_loads_and_is_not_advanced() -> None:
    """2**63 - 1, which a step reaches from 2**63 - 2: it loads, and the next step is refused
    (the count has no next), nothing modified."""
    params = make_params(np.float32)
    opt = MAKERS["Adam"](params)
    train(opt, params, np.random.default_rng(1), steps=1)
    saved = opt.state_dict()
    for entry in saved["state"].values():
        entry["step"] = 2**63 - 1
    opt.load_state_dict(saved)
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match=r"2\*\*63 - 1"):
        opt.step(make_grads(np.random.default_rng(3), params))
    assert all(np.array_equal(p, b) for p, b in zip(params, before))
    assert [e["step"] for e in opt.state.values()] == [2**63 - 1] * len(params)


@pytest.mark.parametrize(
    "step",
    [2**63, 2**64, np.uint64(2**63), -1, 2.5, np.float64(3.5), np.array([2**63], np.uint64)],
    ids=["2**63", "2**64", "np.uint64(2**63)", "-1", "2.5", "np.float64(3.5)", "array([2**63])"],
)
def test_step_counts_that_are_not_whole_or_out_of_range_are_refused(step: Any) -> None:
    params = make_params(np.float32)
    opt = MAKERS["Adam"](params)
    train(opt, params, np.random.default_rng(1), steps=1)
    saved = opt.state_dict()
    saved["state"][0]["step"] = step
    with pytest.raises(ValueError, match=r"state\[0\]\['step'\] must be a whole number in \[0, "):
        opt.load_state_dict(saved)
    assert opt.state[0]["step"] == 1


def test_whole_step_counts_of_any_numeric_type_load() -> None:
    params = make_params(np.float32)
    opt = MAKERS["Adam"](params)
    train(opt, params, np.random.default_rng(1), steps=1)
    saved = opt.state_dict()
    for i, step in enumerate([np.int32(7), 8.0, np.array(9, np.uint64), np.array([10.0])]):
        saved["state"][i]["step"] = step
    opt.load_state_dict(saved)
    assert [opt.state[i]["step"] for i in range(4)] == [7, 8, 9, 10]


def test_states_options_add_later_may_be_absent_from_a_loaded_entry() -> None:
    """Options that add a state (amsgrad, centered, momentum) may be switched on after the
    first step; a loaded entry without that state then starts it, as a live optimizer does."""
    for cls, saved_options, loaded_options in [
        (fusedopt.Adam, dict(lr=0.01), dict(amsgrad=True)),
        (fusedopt.RMSprop, dict(lr=0.01), dict(centered=True, momentum=0.5)),
        (fusedopt.SGD, dict(lr=0.01), dict(momentum=0.9)),
    ]:
        params = make_params(np.float32)
        live = cls(params, **saved_options)
        train(live, params, np.random.default_rng(1), steps=2)
        saved = live.state_dict()
        copies = [p.copy() for p in params]
        resumed = cls(copies, **saved_options)
        resumed.load_state_dict(saved)
        for opt in (live, resumed):
            opt.param_groups[0].update(loaded_options)
        continue_alike(live, params, resumed, copies, steps=2, seed=2)


def test_params_without_state_and_unstepped_adagrad_sums_load() -> None:
    params = make_params(np.float32)
    opt = MAKERS["Adam"](params)
    train(opt, params, np.random.default_rng(1), steps=1)
    saved = opt.state_dict()
    del saved["state"][1]
    opt.load_state_dict(saved)
    assert 1 not in opt.state and opt.state[0]["step"] == 1
    adagrad = fusedopt.Adagrad(make_params(np.float32))
    adagrad.load_state_dict(adagrad.state_dict())
    assert "step" not in adagrad.state[0] and "sum" in adagrad.state[0]


COPIED = {
    **MAKERS,
    "NAdam": lambda ps: fusedopt.NAdam(ps, lr=0.01),
    "ASGD": lambda ps: fusedopt.ASGD(ps, lr=0.01, t0=1),
    "Adam_bfloat16_state": lambda ps: fusedopt.Adam(ps, lr=0.01, state_dtype="bfloat16"),
}
COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda thing: pickle.loads(pickle.dumps(thing)),
}


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("name", COPIED)
def test_a_copied_optimizer_is_independent_and_continues_the_same_trajectory(
    name: str, how: str
) -> None:
    """As torch.optim's optimizers do, ours deepcopy and pickle (with their params, as a model
    and its optimizer are copied together): the copy owns copies of every array."""
    params = make_params(np.float32)
    opt = COPIED[name](params)
    train(opt, params, np.random.default_rng(1), steps=3)
    copied_params, twin = COPIES[how]((params, opt))
    assert [p for g in twin.param_groups for p in g["params"]] == copied_params
    assert not any(np.shares_memory(p, q) for p in params for q in copied_params)
    saved, values = copy_state_dict(opt.state_dict()), [p.copy() for p in params]
    train(twin, copied_params, np.random.default_rng(2), steps=3)
    for p, value in zip(params, values):
        np.testing.assert_array_equal(p, value)
    assert opt.state.keys() == saved["state"].keys()
    for i, entry in saved["state"].items():
        for key, value in entry.items():
            np.testing.assert_array_equal(opt.state[i][key], value)
    train(opt, params, np.random.default_rng(2), steps=3)
    for p, q in zip(params, copied_params):
        np.testing.assert_array_equal(q, p)
    assert_same_state(opt, twin)


KERAS_COPIED = {
    "Adam": lambda: fk.Adam(learning_rate=0.01, amsgrad=True),
    "Nadam": lambda: fk.Nadam(learning_rate=0.01),
    "SGD": lambda: fk.SGD(learning_rate=0.01, momentum=0.9),
    "Lamb_master": lambda: fk.Lamb(learning_rate=0.01, master_weights=True),
}


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("name", KERAS_COPIED)
def test_a_copied_keras_style_optimizer_is_independent_and_continues_the_same_trajectory(
    name: str, how: str
) -> None:
    dtype = np.float16 if name.endswith("master") else np.float32
    variables = make_params(dtype)
    opt = KERAS_COPIED[name]()
    rng = np.random.default_rng(1)
    for _ in range(3):
        opt.apply(make_grads(rng, variables), variables)
    copied_variables, twin = COPIES[how]((variables, opt))
    values = [v.copy() for v in variables]
    rng_a, rng_b = np.random.default_rng(2), np.random.default_rng(2)
    for _ in range(3):
        twin.apply(make_grads(rng_b, copied_variables), copied_variables)
    for v, value in zip(variables, values):
        np.testing.assert_array_equal(v, value)
    for _ in range(3):
        opt.apply(make_grads(rng_a, variables), variables)
    for v, w in zip(variables, copied_variables):
        np.testing.assert_array_equal(w, v)
    assert opt.iterations == twin.iterations == 6
    assert opt.state.keys() == twin.state.keys()
    for i, entry in opt.state.items():
        for key, value in entry.items():
            np.testing.assert_array_equal(twin.state[i][key], value)


def test_assigning_into_the_state_view_is_refused_and_in_place_changes_take_effect() -> None:
    """optimizer.state is built from the optimizer's own arrays at each access: an assignment
    into it (``state[0]["step"] = 0``, which torch's optimizers would read) was silently lost.
    It is refused, naming the way that works; a buffer changed in place is the live buffer."""
    param = np.ones(4, np.float32)
    opt = fusedopt.Adam([param], lr=0.1)
    opt.step([np.ones(4, np.float32)])
    before = opt.state_dict()
    for change in (
        lambda s: s[0].__setitem__("step", 0),
        lambda s: s[0].__setitem__("exp_avg", np.zeros(4, np.float32)),
        lambda s: s[0].pop("exp_avg_sq"),
        lambda s: s[0].update(step=3),
        lambda s: s.__setitem__(0, {}),
        lambda s: s.clear(),
    ):
        with pytest.raises(TypeError, match="in place"):
            change(opt.state)
    after = opt.state_dict()
    assert after["state"][0]["step"] == before["state"][0]["step"]
    for name in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(after["state"][0][name], before["state"][0][name])
    opt.state[0]["exp_avg"][...] = 0.0
    np.testing.assert_array_equal(opt.state_dict()["state"][0]["exp_avg"], 0.0)
    plain = copy.deepcopy(opt.state)
    plain[0]["step"] = 7  # a copy is an ordinary dict
    assert type(pickle.loads(pickle.dumps(opt.state))) is dict


def test_the_keras_style_state_view_refuses_assignment_and_keeps_a_restored_master() -> None:
    """keras_numpy's state is a view too (assignment refused, in-place changes live); a master
    restored through it beside its variable's rounding is kept at the first step, not replaced
    by that rounding (a variable written to something else starts its master again)."""
    from fusedopt._engine import numpy_dtype

    bf16 = numpy_dtype("bfloat16")
    results = []
    for restore in (False, True):
        variable = np.zeros(4, bf16)
        opt = fk.SGD(learning_rate=0.5, master_weights=True)
        opt.build([variable])
        with pytest.raises(TypeError, match="in place"):
            opt.state[0]["master"] = np.zeros(4, np.float32)
        master = np.float32(1.0) + np.float32(2.0) ** -12  # not a bfloat16
        if restore:
            opt.state[0]["master"][...] = master
            variable[...] = np.float32(master).astype(bf16)
        else:
            variable[...] = np.float32(master).astype(bf16)
        opt.apply([np.ones(4, bf16)], [variable])
        results.append(opt.state[0]["master"].copy())
    np.testing.assert_array_equal(results[1], master - np.float32(0.5))
    np.testing.assert_array_equal(results[0], np.float32(1.0) - np.float32(0.5))
