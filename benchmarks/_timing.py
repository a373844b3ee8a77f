"""Timing helpers shared by the benchmark scripts: interleaved medians, one training step, a benchmark model.

Each script measures both sides of a ratio in one process, alternating their order every round, so that
load from other processes hits both alike (these machines are shared and noisy).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from icnn_compress.method.filter_loss import FilterLoss
from icnn_compress.method.mask import InterpretableMask
from icnn_compress.models.registry import build_base_model
from icnn_compress.models.surgery import make_interpretable


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds ``fn`` takes, the device synchronised before and after."""
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def interleaved(fns: dict[str, Callable[[], None]], steps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each callable over ``steps`` rounds, order alternating, after one warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(steps + 1):
        for name in names if i % 2 == 0 else names[::-1]:
            t = timed(fns[name], device)
            if i > 0:
                times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, amp: bool,
               filter_loss: FilterLoss | None = None, kappa: float = 0.0) -> Callable[[], None]:
    """One SGD step as fine-tuning takes it (momentum 0.9, weight decay 5e-4), with the filter loss if given."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        with filter_loss.batch(y, kappa) if filter_loss is not None else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def interpretable_model(arch: str, *, classes: int, size: int, device: torch.device
                        ) -> tuple[nn.Module, list[InterpretableMask]]:
    """The registered ``arch`` made interpretable, in training mode on ``device`` (channels_last on CUDA)."""
    torch.manual_seed(0)
    model = build_base_model(arch, num_classes=classes)
    make_interpretable(model, arch=arch, num_classes=classes, image_size=size)
    model.to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model, [m for m in model.modules() if isinstance(m, InterpretableMask)]


def random_batch(*, batch: int, size: int, classes: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Random images (channels_last on CUDA) and labels."""
    x = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, classes, (batch,), device=device)


def masked_arm(step: Callable[[], None], masks: list[InterpretableMask], active: bool) -> Callable[[], None]:
    """``step`` with the masks switched on (the ICNN arm) or off (the baseline arm) first."""
    def go() -> None:
        for m in masks:
            m.active = active
        step()
    return go
