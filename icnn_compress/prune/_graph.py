"""The pruning driver on torch-pruning's dependency graph (the replay of a saved history: models/pruned.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from icnn_compress.errors import PruningError
from icnn_compress.method.mask import InterpretableMask
from icnn_compress.models.pruned import HISTORY_FORMAT, MaskPruner, graph_kwargs
from icnn_compress.models.surgery import classifier_name

from ._importance import ICNNImportance

__all__ = ["classifier_layer", "count_macs", "prune_model", "round_targets"]

log = logging.getLogger(__name__)


def classifier_layer(model: nn.Module) -> nn.Module:
    """The layer that produces the logits (:func:`~icnn_compress.models.surgery.classifier_name`): never pruned."""
    return model.get_submodule(classifier_name(model))


def count_macs(model: nn.Module, example_inputs: Tensor) -> tuple[int, int]:
    """(MACs, parameters) of one forward of ``example_inputs``, by ``tp.utils.count_ops_and_params``.

    The masks are not counted (torch-pruning counts known layers only); they cost element-wise work.
    """
    was_training = model.training
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    model.train(was_training)
    return int(macs), int(params)


class _Pruner(tp.pruner.BasePruner):
    """BasePruner with ``round_to`` rounding to the NEAREST multiple, as its documentation says.

    torch-pruning 1.6 rounds the kept channels down, which makes uniform iterative pruning jump (a
    32-channel layer goes 24 → 16 when the schedule asks for 23) and overshoot the MACs target by a
    wide margin. Nearest rounding keeps at least ``round_to`` channels and never more than the layer has.
    """

    def __init__(self, *args: Any, observe: Callable[[Any], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._observe = observe

    def step(self, interactive: bool = False):
        """One pruning step; each group is shown to ``observe`` (the mask pruner's numbering) before it is pruned."""
        if interactive or self._observe is None:
            return super().step(interactive)
        for group in super().step(interactive=True):
            self._observe(group)
            group.prune()
        return None

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        kept = current_channels - n_pruned
        kept = max(round_to, int(kept / round_to + 0.5) * round_to)
        return max(current_channels - kept, 0)


_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def _nearest_layers(obj: Any, names: Mapping[nn.Module, str]) -> list[str]:
    """Named convs / Linears that are ``obj`` (a module) or feed it (a torch-pruning graph node, searched
    breadth-first through its inputs: the op that failed is often a reshape with no name of its own)."""
    if isinstance(obj, nn.Module):
        return [names[obj]] if isinstance(obj, _LAYERS) and obj in names else []
    found: list[str] = []
    queue, seen = [obj], set()
    while queue and len(seen) < 256:
        node = queue.pop(0)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        module = getattr(node, "module", None)
        if isinstance(module, _LAYERS) and module in names:
            found.append(names[module])
            continue
        queue.extend(getattr(node, "inputs", ()))
    return found


def _failing_layers(model: nn.Module, exc: BaseException) -> list[str]:
    """The layers torch-pruning was at when it raised ``exc``: from its innermost frame that holds a graph
    node, dependency or layer, the named convs / Linears that are or feed that node."""
    names = {m: n for n, m in model.named_modules() if n}
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        if "torch_pruning" not in frame.f_code.co_filename:
            continue
        seeds: list[Any] = []
        for key in ("dep", "n", "node", "module"):
            value = frame.f_locals.get(key)
            if key == "dep" and value is not None:
                seeds += [getattr(value, "source", None), getattr(value, "target", None)]
            elif value is not None:
                seeds.append(value)
        found: list[str] = []
        for seed in seeds:
            found += [n for n in _nearest_layers(seed, names) if n not in found]
        if found:
            return found
    return []


def _torch_pruning_failed(model: nn.Module, exc: Exception, what: str) -> PruningError:
    ignore = _failing_layers(model, exc)[:8]
    where = f" at the layers feeding the op that failed, {', '.join(ignore)}" if ignore else ""
    if what == "trace":  # the graph is built before anything is ignored: prune.ignore cannot route around it
        hint = ("; torch-pruning builds its dependency graph of the whole model before any layer is ignored, so "
                "prune.ignore does not help: this model cannot be pruned with torch-pruning "
                f"{tp.__version__} (export and analyse it unpruned)")
    else:
        hint = (f"; leave their channels unpruned: --set 'prune.ignore={json.dumps(ignore)}' (or pass "
                f"ignored_layers={ignore})" if ignore else "; name the layers to leave unpruned in prune.ignore")
    return PruningError(f"torch-pruning cannot {what} this model{where} ({type(exc).__name__}: {exc}){hint}")


@contextlib.contextmanager
def _explained(model: nn.Module, what: str):
    """Turn an error from inside torch-pruning into a PruningError that names the layer and the way out."""
    try:
        yield
    except PruningError:
        raise
    except Exception as exc:  # torch-pruning raises what its index arithmetic hits (ZeroDivisionError, IndexError)
        if not any("torch_pruning" in f.filename for f in traceback.extract_tb(exc.__traceback__)):
            raise
        raise _torch_pruning_failed(model, exc, what) from exc


def _channels(model: nn.Module) -> dict[str, int]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
        elif isinstance(m, InterpretableMask):
            out[name] = m.num_filters
    return out


def round_targets(target_macs: float, rounds: int) -> list[float]:
    """The MACs ratio each of ``rounds`` prune-and-recover rounds reaches: equal shares of ``1 − target_macs``.

    >>> round_targets(0.4, 3)
    [0.8, 0.6, 0.4]
    """
    if rounds < 1:
        raise PruningError(f"rounds (prune.steps) must be at least 1, got {rounds}")
    return [round(1.0 - (1.0 - target_macs) * k / rounds, 12) for k in range(1, rounds + 1)]


def prune_model(
    model: nn.Module,
    *,
    example_inputs: Tensor,
    importance: tp.importance.Importance,
    mask_pruner: MaskPruner,
    target_macs: float | str = 0.5,
    round_to: int | None = 8,
    floor: float = 0.25,
    steps: int = 32,
    rounds: int = 1,
    ignored_layers: Sequence[nn.Module | str] = (),
    before_step: Callable[[nn.Module], None] | None = None,
    after_round: Callable[[nn.Module, int], None] | None = None,
) -> dict[str, Any]:
    """Prune ``model`` in place until its MACs are at most ``target_macs`` × the original; return the history.

    Built on ``tp.pruner.BasePruner``: local pruning (every dependency group loses the same fraction of
    its channels), iterative (``steps`` linear steps up to ``1 − floor``; importance is re-estimated
    before every step, MACs measured after it, and pruning stops at the first step that meets the
    target), channel counts rounded to ``round_to``, the classifier's outputs never pruned.

    With ``rounds = N > 1`` the same pruner's steps go on through N rounds: round ``k`` stops at the first
    step that reaches ``1 − k·(1 − target_macs)/N`` (:func:`round_targets`), then ``after_round(model, k)``
    runs (a short recovery) before the next round's steps re-estimate importance on the recovered weights.

    ``target_macs = "auto"`` needs an :class:`ICNNImportance` and removes exactly the filters its analysis
    flags (:meth:`ICNNImportance.flagged`: silent ones and the non-best members of each redundancy cluster)
    in one step on the same dependency graph, with neither rounding nor floor; a group whose every channel
    is flagged keeps its best-scored one. The MACs reached are whatever those filters cost.

    Args:
        example_inputs: one input batch for tracing and for counting MACs, e.g. ``zeros(1, 3, S, S)``.
        importance: a torch-pruning Importance (see :func:`make_importance`).
        mask_pruner: the :class:`MaskPruner` that prunes the masks' per-channel state (the same instance
            the importance reads, for the icnn criterion).
        target_macs: a ratio in (0, 1], or ``"auto"``.
        round_to: kept channel counts are rounded to the nearest multiple (never below ``round_to``);
            8 by default, 16 matches ONNX Runtime's blocked (NCHWc) conv kernels on AVX-512 CPUs.
        floor: no layer keeps fewer than this fraction of its channels, up to the rounding to
            ``round_to`` (which may round a layer down by less than ``round_to / 2``).
        steps: torch-pruning's ``iterative_steps``: the resolution of the schedule that searches for the target.
        rounds: prune-and-recover rounds (the recipe's ``prune.steps``).
        before_step: called with the model before each step (e.g. a backward for Taylor importance).
        after_round: called with the model and the round number after each round but the last.
        ignored_layers: layers (modules or their names) whose output channels are kept (``prune.ignore``).

    Returns:
        A plain-data history (``weights_only``-loadable): ``format``, ``steps`` (torch-pruning's pruning
        history: ``[root layer, is output pruning, [indices]]`` in order), ``example_input_shape``,
        ``macs``/``params`` before and after, ``macs_ratio``, ``rounds`` (``[{"round", "target",
        "macs_ratio", "iterations"}]``), ``channels`` ``{layer: [before, after]}`` and ``kept``
        ``{mask layer: [original index of each remaining filter]}`` (for a plain model, the convs that
        produce its analysed layers); with ``"auto"`` also ``removed`` ``{mask layer: [original index of
        each removed filter]}``.

    Raises:
        PruningError: the floor stops pruning before the MACs target is met; ``"auto"`` without an
            ICNNImportance or with several rounds; or torch-pruning fails on the model (the message names
            the layers it was at and suggests a ``prune.ignore`` list).
    """
    auto = target_macs == "auto"
    if auto:
        if not isinstance(importance, ICNNImportance):
            raise PruningError("target_macs='auto' removes the filters the analysis flags: use the icnn or icnn-l1 "
                               "criterion with the run's analysis (--analysis)")
        if rounds != 1:
            raise PruningError(f"target_macs='auto' removes the flagged filters at once; set prune.steps = 1 "
                               f"(got {rounds})")
    elif isinstance(target_macs, str) or not 0.0 < target_macs <= 1.0:
        raise PruningError(f"target_macs is a ratio of the original MACs in (0, 1] or 'auto', got {target_macs!r}")
    if not 0.0 < floor < 1.0:
        raise PruningError(f"floor is the fraction of each layer's channels always kept, in (0, 1), got {floor}")
    targets = [] if auto else round_targets(float(target_macs), rounds)
    if isinstance(importance, ICNNImportance):
        importance.check_model(model)
    was_training = model.training
    model.eval()
    before_channels = _channels(model)
    base_macs, base_params = count_macs(model, example_inputs)
    modules = dict(model.named_modules())
    unknown = [n for n in ignored_layers if isinstance(n, str) and n not in modules]
    if unknown:
        raise PruningError(f"prune.ignore names {unknown}, which the model does not have; some of its layers: "
                           f"{[n for n, m in modules.items() if isinstance(m, nn.modules.conv._ConvNd)][:8]}")
    ignored = [classifier_layer(model), *(modules[n] if isinstance(n, str) else n for n in ignored_layers)]
    with torch.enable_grad(), warnings.catch_warnings(), _explained(model, "trace"):
        warnings.filterwarnings("ignore", message=".*Unwrapped parameters.*")
        pruner = _Pruner(
            model,
            example_inputs,
            importance=importance,
            pruning_ratio=1.0 - floor,
            max_pruning_ratio=1.0 - floor,
            iterative_steps=steps,
            ignored_layers=ignored,
            round_to=round_to,
            observe=mask_pruner.observe,
            **graph_kwargs(mask_pruner),
        )
    names = {m: n for n, m in model.named_modules()}
    macs, params = base_macs, base_params
    done = 0
    removed: dict[str, list[int]] = {}
    record_rounds: list[dict[str, Any]] = []
    if auto:
        origin_before = {names[m]: mask_pruner.original_index(m).tolist() for m in model.modules()
                         if isinstance(m, InterpretableMask)}
        with torch.enable_grad(), _explained(model, "prune"):
            _prune_flagged(pruner, importance)
        macs, params = count_macs(model, example_inputs)
        done = 1
        for m in model.modules():
            if isinstance(m, InterpretableMask):
                kept = set(mask_pruner.original_index(m).tolist())
                removed[names[m]] = [i for i in origin_before[names[m]] if i not in kept]
        record_rounds.append({"round": 1, "target": "auto", "macs_ratio": macs / base_macs, "iterations": 1})
    for k, target in enumerate(targets, start=1):
        began = done
        while macs > target * base_macs and done < steps:
            done += 1
            if before_step is not None:
                before_step(model)
            model.eval()
            with _explained(model, "prune"):
                pruner.step()
            macs, params = count_macs(model, example_inputs)
            log.info("pruning step %d/%d (round %d/%d): MACs %.3f of the original", done, steps, k, len(targets),
                     macs / base_macs)
        record_rounds.append({"round": k, "target": target, "macs_ratio": macs / base_macs,
                              "iterations": done - began})
        if macs > target * base_macs:
            break
        if k < len(targets) and after_round is not None:
            model.zero_grad(set_to_none=True)
            after_round(model, k)
            model.eval()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if not auto and macs > float(target_macs) * base_macs:
        raise PruningError(
            f"pruning reached {macs / base_macs:.3f} of the original MACs with every layer at its floor "
            f"({floor:.0%} of its channels); the target {target_macs} needs a lower floor (--floor)"
        )
    after_channels = _channels(model)
    history = {
        "format": HISTORY_FORMAT,
        "steps": [[str(n), bool(out), [int(i) for i in idxs]] for n, out, idxs in pruner.pruning_history()],
        "iterations": done,
        "rounds": record_rounds,
        "example_input_shape": list(example_inputs.shape),
        "target_macs": "auto" if auto else float(target_macs),
        "round_to": None if auto else round_to,
        "floor": None if auto else float(floor),
        "base_macs": base_macs,
        "macs": macs,
        "macs_ratio": macs / base_macs,
        "base_params": base_params,
        "params": params,
        "channels": {n: [before_channels[n], after_channels.get(n, 0)] for n in before_channels},
        "kept": {names[m]: mask_pruner.original_index(m).tolist() for m in model.modules()
                 if isinstance(m, InterpretableMask) or mask_pruner.tracks(m)},
    }
    if auto:
        history["removed"] = removed
    return history


def _prune_flagged(pruner: _Pruner, importance: ICNNImportance) -> None:
    """Remove, in every prunable group, the channels ``importance`` flags (torch-pruning groups, history kept)."""
    graph = pruner.DG
    # Groups are listed before any is pruned: each group's flags refer to the channels as analysed.
    plans = []
    for group in graph.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        flagged = importance.flagged(group)
        if flagged is None or not bool(flagged.any()):
            continue
        if bool(flagged.all()):  # a layer needs a channel: keep the group's best-scored one
            flagged = flagged.clone()
            flagged[int(importance(group).argmax())] = False
        root = group[0].dep
        plans.append((root.target.module, root.handler, [int(i) for i in flagged.nonzero()[:, 0]]))
    for module, handler, idxs in plans:
        group = graph.get_pruning_group(module, handler, idxs)
        if not graph.check_pruning_group(group):
            raise PruningError(f"removing {len(idxs)} flagged channels of {graph._module2name[module]!r} would leave "
                               "a coupled layer without channels")
        if pruner._observe is not None:  # a plain model's followed convs keep their first-seen numbering
            pruner._observe(group)
        group.prune()
