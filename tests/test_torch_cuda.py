"""fusedopt.torch on CUDA tensors, beside torch.optim on the same device.

Every algorithm in float32 and float64 follows torch.optim (``foreach=False``, which on CUDA runs
the same single-tensor formulas as on the CPU) over a trajectory with a scheduler and a param
whose grad is missing on some steps; state dicts interchange with torch.optim mid-run; GradScaler
skips an inf step on the device; one optimizer over CPU and CUDA params steps each device once;
a step follows a param moved to new device memory. The whole file skips, saying why, where no
GPU or no fusedopt CUDA backend is usable: run it on a GPU machine (``.ci/gpu-check``).
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
import fusedopt.cuda  # noqa: E402
import fusedopt.torch as ft  # noqa: E402

if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device here", allow_module_level=True)
if not fusedopt.cuda.is_available():
    pytest.skip(
        f"fusedopt's CUDA backend is not usable: {fusedopt.cuda.unavailable_reason()}",
        allow_module_level=True,
    )

from test_torch import CASES, assert_close, case_id, compare, grads_for  # noqa: E402

DEVICE = torch.device("cuda", 0)
STEPS = 30


def model_params(dtype: Any, device: Any = DEVICE, seed: int = 0) -> list[Any]:
    """Made on the CPU from a seeded generator and moved, so every device starts alike; one
    tensor large enough for several blocks of a launch."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (33,), (1,), (0,), (4, 4), (3, 70001)]
    return [
        torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype).to(device))
        for s in shapes
    ]


def run(optimizer: Any, params: list[Any], steps: range, scheduler: Any = None) -> None:
    """tests/test_torch.py's run, then waits for the device."""
    for step in steps:
        for p, g in zip(params, grads_for(step, params)):
            p.grad = None if g is None else g.clone()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=map(case_id, CASES))
def test_cuda_trajectory_matches_torch_optim_with_a_scheduler(case: tuple, dtype: Any) -> None:
    name, options = case
    ours_params, their_params = model_params(dtype), model_params(dtype)
    ours = getattr(ft, name)(ours_params, lr=0.01, **options)
    theirs = getattr(torch.optim, name)(their_params, lr=0.01, foreach=False, **options)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10) for o in (ours, theirs)]
    run(ours, ours_params, range(STEPS), schedulers[0])
    run(theirs, their_params, range(STEPS), schedulers[1])
    assert all(p.device == DEVICE for p in ours_params)
    compare(ours, theirs, ours_params, their_params, dtype)


@pytest.mark.parametrize("case", CASES, ids=map(case_id, CASES))
@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_cuda_state_dicts_interchange_mid_run(case: tuple, direction: str) -> None:
    name, options = case
    dtype = torch.float64
    first_params, reference_params = model_params(dtype), model_params(dtype)
    make_first = getattr(torch.optim if direction == "torch_to_fusedopt" else ft, name)
    make_second = getattr(ft if direction == "torch_to_fusedopt" else torch.optim, name)
    first = make_first(first_params, lr=0.01, **options)
    reference = getattr(torch.optim, name)(reference_params, lr=0.01, foreach=False, **options)
    run(first, first_params, range(10))
    run(reference, reference_params, range(20))
    second = make_second(first_params, lr=0.01, **options)
    second.load_state_dict(first.state_dict())
    run(second, first_params, range(10, 20))
    for a, b in zip(first_params, reference_params):
        assert_close(a.detach(), b.detach(), dtype, name)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_cuda_grad_scaler_skips_an_inf_step_and_unscales_the_others(name: str) -> None:
    options = {"momentum": 0.9} if name == "SGD" else {}
    results = []
    for module in (ft, torch.optim):
        params = model_params(torch.float32)
        extra = {} if module is ft else {"fused": True}
        optimizer = getattr(module, name)(params, lr=0.01, **options, **extra)
        scaler = torch.amp.GradScaler("cuda", init_scale=256.0)
        for step in range(6):
            scale = scaler.scale(torch.ones((), device=DEVICE)).item()
            for p, g in zip(params, grads_for(step, params)):
                p.grad = None if g is None else g * scale
            if step == 2:
                params[0].grad[0, 0] = float("inf")
            scaler.step(optimizer)
            scaler.update()
        torch.cuda.synchronize()
        results.append((params, optimizer.state_dict()["state"][0].get("step")))
    (ours, our_step), (theirs, their_step) = results
    for a, b in zip(ours, theirs):
        assert_close(a.detach(), b.detach(), torch.float32, name)
    assert our_step is None or float(our_step) == float(their_step) == 5.0


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_one_optimizer_over_cpu_and_cuda_params_steps_each_device_once(name: str) -> None:
    """Params on both devices in one group: each device's params take exactly torch's step."""
    dtype = torch.float64
    cpu, gpu = model_params(dtype, "cpu", seed=1), model_params(dtype, DEVICE, seed=2)
    ours_params = [p for pair in zip(cpu, gpu) for p in pair]
    cpu_ref, gpu_ref = model_params(dtype, "cpu", seed=1), model_params(dtype, DEVICE, seed=2)
    their_params = [p for pair in zip(cpu_ref, gpu_ref) for p in pair]
    ours = getattr(ft, name)(ours_params, lr=0.01)
    theirs = getattr(torch.optim, name)(their_params, lr=0.01, foreach=False)
    run(ours, ours_params, range(8))
    run(theirs, their_params, range(8))
    for i, (a, b) in enumerate(zip(ours_params, their_params)):
        assert a.device == b.device
        assert_close(a.detach(), b.detach(), dtype, f"params[{i}] on {a.device}")


def test_a_cuda_param_whose_memory_moves_is_followed() -> None:
    """A param given new device memory (param.data = ...) is stepped there; the old memory is
    left alone."""
    params, reference = model_params(torch.float64), model_params(torch.float64)
    ours = ft.Adam(params, lr=0.1)
    theirs = torch.optim.Adam(reference, lr=0.1, foreach=False)
    run(ours, params, range(3))
    run(theirs, reference, range(3))
    old = params[0].data
    params[0].data = old.clone()
    frozen = old.clone()
    run(ours, params, range(3, 6))
    run(theirs, reference, range(3, 6))
    assert torch.equal(old, frozen)
    assert_close(params[0].detach(), reference[0].detach(), torch.float64, "moved param")


def test_a_cpu_grad_for_a_cuda_param_is_refused_with_nothing_written() -> None:
    params = model_params(torch.float32)
    optimizer = ft.Adam(params, lr=0.1)
    run(optimizer, params, range(2))
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads_for(2, params)):
        p.grad = None if g is None else g.clone()
    # torch refuses such an assignment to .grad, not to .grad.data
    params[2].grad.data = params[2].grad.data.cpu()
    assert params[2].grad.device.type == "cpu"
    with pytest.raises((TypeError, ValueError), match=r"params\[2\]"):
        optimizer.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
