"""Devices and modes: resolving "auto", seeding torch, the generators a resume continues, a model in eval mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from icnn_compress.errors import TrainingError


def rng_states(device: torch.device) -> dict[str, Tensor]:
    """The generators a resumed run must continue: the CPU's (shuffling) and, on a GPU, the device's (dropout)."""
    states = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(state: dict) -> None:
    # torch.load(map_location=<the GPU>) moved the saved byte tensors there; the setters want them on the CPU.
    torch.set_rng_state(state["rng"].cpu())
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"].cpu())


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"train.device is {name!r}, which is not a device torch knows: use 'auto', 'cpu' "
                            "or 'cuda[:N]'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train.device is {name!r} but no CUDA device is available; use 'cpu' or 'auto'")
    return device


def seed_everything(seed: int, *, deterministic: bool) -> None:
    """Seed torch; on request make CPU kernels deterministic (CUDA keeps its fast kernels)."""
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` is in eval mode; afterwards it is back in the mode it was in (errors too)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
