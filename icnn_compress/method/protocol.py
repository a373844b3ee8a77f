"""Where interpretability is measured, and which category each filter is measured for.

Location instability depends on the map it is read from. The mask pulls each map's peak onto its own
template's centre, so a measure on the mask's output partly measures the mask (with the centroid µ̂ the
argmax moves in most two-bump maps). Three protocols, recorded in every result that measures filters:

* ``official`` (default), as the authors' released code measures: each filter's own map BEFORE its mask.
  The top conv's mask input (post-ReLU) and the new conv's raw output (before ReLU, mask and any pool:
  VGG-16's new conv at 14×14); each filter's class is the one whose images give it the largest mean peak;
  a filter with a landmark seen on fewer than 2 images is dropped.
* ``paper``: after ReLU and mask, with the paper's argmax µ̂ (the template at the map's argmax, so the
  mask never moves the peak); each filter's class is the one that minimises its instability.
* ``masked-output``: the mask module's output and the class the model learned during training (the
  running average): the project's measure before the protocol fix, kept only to compare against.

The baseline's inactive masks are measured at the same points by the same rules, so arms compare like for
like. Modules that are not masks are measured at their output under every protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from icnn_compress.method.mask import InterpretableMask, template_masks

__all__ = [
    "CLASS_RULES",
    "PROTOCOLS",
    "MeasurePoint",
    "argmax_masked",
    "class_rule_for",
    "drops_sparse",
    "fixed_classes",
    "largest_mean_class",
    "learned_classes",
    "measure_points",
    "read_map",
    "released_classes",
]

PROTOCOLS = ("official", "paper", "masked-output")
# released: argmax_c of the mean peak over images of c; paper: argmin_c of the instability on images of c;
# learned: the mask's running average (InterpretableMask.category).
CLASS_RULES = ("released", "paper", "learned")


@dataclass(frozen=True)
class MeasurePoint:
    """Which tensor of which module is read for one measured layer.

    Attributes:
        layer: the measured layer's name (a mask's name: results are keyed by it).
        module: the module whose input or output is read.
        where: ``"input"`` (the module's first input) or ``"output"``.
        argmax_mask: apply the mask's template at the map's argmax, then ReLU (the ``paper`` protocol).
    """

    layer: str
    module: str
    where: str
    argmax_mask: bool = False

    def describe(self) -> str:
        """One line for the JSON record: what was read, e.g. ``features.14.conv output``."""
        text = f"{self.module} {self.where}"
        return f"relu({text} ∘ argmax template)" if self.argmax_mask else text


def class_rule_for(protocol: str) -> str:
    """Return the filter → class rule of ``protocol``."""
    _check(protocol)
    return {"official": "released", "paper": "paper", "masked-output": "learned"}[protocol]


def measure_points(
    model: nn.Module, layers: Sequence[str], protocol: str, *, architecture: Mapping[str, Any] | None = None
) -> dict[str, MeasurePoint]:
    """Return, per layer name, the :class:`MeasurePoint` that ``protocol`` reads.

    Args:
        model: the model the layers belong to.
        layers: module names; :class:`InterpretableMask` names are read per protocol, others at their output.
        protocol: one of :data:`PROTOCOLS`.
        architecture: the run's architecture record (``top_layer``, ``new_filters``, ``masks``). With a new
            conv, ``official`` reads every mask but the top conv's at the new conv's raw output
            (``<top_layer>.conv``); without a record each mask is read at its own input.
    """
    _check(protocol)
    modules = dict(model.named_modules())
    new_conv = top_mask = None
    if architecture is not None and architecture.get("new_filters"):
        new_conv, top_mask = f"{architecture['top_layer']}.conv", architecture["masks"][0]
    points = {}
    for name in layers:
        if name not in modules:
            raise ValueError(f"model has no module named {name!r}; pass names from model.named_modules()")
        if not isinstance(modules[name], InterpretableMask) or protocol == "masked-output":
            points[name] = MeasurePoint(name, name, "output")
        elif protocol == "paper":
            points[name] = MeasurePoint(name, name, "input", argmax_mask=True)
        elif new_conv is not None and name != top_mask:
            if new_conv not in modules:
                raise ValueError(f"model has no new conv {new_conv!r} to measure {name!r} at")
            points[name] = MeasurePoint(name, new_conv, "output")
        else:
            points[name] = MeasurePoint(name, name, "input")
    return points


def read_map(point: MeasurePoint, module: nn.Module, inputs: tuple, output: object) -> Tensor:
    """Return the ``(B, D, h, w)`` map ``point`` reads from one forward call of ``module``."""
    x = inputs[0] if point.where == "input" else output
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"layer {point.module!r} {point.where} is {shape}, not a (B, D, n, n) map")
    if point.argmax_mask:
        x = argmax_masked(x, module)  # type: ignore[arg-type]  # the point is a mask's (argmax_mask)
    return x


def argmax_masked(x: Tensor, mask: InterpretableMask) -> Tensor:
    """Return ``relu(x ∘ m)`` with ``m`` the mask's template at each map's argmax (the paper's measure)."""
    b, d, h, w = x.shape
    flat = x.reshape(b, d, h * w).argmax(dim=-1)  # (B, D)
    m = template_masks(flat // w, flat % w, mask.grid_beta(h).float(), h, w)
    return torch.relu(x.float() * m)


def released_classes(peak_value: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Return each filter's class by the released code's rule: the largest mean peak over a class's images.

    Args:
        peak_value: ``(N, D)`` peak activation per image and filter. labels: ``(N,)`` long.
        num_classes: C; classes without images never win.
    """
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).double()  # (N, C)
    return largest_mean_class(onehot.t() @ peak_value.double(), onehot.sum(dim=0))


def largest_mean_class(peak_sum: Tensor, count: Tensor) -> Tensor:
    """The released rule from per-class sums: ``(C, D)`` summed peaks and ``(C,)`` image counts → ``(D,)``.

    A class without images never wins, also when every mean is negative (raw conv outputs).
    """
    mean = peak_sum.double() / count.clamp(min=1)[:, None]
    mean[count == 0] = -torch.inf
    return mean.argmax(dim=0)


def drops_sparse(protocol: str) -> bool:
    """Whether ``protocol`` drops a filter with a landmark seen on fewer than 2 images (``official``)."""
    _check(protocol)
    return protocol == "official"


def learned_classes(model: nn.Module, layers: Sequence[str]) -> dict[str, Tensor]:
    """The class each mask learned in training (``InterpretableMask.category``), per mask among ``layers``."""
    return {name: m.category for name in layers if isinstance(m := model.get_submodule(name), InterpretableMask)}


def fixed_classes(num_filters: int, category: int) -> Tensor:
    """Every filter of the single category ``category`` (the paper's single-category setting)."""
    return torch.full((num_filters,), category, dtype=torch.long)


def _check(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
