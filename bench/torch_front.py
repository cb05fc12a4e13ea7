"""fusedopt.torch, the drop-in torch.optim classes, against torch.optim over torch tensors: GPT-2
small's parameter shapes (AdamW, RMSprop, Adagrad; AdamW over bfloat16 params with fusedopt's
float32 master against torch's fused bfloat16 AdamW, which keeps none), one flat tensor against
many small ones (Adam), the many with a different seventh of them without a grad at each step,
fusedopt's NumPy API over views of the same memory, and DeepSpeed's CPU Adam where it builds.

Every optimizer of a case updates the same param tensors in turn (an AdamW step moves a param by
about lr, so the values stay ordinary) and reads the same ``p.grad``: memory is the params and
grads once plus each optimizer's own state."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fusedopt
from bench.algorithms import LR, WEIGHT_DECAY, best_isa
from bench.timing import Candidate, Timing, measure

FUSEDOPT_TORCH = "fusedopt.torch"
PYTHON_CHECKS = ", Python checks"
NUMPY_VIEWS = "fusedopt NumPy views"
DEEPSPEED = "DeepSpeed CPU Adam"


@dataclass(frozen=True)
class Gpt2:
    """GPT-2's parameter shapes (Hugging Face's layout: Conv1D weights are (in, out)); small is
    148 tensors, 124,439,808 elements."""

    blocks: int = 12
    d_model: int = 768
    vocab: int = 50257
    context: int = 1024

    def shapes(self) -> list[tuple[int, ...]]:
        d = self.d_model
        shapes: list[tuple[int, ...]] = [(self.vocab, d), (self.context, d)]  # wte, wpe
        for _ in range(self.blocks):
            shapes += [(d,), (d,)]  # ln_1 weight, bias
            shapes += [(d, 3 * d), (3 * d,)]  # attn.c_attn
            shapes += [(d, d), (d,)]  # attn.c_proj
            shapes += [(d,), (d,)]  # ln_2
            shapes += [(d, 4 * d), (4 * d,)]  # mlp.c_fc
            shapes += [(4 * d, d), (d,)]  # mlp.c_proj
        return shapes + [(d,), (d,)]  # ln_f

    def label(self) -> str:
        if self == Gpt2():
            return "GPT-2 small"
        return f"GPT-2 shapes, {self.blocks} blocks, d {self.d_model}, vocab {self.vocab}"


GPT2_SMALL = Gpt2()


class TorchWorkload:
    """Param tensors with a grad each (float32, or ``dtype``); ``renew`` gives every param a new
    grad tensor, as a backward pass after ``zero_grad()`` does. ``without_grad``: n, each renewal
    leaves a different nth of the params without a grad (None), as a mixture of experts' backward
    leaves the experts no token was routed to."""

    def __init__(
        self, shapes: list[tuple[int, ...]], seed: int = 0, dtype: Any = None, without_grad: int = 0
    ) -> None:
        import torch

        generator = torch.Generator().manual_seed(seed)
        self.params = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
        self.grads = [(1e-2 * torch.randn(s, generator=generator)).to(dtype) for s in shapes]
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.num_elements = sum(p.numel() for p in self.params)
        self.without_grad = without_grad
        self.renewals = 0

    def renew(self) -> None:
        self.renewals += 1
        n = self.without_grad
        for i, (p, g) in enumerate(zip(self.params, self.grads)):
            p.grad = None if n and (i + self.renewals) % n == 0 else g.clone()


def _select(threads: int) -> Callable[[], None]:
    import torch

    def select() -> None:
        fusedopt.set_cpu_isa(best_isa())
        fusedopt.set_num_threads(threads)
        torch.set_num_threads(threads)

    return select


def fusedopt_torch_candidate(
    name: str,
    w: TorchWorkload,
    options: dict[str, Any],
    threads: int,
    renew: bool,
    shim: bool = True,
) -> Candidate:
    """``shim=False``: its plan checks each step through torch's Python methods, as where
    libtorch's C shim is unusable (its first step, which makes the plan, is taken here)."""
    import fusedopt._core

    import fusedopt.torch

    optimizer = getattr(fusedopt.torch, name)(w.params, **options)
    label = f"{FUSEDOPT_TORCH} {threads}t"
    if not shim:
        was = fusedopt._core._torch_shim()
        fusedopt._core._torch_shim(False)
        try:
            optimizer.step()
        finally:
            fusedopt._core._torch_shim(was)
        label += PYTHON_CHECKS
    return Candidate(label, optimizer.step, _select(threads), w.renew if renew else None)


def numpy_views_candidate(
    name: str, w: TorchWorkload, options: dict[str, Any], threads: int
) -> Candidate:
    """fusedopt's NumPy class over ``t.numpy()`` views of the same params and grads (fixed
    grads: the views are taken once)."""
    optimizer = getattr(fusedopt, name)([p.numpy() for p in w.params], **options)
    grads = [p.grad.numpy() for p in w.params]
    return Candidate(f"{NUMPY_VIEWS} {threads}t", lambda: optimizer.step(grads), _select(threads))


