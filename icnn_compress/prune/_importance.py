"""Pruning criteria as torch-pruning ``Importance`` objects, and the pruner of the mask layer's channels.

Every criterion scores the channels of one dependency group (channels that must go together: a conv's
outputs, its BatchNorm, the mask on them, the next conv's inputs, a residual stream's every member);
the pruner (``tp.pruner.BasePruner``) removes the lowest-scored ones. Scores only need to be comparable
within a group: pruning is local, every group loses the same fraction of channels per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn

from icnn_compress.config import CRITERIA
from icnn_compress.errors import PruningError
from icnn_compress.method.mask import InterpretableMask
from icnn_compress.models.pruned import OUT_HANDLERS, MaskPruner, channel_width

from ._scores import FilterScores, icnn_layer_scores

__all__ = [
    "CRITERIA", "ICNNImportance", "RawFPGMImportance", "make_importance", "producing_conv", "register_criterion",
]

# Every criterion's builder, by name (timm's register_model in miniature): builder(scores, mask_pruner).
_CRITERIA: dict[str, Callable[[Mapping[str, Sequence[FilterScores]] | None, MaskPruner], tp.importance.Importance]] = {}


def register_criterion(name: str):
    """Decorator: register ``builder(scores, mask_pruner) -> Importance`` as pruning criterion ``name``."""
    def add(builder):
        _CRITERIA[name] = builder
        return builder
    return add


def producing_conv(model: nn.Module, name: str) -> nn.Module | None:
    """The conv whose output channels are the channels of module ``name`` (a plain model's analysed layer).

    The module itself when it is a conv; else the last conv inside it (MobileNetV2's ``features.18``, a
    conv-BN-ReLU6 block); else the last conv registered before it (a ReLU after its conv and BatchNorm).
    """
    modules = list(model.named_modules())
    at = next((i for i, (n, _) in enumerate(modules) if n == name), None)
    if at is None:
        return None
    convs = [(i, m) for i, (n, m) in enumerate(modules) if isinstance(m, nn.modules.conv._ConvNd)]
    inside = [m for i, m in convs if modules[i][0].startswith(f"{name}.")]
    if isinstance(modules[at][1], nn.modules.conv._ConvNd):
        return modules[at][1]
    if inside:
        return inside[-1]
    before = [m for i, m in convs if i < at]
    return before[-1] if before else None


def _scatter_max(target: Tensor, root_idxs: Sequence[int], values: Tensor) -> Tensor:
    index = torch.as_tensor(list(root_idxs), dtype=torch.long)
    return target.scatter_reduce(0, index, values.to(target.dtype), reduce="amax")


class ICNNImportance(tp.importance.Importance):
    """The interpretability criterion: silent filters first, then redundant twins, then the least exclusive.

    Args:
        scores: ``{mask layer name: [FilterScores, ...]}`` from :func:`load_filter_scores`.
        mask_pruner: the :class:`MaskPruner` given to the pruner, which tracks the analysed numbering of
            already pruned masks (iterative pruning re-scores the remaining channels at each step).
        fallback: criterion for groups without an analysed mask; default group L1 magnitude, the same
            as the ``l1`` criterion, so ``icnn`` and ``l1`` differ only where there is an analysis.
        rest: how the filters the analysis does not flag (neither silent nor a redundant twin) are
            ranked after the flagged ones: ``"exclusivity"`` (least exclusive first, the default) or
            ``"magnitude"`` (by ``fallback``: the analysis only decides what goes first).

    A group's score per channel is the MAXIMUM over the analysed masks in the group of their per-filter
    score (:func:`icnn_layer_scores`): a channel goes only if it is weak in every analysed layer it is
    coupled to (in a residual stream, the stream's channel is one filter of every coupled layer). The
    magnitudes of the group's convs are deliberately not mixed in: where the analysis speaks, a silent
    or duplicated filter goes even when its weights are large. Groups with no analysed mask (the
    network below the masked layers, the classifier's hidden layers) use ``fallback``.
    """

    def __init__(
        self,
        scores: Mapping[str, Sequence[FilterScores]],
        mask_pruner: MaskPruner,
        fallback: tp.importance.Importance | None = None,
        *,
        rest: str = "exclusivity",
    ) -> None:
        if rest not in ("exclusivity", "magnitude"):
            raise PruningError(f"rest must be 'exclusivity' or 'magnitude', got {rest!r}")
        self.layer_scores = {name: icnn_layer_scores(recs) for name, recs in scores.items()}
        self.mask_pruner = mask_pruner
        self.fallback = fallback or tp.importance.MagnitudeImportance(p=1)
        self.rest = rest
        self._plain: dict[nn.Module, str] = {}  # analysed conv of a plain model -> the analysed layer's name

    def check_model(self, model: nn.Module) -> None:
        """Raise PruningError when the analysis names a layer the model lacks or counts its filters differently.

        A model without masks (a plain checkpoint) is analysed at ordinary layers: each is scored through the
        conv that produces its channels (:func:`producing_conv`), which the mask pruner then follows.
        """
        masks = {n: m for n, m in model.named_modules() if isinstance(m, InterpretableMask)}
        for name, s in self.layer_scores.items():
            layer = masks.get(name)
            if layer is None and not masks:
                layer = producing_conv(model, name)
                if layer is not None:
                    self._plain[layer] = name
                    if not self.mask_pruner.tracks(layer) and channel_width(layer) == len(s):
                        self.mask_pruner.follow(layer)
            if layer is None:
                raise PruningError(f"the analysis describes layer {name!r}, which the model does not have "
                                   f"(its masks: {sorted(masks)}); analyse this run's model.pt")
            if channel_width(layer) != len(s) and not self.mask_pruner.tracks(layer):
                raise PruningError(f"the analysis has {len(s)} filters in {name!r} but the model has "
                                   f"{channel_width(layer)}: analyse this run's model.pt")

    @torch.no_grad()
    def flagged(self, group) -> Tensor | None:
        """Which of the group's channels the analysis flags, ``(n,)`` bool; None for a group without an analysed mask.

        A channel is flagged when it is silent or a redundant twin (score tier below 2) in EVERY analysed mask
        coupled to it: what ``target_macs = "auto"`` removes.
        """
        best = self._analysed(group)
        return None if best is None else best < 2

    def _analysed(self, group) -> Tensor | None:
        """The group's per-channel analysed score ``(n,)`` float64 (max over coupled masks), None without one."""
        names = group._DG._module2name
        n = len(group[0].idxs)
        best: Tensor | None = None
        for item in group:
            layer = item.dep.target.module
            if isinstance(layer, InterpretableMask):
                scores = self.layer_scores.get(names.get(layer, ""))
            elif layer in self._plain and item.dep.handler in OUT_HANDLERS:
                scores = self.layer_scores[self._plain[layer]]
            else:
                continue
            if scores is None:
                continue
            origin = self.mask_pruner.original_index(layer)
            local = scores[origin[torch.as_tensor(list(item.idxs), dtype=torch.long)]]
            start = torch.full((n,), -torch.inf, dtype=torch.float64) if best is None else best
            best = _scatter_max(start, item.root_idxs, local)
        return best

    @torch.no_grad()
    def __call__(self, group) -> Tensor | None:
        best = self._analysed(group)
        if best is None:
            return self.fallback(group)
        unflagged = best >= 2  # useful in at least one coupled layer
        if self.rest == "magnitude" and bool(unflagged.any()):
            magnitude = self.fallback(group).double()
            k = int(unflagged.sum())
            rank = torch.empty(k, dtype=torch.float64)
            rank[torch.argsort(magnitude[unflagged], stable=True)] = torch.arange(k, dtype=torch.float64)
            best = best.clone()
            best[unflagged] = 2 + (rank + 1) / (k + 1)
        return best.float()


class RawFPGMImportance(tp.importance.FPGMImportance):
    """FPGM (He et al., CVPR 2019, https://arxiv.org/abs/1811.00250) on the raw filter weights.

    A filter close to the geometric median of its layer's filters is replaceable by the others: its
    importance is the sum of Euclidean distances ``Σ_j ‖w_i − w_j‖₂`` between the flattened raw weights
    (torch-pruning's FPGMImportance takes ``|w|^p`` first, which is not the paper's). Only the layers that
    own the filters (conv / linear outputs) are scored, averaged over the group's coupled layers.
    """

    @torch.no_grad()
    def __call__(self, group, **kwargs) -> Tensor | None:
        imps, roots = [], []
        for item in group:
            layer, fn = item.dep.target.module, item.dep.handler
            if fn not in OUT_HANDLERS or not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            w = layer.weight.data
            w = w.transpose(0, 1) if getattr(layer, "transposed", False) else w
            w = w[list(item.idxs)].flatten(1).float()  # (n, k)
            imps.append(torch.cdist(w[None], w[None], p=2)[0].sum(0))
            roots.append(item.root_idxs)
        if not imps:
            return None
        return self._normalize(self._reduce(imps, roots), self.normalizer)


def make_importance(
    criterion: str,
    *,
    mask_pruner: MaskPruner,
    scores: Mapping[str, Sequence[FilterScores]] | None = None,
) -> tp.importance.Importance:
    """Return the torch-pruning Importance for ``criterion`` (one of :data:`CRITERIA`).

    ``l1``: group L1 magnitude (``MagnitudeImportance(p=1)``: the mean over the group's layers of the
    channel's L1 norm, each layer normalised by its mean); ``fpgm``: :class:`RawFPGMImportance`;
    ``taylor``: first-order Taylor ``|w·∂L/∂w|`` (needs gradients: the driver runs a backward on a few
    training batches before each step); ``random``: uniform scores (seeded by the caller);
    ``icnn``: :class:`ICNNImportance` on ``scores`` (silent, then redundant twins, then least exclusive);
    ``icnn-l1``: the same for the filters the analysis flags (silent, redundant twins), then L1
    magnitude for the others (``rest="magnitude"``).
    """
    if criterion not in _CRITERIA:
        raise PruningError(f"unknown criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
    return _CRITERIA[criterion](scores, mask_pruner)


def _icnn(criterion: str, rest: str):
    def build(scores, mask_pruner):
        if not scores:
            raise PruningError(f"the {criterion} criterion needs the analysis of the run (--analysis analysis.json)")
        return ICNNImportance(scores, mask_pruner, rest=rest)
    return build


register_criterion("icnn")(_icnn("icnn", "exclusivity"))
register_criterion("icnn-l1")(_icnn("icnn-l1", "magnitude"))
register_criterion("l1")(lambda scores, mask_pruner: tp.importance.MagnitudeImportance(p=1))
register_criterion("fpgm")(lambda scores, mask_pruner: RawFPGMImportance(p=2))
register_criterion("taylor")(lambda scores, mask_pruner: tp.importance.TaylorImportance())
register_criterion("random")(lambda scores, mask_pruner: tp.importance.RandomImportance())
assert tuple(_CRITERIA) == CRITERIA, "config.CRITERIA names the registered criteria, in order"
