"""Landmark anchors for the mask's µ̂ in training (``icnn.anchor = "landmarks"``; issue 17, opt-in).

A remedy for the filters' drift onto the object's centre (METHOD.md section 8). Each filter of a masked layer
is assigned one landmark, balanced across the landmarks (:func:`part_assignment`); in training, on an image
where its landmark is visible, the filter's template sits on that landmark's cell for everything that teaches
the filter — the gradient through the mask and the filter loss — while the mask's output value stays the peak
rule's (:func:`icnn_compress.method.mask.masked_maps`). So each filter is pulled onto its own part, and the layers above
never see a landmark: a forward template on the landmarks gave the label away (the part layout is the class;
the seed-0 pilot of that variant reached 99.8 % training accuracy in epoch 2 and 67.33 % on the test split).
Evaluation, validation and deployment never see a landmark: the recipe's peak rule places every mask.

This reads the training split's landmarks: weak part supervision, which the paper does not use. It is a
recipe choice, off by default; a run that uses it says so (``icnn.anchor`` in its recipe and ``choices``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .mask import InterpretableMask

__all__ = ["ANCHORS", "anchored", "part_assignment"]

ANCHORS = ("none", "landmarks")


def part_assignment(num_filters: int, landmarks: Sequence[int]) -> Tensor:
    """Return each filter's landmark index, (D,) long: filter d gets ``landmarks[d mod K]``.

    Round robin, so every landmark gets ⌊D/K⌋ or ⌈D/K⌉ filters and the assignment depends on nothing but D
    and the landmark list: a resumed run, every rank of a distributed run and every epoch agree without
    storing it.
    """
    if not landmarks:
        raise ValueError("part_assignment needs at least one landmark index")
    order = torch.as_tensor(list(landmarks), dtype=torch.long)
    return order[torch.arange(num_filters) % order.numel()]


@contextmanager
def anchored(model: nn.Module, landmarks: Tensor, visible: Tensor, *, image_size: int,
             parts: Sequence[int]) -> Iterator[None]:
    """Anchor every :class:`InterpretableMask` of ``model`` on this batch's landmarks for one training forward.

    Args:
        landmarks: (B, K, 2) pixel (x, y) of each landmark in the (augmented) training images, on [0, S]².
        visible: (B, K) bool; an invisible landmark leaves that filter's µ̂ to the peak rule.
        image_size: S. parts: the landmark indices the filters are assigned over (:func:`part_assignment`).
    """
    masks = [m for m in model.modules() if isinstance(m, InterpretableMask)]
    try:
        for mask in masks:
            assign = part_assignment(mask.num_filters, parts).to(landmarks.device)
            mask.anchor = (landmarks[:, assign], visible[:, assign].bool(), image_size)  # (B, D, 2), (B, D)
        yield
    finally:
        for mask in masks:
            mask.anchor = None