def torch_candidate(
    name: str, w: TorchWorkload, options: dict[str, Any], mode: str, threads: int, renew: bool
) -> Candidate:
    """torch.optim.<name> with ``fused=True`` ("fused"), ``foreach=True`` ("foreach") or as
    constructed by default ("default": the for-loop on CPU tensors)."""
    import torch

    extra = {"fused": {"fused": True}, "foreach": {"foreach": True}, "default": {}}[mode]
    optimizer = getattr(torch.optim, name)(w.params, **options, **extra)
    return Candidate(f"torch {mode}", optimizer.step, _select(threads), w.renew if renew else None)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """DeepSpeed logs to standard output (its logger, the compiler it runs, its C++ op): the
    report owns standard output, so send all of that to standard error meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def deepspeed_candidate(
    w: TorchWorkload, options: dict[str, Any], threads: int
) -> tuple[Candidate | None, str | None]:
    """DeepSpeed's CPU Adam (AdamW mode), or None and why not. Its first use compiles the op,
    which can take minutes: that is not timed."""
    with _stdout_to_stderr():
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
        except Exception as error:  # ImportError, or its import failing on this machine
            return None, f"deepspeed is not importable here ({type(error).__name__}: {error})"
        try:
            optimizer = DeepSpeedCPUAdam(w.params, adamw_mode=True, **options)
        except Exception as error:  # the JIT build of its C++ op failed
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            return None, f"DeepSpeedCPUAdam did not build here ({type(error).__name__}: {first})"
    return Candidate(DEEPSPEED, optimizer.step, _select(threads)), None


@dataclass
class TorchCase:
    """One case's timings: ``skipped`` maps a left-out peer to the reason."""

    # gpt2-adamw, gpt2-rmsprop, gpt2-adagrad, gpt2-adamw-bfloat16, flat-adam, many-adam,
    # experts-adam
    key: str
    label: str
    tensors: int
    elements: int
    seconds: dict[str, float]
    skipped: dict[str, str]


def run_torch_cases(
    gpt2: Gpt2,
    many: tuple[int, int],
    threads: int,
    large_timing: Timing,
    timing: Timing,
    deepspeed: bool | str,
    progress: Callable[[str], None],
) -> list[TorchCase]:
    """``deepspeed``: True to try DeepSpeed's CPU Adam, or the reason it is left out."""
    cases = []
    shapes = gpt2.shapes()
    adamw = {"lr": LR, "weight_decay": WEIGHT_DECAY}

    progress(f"fusedopt.torch: AdamW, {gpt2.label()}")
    w = TorchWorkload(shapes)
    candidates = [
        fusedopt_torch_candidate("AdamW", w, adamw, threads, renew=False),
        numpy_views_candidate("AdamW", w, adamw, threads),
        torch_candidate("AdamW", w, adamw, "fused", threads, renew=False),
    ]
    skipped = {}
    if deepspeed is True:
        candidate, why = deepspeed_candidate(w, adamw, threads)
        if candidate is not None:
            candidates.append(candidate)
        else:
            skipped[DEEPSPEED] = why or ""
    else:
        skipped[DEEPSPEED] = str(deepspeed)
    cases.append(
        TorchCase(
            "gpt2-adamw",
            f"AdamW, {gpt2.label()}",
            len(shapes),
            w.num_elements,
            measure(candidates, large_timing),
            skipped,
        )
    )
    del candidates
    gc.collect()

    for name in ("RMSprop", "Adagrad"):
        progress(f"fusedopt.torch: {name}, {gpt2.label()}, vs torch's default step")
        candidates = [
            fusedopt_torch_candidate(name, w, {"lr": LR}, threads, renew=False),
            torch_candidate(name, w, {"lr": LR}, "default", threads, renew=False),
        ]
        cases.append(
            TorchCase(
                f"gpt2-{name.lower()}",
                f"{name}, {gpt2.label()}",
                len(shapes),
                w.num_elements,
                measure(candidates, large_timing),
                {},
            )
        )
        del candidates
        gc.collect()
    del w
    gc.collect()

    # Low precision: bfloat16 params and grads, fusedopt keeping a float32 master (its state
    # bfloat16, as the params), torch's fused AdamW keeping none (its state bfloat16).
    import torch

    progress(f"fusedopt.torch: AdamW, {gpt2.label()}, bfloat16, with a float32 master")
    w = TorchWorkload(shapes, dtype=torch.bfloat16)
    candidates = [
        fusedopt_torch_candidate("AdamW", w, {**adamw, "master_weights": True}, threads, False),
        torch_candidate("AdamW", w, adamw, "fused", threads, renew=False),
    ]
    cases.append(
        TorchCase(
            "gpt2-adamw-bfloat16",
            f"AdamW bfloat16 (fusedopt with a float32 master), {gpt2.label()}",
            len(shapes),
            w.num_elements,
            measure(candidates, large_timing),
            {},
        )
    )
    del candidates, w
    gc.collect()

    count, size = many
    for key, case_shapes, without_grad in (
        ("flat-adam", [(count * size,)], 0),
        ("many-adam", [(size,)] * count, 0),
        ("experts-adam", [(size,)] * count, 7),
    ):
        label = f"Adam, {len(case_shapes)} × {case_shapes[0][0]}"
        if without_grad:
            label += f", a different 1/{without_grad} of them without a grad each step"
        progress(f"fusedopt.torch: {label}, new grads every step")
        w = TorchWorkload(case_shapes, without_grad=without_grad)
        candidates = [
            fusedopt_torch_candidate("Adam", w, {"lr": LR}, threads, renew=True),
            torch_candidate("Adam", w, {"lr": LR}, "fused", threads, renew=True),
        ]
        if key == "many-adam":  # what reading tensors through libtorch's C shim saves
            candidates.append(
                fusedopt_torch_candidate("Adam", w, {"lr": LR}, threads, renew=True, shim=False)
            )
        cases.append(
            TorchCase(key, label, len(case_shapes), w.num_elements, measure(candidates, timing), {})
        )
        del candidates, w
        gc.collect()
    return cases


def fusedopt_torch_label(threads: int) -> str:
    return f"{FUSEDOPT_TORCH} {threads}t"


def numpy_views_label(threads: int) -> str:
    return f"{NUMPY_VIEWS} {threads}t"
