"""Pruned models: the mask layer's torch-pruning pruner, and the replay of a saved pruning history.

A pruned model file holds the history of the group prunings that made it (``"pruning"``); loading it
(:func:`icnn_compress.runs.open.load_run_model`) rebuilds the unpruned model from its architecture record
and replays the history here, so that the pruned weights fit.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from icnn_compress.errors import PruningError
from icnn_compress.method.mask import InterpretableMask

__all__ = ["HISTORY_FORMAT", "MaskPruner", "apply_pruning_history", "channel_width", "graph_kwargs"]

HISTORY_FORMAT = "icnn-prune/1"

# torch-pruning's handlers that remove a layer's output channels.
OUT_HANDLERS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)


class MaskPruner(tp.pruner.BasePruningFunc):
    """torch-pruning's pruner for :class:`InterpretableMask`: a channel-preserving (element-wise) layer.

    ``prune_in_channels is prune_out_channels`` makes the mask pass its channels through in the dependency
    graph (torch-pruning's intra-layer dependency), so the mask is pruned with the conv that feeds it and
    the conv that reads it. Its per-channel state goes with the channels: ``beta`` and ``beta_velocity`` ``(D,)`` and
    ``class_peak`` ``(C, D)``; ``class_seen`` and ``class_freq`` are per class and stay.

    It also remembers, for every mask it pruned, which channels of the mask as first seen remain
    (:meth:`original_index`): the analysis numbers filters in the unpruned model. A plain model's analysed
    conv (no mask: :class:`~icnn_compress.runs.plain.PlainCheckpoint`) is pruned by torch-pruning's own
    conv pruner; :meth:`follow` names it and :meth:`observe`, given every group before it is pruned,
    keeps its numbering the same way.
    """

    TARGET_MODULES = InterpretableMask

    def __init__(self) -> None:
        super().__init__(pruning_dim=0)
        self._origin: dict[InterpretableMask, Tensor] = {}

    def original_index(self, layer: nn.Module) -> Tensor:
        """The first-seen channel index of each current channel of ``layer``, ``(D,)`` long on the CPU."""
        if layer not in self._origin:
            self._origin[layer] = torch.arange(channel_width(layer))
        return self._origin[layer]

    def tracks(self, layer: nn.Module) -> bool:
        """Whether this pruner has seen ``layer`` (its channel numbering may differ from the analysis')."""
        return layer in self._origin

    def follow(self, conv: nn.Module) -> None:
        """Keep the first-seen numbering of ``conv``'s output channels (an analysed conv of a plain model)."""
        self.original_index(conv)

    def observe(self, group) -> None:
        """Update the numbering of the followed convs whose output channels ``group`` is about to prune."""
        for item in group:
            layer = item.dep.target.module
            if layer in self._origin and not isinstance(layer, InterpretableMask) and item.dep.handler in OUT_HANDLERS:
                drop = set(int(i) for i in item.idxs)
                keep = [i for i in range(len(self._origin[layer])) if i not in drop]
                self._origin[layer] = self._origin[layer][torch.tensor(keep, dtype=torch.long)]

    def prune_out_channels(self, layer: InterpretableMask, idxs: Sequence[int]) -> InterpretableMask:
        drop = set(int(i) for i in idxs)
        keep = [i for i in range(layer.num_filters) if i not in drop]
        origin = self.original_index(layer)
        keep_t = torch.tensor(keep, dtype=torch.long, device=layer.beta.device)
        # Assigning a tensor to a registered buffer's name replaces the buffer (nn.Module.__setattr__).
        layer.beta = layer.beta.index_select(0, keep_t).contiguous()
        layer.beta_velocity = layer.beta_velocity.index_select(0, keep_t).contiguous()
        layer.class_peak = layer.class_peak.index_select(1, keep_t).contiguous()  # (C, D')
        self._origin[layer] = origin[torch.tensor(keep, dtype=torch.long)]
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: InterpretableMask) -> int:
        return layer.num_filters

    get_in_channels = get_out_channels


def channel_width(layer: nn.Module) -> int:
    """Output channels of a mask, a conv or a linear layer."""
    if isinstance(layer, InterpretableMask):
        return layer.num_filters
    return layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features


def graph_kwargs(mask_pruner: MaskPruner) -> dict[str, Any]:
    """The keyword arguments that make torch-pruning's dependency graph prune masks with ``mask_pruner``."""
    return {"customized_pruners": {InterpretableMask: mask_pruner}}


def apply_pruning_history(model: nn.Module, history: Mapping[str, Any]) -> nn.Module:
    """Replay a saved pruning ``history`` (from :func:`prune_model`) on a freshly built model; return it.

    Rebuilds torch-pruning's dependency graph on ``model`` (as built from the run's architecture record)
    and redoes every recorded group pruning (``DependencyGraph.load_pruning_history``), so the model has
    the pruned shapes and its ``state_dict`` can be loaded.
    """
    if history.get("format") != HISTORY_FORMAT:
        raise PruningError(f"pruning history format {history.get('format')!r} is not {HISTORY_FORMAT!r}; "
                           "use the icnn-compress version that wrote the model file")
    was_training = model.training
    example = torch.zeros(*history["example_input_shape"])
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Unwrapped parameters.*")
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False,
                                                      **graph_kwargs(MaskPruner()))
        try:
            graph.load_pruning_history([(n, bool(o), list(i)) for n, o, i in history["steps"]])
        except (AttributeError, AssertionError, ValueError, IndexError) as exc:
            raise PruningError(f"the pruning history does not fit this model ({exc}): was the model file "
                               "edited or written for another architecture?") from exc
    model.train(was_training)
    return model
