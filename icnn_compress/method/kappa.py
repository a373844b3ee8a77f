"""Choosing the filter-loss strength κ without hand-tuning, and the collapse guard (METHOD.md section 8).

κ has a narrow working window that moves with the optimiser, the map size and the architecture. What
transfers is the ratio R = ‖injected gradient‖ / ‖task gradient‖ at the top masked tensor: the pilot
measures R per unit κ on a few training batches and picks κ so that R lands in the optimiser's band.

Bands (METHOD.md §8, measured on the prototype with SGD over the first epoch): R_top ≈ 4-12 worked,
≈ 13 degraded, ≥ 14 collapsed; AdamW wants about ten times less. The target sits low in the working
band (6 for SGD, 0.6 for AdamW) because the pilot measures before training, when the task gradient
is largest, and R grows over the epoch as the task gradient fades.
"""

from __future__ import annotations

import copy
import math
from typing import Any
from collections.abc import Iterable

import torch
from torch import nn

from icnn_compress.errors import TrainingError
from icnn_compress.method.filter_loss import FilterLoss

__all__ = ["R_BANDS", "R_COLLAPSE", "CollapseGuard", "calibrate_kappa"]

# optimiser family -> (target R, lower edge, upper edge) at the top masked layer
R_BANDS: dict[str, tuple[float, float, float]] = {"sgd": (6.0, 4.0, 12.0), "adamw": (0.6, 0.4, 1.2)}
# optimiser family -> the R_top over an epoch from which runs collapse: the guard backs off as soon as an
# epoch reaches it. SGD: METHOD.md §8 (≈ 13 degraded, ≥ 14 collapsed). AdamW: measured here, not a tenth of
# SGD's edge: R_top = 1.62 in MobileNetV2's first epoch was harmless (accuracy level with masks only),
# 7.8 on the quickstart ruined the model (44.8 % against 89.5 %); 3 sits between them.
R_COLLAPSE: dict[str, float] = {"sgd": 14.0, "adamw": 3.0}


def calibrate_kappa(
    model: nn.Module,
    filter_loss: FilterLoss,
    data: Iterable[dict],
    device: torch.device,
    *,
    optimizer: str,
    batches: int = 8,
    amp: bool = False,
    channels_last: bool = False,
) -> dict:
    """Run the pilot: measure R per unit κ at each masked layer and return the κ₀ that puts R_top on target.

    The pilot makes two passes over the same few batches: the first warms up the filter → category
    statistics (they start empty), the second measures with them held fixed. Nothing else of the model changes: weights,
    batch-norm statistics and β are restored afterwards; the warmed-up categories are kept (they came
    from training batches). No optimiser step is taken.

    Returns a JSON-serialisable dict: ``kappa``, ``R_per_unit`` per layer, ``target_R``, ``band``,
    ``task_loss``, ``dead`` per layer (filters silent on every pilot image) and ``reason``.
    """
    pilot: list[Any] = []
    for batch in data:
        if len(pilot) >= batches:
            break
        pilot.append(batch)
    if not pilot:
        raise TrainingError("the κ pilot got no training batch: is the training split empty?")
    saved = copy.deepcopy(model.state_dict())
    model.train()
    loss_sum = 0.0
    for measuring in (False, True):
        filter_loss.reset_stats()
        for batch in pilot:
            images = batch["image"].to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = batch["label"].to(device)
            with filter_loss.batch(labels, 0.0, measure=True, update=not measuring):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = model(images)
                loss = nn.functional.cross_entropy(logits.float(), labels)
            if measuring:
                loss.backward()
                loss_sum += float(loss.detach())
        model.zero_grad(set_to_none=True)
    keep = {k: v for k, v in model.state_dict().items() if k.endswith(("class_peak", "class_seen"))}
    saved.update(keep)  # in place: the state_dict's metadata (module versions, which MNASNet requires) stays
    model.load_state_dict(saved)
    ratios = {}
    for name, st in filter_loss.stats.items():
        if st.task_sq is not None and st.inj_sq is not None and float(st.task_sq) > 0:
            ratios[name] = math.sqrt(float(st.inj_sq) / float(st.task_sq))
    dead = {n: int((st.peak_max <= 0).sum()) for n, st in filter_loss.stats.items() if st.peak_max is not None}
    filter_loss.reset_stats()
    if not ratios:
        raise TrainingError("the κ pilot measured no gradient at the masked layers (are the masks active?)")
    top = next(iter(ratios))
    target, low, high = R_BANDS[optimizer]
    kappa = target / ratios[top]
    reason = (
        f"R per unit κ at {top} = {ratios[top]:.4g} over {len(pilot)} batches; the {optimizer} band for R_top "
        f"is {low:g}-{high:g} (METHOD.md §8), target {target:g} → κ₀ = {target:g} / {ratios[top]:.4g} = {kappa:.3g}"
    )
    return {
        "kappa": kappa,
        "R_per_unit": ratios,
        "target_R": target,
        "band": [low, high],
        "optimizer": optimizer,
        "task_loss": loss_sum / len(pilot),
        "dead": dead,
        "reason": reason,
    }


