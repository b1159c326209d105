"""The PyTorch side at its best ordinary settings: channels_last, inference_mode, the same SGD recipe.

On a GPU host the model runs on ``cuda`` under bf16 autocast; on CPU ``--dtype bfloat16`` autocasts to bf16
too. ``torch.compile`` (inductor) is an opt-in variant; its compile time is the first call's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
import torchvision

from benchmarks.config import Case
from benchmarks.worker import Workload


def pick_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast(case: Case, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU (AMP) or when ``--dtype bfloat16``; a no-op for float32 on CPU."""
    if device.type == "cuda" or case.dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (CPU calls are synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(case: Case, device: torch.device) -> torch.nn.Module:
    """torchvision's ``case.arch`` in channels_last on ``device``."""
    torch.manual_seed(case.seed)
    return getattr(torchvision.models, case.arch)().to(device=device, memory_format=torch.channels_last)


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD Nesterov momentum 0.9, weight decay 1e-4 on conv/linear weights only (as the Flax recipe)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=0.1, momentum=0.9, nesterov=True)


def maybe_compile(model: torch.nn.Module, case: Case) -> Callable:
    """``torch.compile(model)`` for the compile variant, else the eager module."""
    return torch.compile(model) if case.torch_compile else model


def build_infer(case: Case, device: torch.device) -> tuple[Callable[[], None], float]:
    """Eval-mode forward under ``torch.inference_mode``; returns (run, first-call seconds if compiled)."""
    model = make_model(case, device).eval()
    forward = maybe_compile(model, case)
    x = torch.randn(case.batch, 3, case.image_size, case.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)

    def run() -> None:
        with torch.inference_mode(), autocast(case, device):
            forward(x)
        synchronize(device)

    return run, first_call_seconds(run, case)


def build_train(case: Case, device: torch.device) -> tuple[Callable[[], None], float]:
    """One SGD step: forward in train mode, cross-entropy, backward, optimizer update."""
    model = make_model(case, device).train()
    forward = maybe_compile(model, case)
    optimizer = sgd(model)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(case.batch, 3, case.image_size, case.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (case.batch,), device=device)

    def run() -> None:
        for _ in range(case.steps_per_call):  # queued back to back on a GPU; one wait at the end
            optimizer.zero_grad(set_to_none=True)
            with autocast(case, device):
                loss = loss_fn(forward(x), y)
            loss.backward()
            optimizer.step()
        synchronize(device)

    return run, first_call_seconds(run, case)


def first_call_seconds(run: Callable[[], None], case: Case) -> float:
    """For torch.compile, run once now and return the time (compilation happens on the first call)."""
    if not case.torch_compile:
        return 0.0
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def device_peak_bytes(device: torch.device) -> Callable[[], int | None]:
    """A reader of the CUDA caching allocator's peak (None on CPU)."""
    if device.type != "cuda":
        return lambda: None
    return lambda: int(torch.cuda.max_memory_allocated(device))


def build(case: Case) -> Workload:
    """The PyTorch workload of ``case`` (default thread count: ``torch.set_num_threads`` is left alone)."""
    device = pick_device()
    run, compile_s = (build_infer if case.mode == "infer" else build_train)(case, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return Workload(run, compile_s, name, device_peak_bytes(device))
