"""Small CNNs shipped for the CPU quickstart: a stand-in for "the user's own CNN"."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["functional_cnn", "small_cnn"]


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(*, num_classes: int = 4, width: int = 32) -> nn.Sequential:
    """Return a 4-conv CNN for 64-px images whose top conv (``features.14``) is 8×8 with a 38-px field.

    This is the prototype of METHOD.md section 8: three 2× pools put the top conv at 1/8 of the input,
    so its receptive field covers most of a generated creature.
    """
    widths = [width, 2 * width, 4 * width, 4 * width]
    layers: list[nn.Module] = []
    cin = 3
    for i, cout in enumerate(widths):
        layers += _conv_block(cin, cout)
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        cin = cout
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*layers),
            pool=nn.MaxPool2d(2),
            head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(cin, num_classes)),
        )
    )


class FunctionalCNN(nn.Module):
    """A CNN whose activations are functional calls in ``forward`` (GELU, no activation modules): the kind
    of user network whose top block's output is a conv's, not post-ReLU."""

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        x = F.gelu(self.conv3(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def functional_cnn(*, num_classes: int = 4, width: int = 16) -> nn.Module:
    """Return a 3-conv CNN with functional GELUs whose top conv (``conv3``) is 8x8 on 64-px images."""
    return FunctionalCNN(num_classes, width)
