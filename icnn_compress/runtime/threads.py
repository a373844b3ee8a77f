"""Temporarily limiting PyTorch's CPU threads for work made of many tiny ops.

On a shared few-core CPU, the parallel regions of small tensor ops cost more than they save: the
receptive-field probe of a 64 px model took 0.40 s with 2 threads and 0.015 s with one, on a box
where another job held both cores (measured with ``layer_geometry`` on the quickstart model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["cpu_threads"]


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads and restore the previous setting; ``None`` changes nothing."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