class CollapseGuard:
    """Decides after each epoch whether the filter loss has started to kill the model.

    A collapse is: a non-finite loss; dead filters (silent on every image of the epoch) jumping by more
    than ``dead_jump`` of a layer's filters (at least 2) over the last good epoch; the training loss
    rising above ``loss_spike`` times the last good epoch's; validation accuracy falling more than
    ``acc_drop`` (a fraction: 0.15 is 15 points) below the best so far; or R at the top masked layer reaching ``r_collapse``
    (the injected gradient swamping the task's: the model degrades before any filter dies). The caller
    then restores the last good state and calls :meth:`back_off`, which lowers κ₀ by ``factor``, or, after
    an R verdict, by as much as puts R back on ``r_target`` when that is more.
    """

    def __init__(
        self,
        *,
        enabled: bool,
        dead_jump: float = 0.1,
        loss_spike: float = 2.0,
        acc_drop: float = 0.15,
        factor: float = 1 / 3,
        max_backoffs: int = 5,
        initial: dict | None = None,
        r_collapse: float = math.inf,
        r_target: float | None = None,
    ) -> None:
        self.enabled = enabled
        self.dead_jump, self.loss_spike, self.acc_drop = dead_jump, loss_spike, acc_drop
        self.factor, self.max_backoffs = factor, max_backoffs
        self.r_collapse, self.r_target = r_collapse, r_target
        self.backoffs = 0
        self._r_factor = 1.0  # the κ factor that puts the last R verdict's R on r_target
        self.last: dict | None = initial
        self.best_acc = -math.inf

    def check(self, record: dict) -> str | None:
        """Return why ``record`` (one epoch) is a collapse, or None (and remember it as the last good one)."""
        if not self.enabled:
            return None
        self._r_factor = 1.0
        verdict = self._verdict(record)
        if verdict is None:
            self.last = record
            self.best_acc = max(self.best_acc, record.get("val_acc", -math.inf))
        return verdict

    def _verdict(self, record: dict) -> str | None:
        loss = record.get("train_loss", math.nan)
        if not math.isfinite(loss):
            return "the loss is not finite"
        last = self.last or {}
        for name, layer in record.get("layers", {}).items():
            before = last.get("layers", {}).get(name, {}).get("dead", 0)
            jump = layer.get("dead", 0) - before
            if jump >= max(2, self.dead_jump * layer["filters"]):
                return f"{jump} more dead filters in {name} ({layer['dead']} of {layer['filters']})"
        if "train_loss" in last and loss > self.loss_spike * last["train_loss"]:
            return f"the training loss spiked to {loss:.3g} from {last['train_loss']:.3g}"
        acc = record.get("val_acc")
        if acc is not None and acc < self.best_acc - self.acc_drop:
            return f"validation accuracy fell to {100 * acc:.1f}% from {100 * self.best_acc:.1f}%"
        layers: dict[str, dict[str, Any]] = record.get("layers", {})
        name, top = next(iter(layers.items()), (None, {}))
        r = top.get("R")
        if r is not None and r >= self.r_collapse:
            if self.r_target:
                self._r_factor = self.r_target / r
            return f"R at {name} reached {r:.3g} (runs collapse from {self.r_collapse:g}, METHOD.md §8)"
        return None

    def back_off(self, kappa0: float) -> float:
        """Return the lowered κ₀; raise when the guard has already backed off ``max_backoffs`` times."""
        self.backoffs += 1
        if self.backoffs > self.max_backoffs:
            raise TrainingError(
                f"training kept collapsing after {self.max_backoffs} reductions of κ (now {kappa0:.3g}); "
                "set icnn.kappa lower by hand or check train.lr"
            )
        return kappa0 * min(self.factor, self._r_factor)

    def final_check(self, record: dict, *, max_dead: float = 0.5) -> None:
        """Refuse to finish with a collapsed model: raise when a masked layer ends mostly dead."""
        if not self.enabled:
            return
        for name, layer in record.get("layers", {}).items():
            if layer.get("dead", 0) > max_dead * layer["filters"]:
                raise TrainingError(
                    f"the run ended with {layer['dead']} of {layer['filters']} filters dead in {name}: "
                    "the filter loss collapsed the model; lower icnn.kappa"
                )
