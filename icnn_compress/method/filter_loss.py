"""The filter loss's driver: :class:`FilterLoss` hooks every mask of a model and runs the loss of
:mod:`icnn_compress.method.loss` on each training batch, keeping per-layer statistics on the device."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from icnn_compress.method.loss import (
    StepResult,
    FORMS,
    crowding_gradient,
    filter_loss_step,
    injected_gradient,
    injection_backward,
    mutual_information_loss,
)
from icnn_compress.method.mask import InterpretableMask, compiled

__all__ = ["FilterLoss", "LayerStats"]


@dataclass
class LayerStats:
    """What one masked layer reported over the batches since the last :meth:`FilterLoss.reset_stats`.

    All values stay on the device as tensors (no host sync inside the training step).
    """

    neg_mi: Tensor | None = None  # running sum over batches of the mean −MI estimate
    batches: int = 0
    peak_max: Tensor | None = None  # (D,) largest activation seen: 0 means the filter is dead
    images: int = 0
    fired: Tensor | None = None  # (D,) images where the filter's map is not all zero
    task_sq: Tensor | None = None  # Σ‖gradient arriving at the masked input‖² (the task's, when measuring)
    inj_sq: Tensor | None = None  # Σ‖injected gradient‖² (per unit κ when measuring)

    def add(self, name: str, value: Tensor) -> None:
        cur = getattr(self, name)
        setattr(self, name, value if cur is None else cur + value)


class FilterLoss:
    """Drives the filter loss of every :class:`InterpretableMask` in a model, one training batch at a time.

    Use it around each training forward::

        with filter_loss.batch(labels, kappa):
            logits = model(images)
            loss = task_loss(logits, labels) + filter_loss.loss()

    Inside the block each mask updates its filter → category statistics (training batches only) and β,
    and, while active with κ > 0, adds the reference gradient to its input's gradient or records its
    mutual-information loss. ``measure=True`` computes the injection per unit κ and records its norm
    against the task gradient's without applying it (the κ pilot).

    ``compile=True`` runs the mask's forward (:func:`~icnn_compress.method.mask.masked_maps`), the per-batch work
    (:func:`filter_loss_step`) and the injection's backward (:func:`injection_backward`) through
    ``torch.compile``: a few fused kernels per masked layer and direction instead of one per elementwise op
    (issue 21). The results agree with eager to float tolerance; eager (the default) is the reference.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        form: str = "reference",
        a: float = 0.5,
        guard: bool = False,
        single_category: int | None = None,
        compile: bool = False,
        crowding: float = 0.0,
    ) -> None:
        if form not in FORMS:
            raise ValueError(f"loss form must be one of {FORMS}, got {form!r}")
        self.masks = {n: mod for n, mod in model.named_modules() if isinstance(mod, InterpretableMask)}
        if not self.masks:
            raise ValueError("the model has no InterpretableMask: run make_interpretable first")
        self.form = form
        self.a = a
        self.guard = guard
        self.single_category = single_category
        if not crowding >= 0:
            raise ValueError(f"crowding must be a number >= 0 (a multiple of kappa), got {crowding!r}")
        self.crowding = crowding
        self.stats: dict[str, LayerStats] = {n: LayerStats() for n in self.masks}
        self._losses: list[Tensor] = []
        self.compile = compile
        for mask in self.masks.values():
            mask.compiled = compile
        self._step = compiled(filter_loss_step) if compile else filter_loss_step
        self._backward = compiled(injection_backward) if compile else injection_backward

    def reset_stats(self) -> None:
        """Start a new accumulation period (an epoch, or the pilot)."""
        self.stats = {n: LayerStats() for n in self.masks}

    def loss(self) -> Tensor | float:
        """Return the mutual-information loss of the current batch (0 for the reference form)."""
        if not self._losses:
            return 0.0
        return torch.stack(self._losses).sum()

    @contextmanager
    def batch(
        self, labels: Tensor, kappa: float, *, lr: float = 0.0, momentum: float = 0.9, measure: bool = False,
        update: bool = True,
    ) -> Iterator[FilterLoss]:
        """Install the per-batch hooks on every mask for one training forward/backward.

        ``lr`` and ``momentum`` are the step's learning rate and momentum, which move the learned β
        (:meth:`InterpretableMask.update_beta`); ``lr = 0`` leaves β in place. ``update=False`` leaves the
        filter → category statistics and β as they are (the pilot's measuring pass, so that every
        measured batch sees the same categories).
        """
        self._losses = []
        step = (lr, momentum)
        for name, mask in self.masks.items():
            mask.hook = self._hook(name, labels, kappa, measure, update, step)
        try:
            yield self
        finally:
            for mask in self.masks.values():
                mask.hook = None

    def _hook(self, name: str, labels: Tensor, kappa: float, measure: bool, update: bool,
              step: tuple[float, float]):
        stats = self.stats[name]

        def hook(mask: InterpretableMask, x: Tensor, m: Tensor, cells: tuple[Tensor, Tensor]) -> None:
            if not mask.training:
                return
            inject = mask.active and x.requires_grad and (kappa > 0 or measure)
            strength: float | Tensor
            lr: float | Tensor
            strength, lr = (1.0 if measure else kappa), step[0]
            if self.compile:
                # Numbers that change from step to step enter the graph as 0-d (host) tensors: as Python
                # floats dynamo would specialise on them and recompile at every new learning rate.
                strength, lr = torch.tensor(strength, dtype=torch.float64), torch.tensor(lr, dtype=torch.float64)
            out = self._step(
                x, m, cells[0], cells[1], labels, mask.class_peak, mask.class_seen, mask.class_freq, mask.beta,
                mask.beta_velocity, single_category=self.single_category, inject=inject,
                reference=self.form == "reference", learn_beta=mask.active and mask.beta_mode == "learned",
                update=update, kappa=strength, a=self.a, guard=self.guard, lr=lr,
                momentum=step[1], category_momentum=mask.category_momentum, beta_lr=mask.beta_lr,
                beta_grad=mask.beta_grad,
            )
            stats.add("fired", out.fired)
            stats.peak_max = out.peak_max if stats.peak_max is None else torch.maximum(stats.peak_max, out.peak_max)
            stats.images += x.shape[0]
            if inject:
                self._inject(mask, stats, x, m, cells, out, kappa, measure)

        return hook

    def _inject(
        self,
        mask: InterpretableMask,
        stats: LayerStats,
        x: Tensor,
        m: Tensor,
        cells: tuple[Tensor, Tensor],
        out: StepResult,
        kappa: float,
        measure: bool,
    ) -> None:
        assert out.w_pos is not None and out.w_neg is not None, "filter_loss_step(inject=True) returns the weights"
        strength = 1.0 if measure else kappa
        if self.form == "reference":
            assert out.coef_pos is not None and out.coef_neg is not None and out.neg_mi is not None
            stats.add("neg_mi", out.neg_mi.mean().float())
            stats.batches += 1
            if self.crowding > 0:  # the penalty needs the full map-sized gradient: the unfused injection
                grad = injected_gradient(out.coef_pos, out.coef_neg, m, x.dtype) + crowding_gradient(
                    m, out.positive, mask.category, num_classes=mask.num_classes, w_pos=out.w_pos, kappa=strength,
                    weight=self.crowding).to(x.dtype)
                x.register_hook(self._measuring_hook(stats, grad, apply=not measure))
                return
            x.register_hook(self._injecting_hook(stats, out.coef_pos, out.coef_neg, m, apply=not measure))
            return
        rows, cols = cells
        per_filter = mutual_information_loss(
            x, mask.grid_beta(x.shape[-2]), rows, cols, out.positive, w_pos=out.w_pos, w_neg=out.w_neg
        )
        stats.add("neg_mi", per_filter.detach().mean())
        stats.batches += 1
        total = strength * per_filter.sum()
        if self.crowding > 0:  # the same penalty as an autograd term: its gradient is crowding_gradient
            total = total + (x * crowding_gradient(m, out.positive, mask.category, num_classes=mask.num_classes,
                                                   w_pos=out.w_pos, kappa=strength, weight=self.crowding)).sum()
        if measure:
            (grad,) = torch.autograd.grad(total, x, retain_graph=True)
            x.register_hook(self._measuring_hook(stats, grad, apply=False))
        else:
            self._losses.append(total)

    def _injecting_hook(self, stats: LayerStats, coef_pos: Tensor, coef_neg: Tensor, m: Tensor, *, apply: bool):
        """Add the reference gradient ``c⁻ + c⁺·m`` to x's gradient (when ``apply``) and record both norms."""

        def hook(g: Tensor) -> Tensor:
            new, task_sq, inj_sq = self._backward(g, coef_pos, coef_neg, m, apply)
            stats.add("task_sq", task_sq)
            stats.add("inj_sq", inj_sq)
            return new

        return hook

    @staticmethod
    def _measuring_hook(stats: LayerStats, injected: Tensor, *, apply: bool):
        """Record ‖incoming gradient‖² and ‖injection‖² (the ratio R); add the injection when ``apply``."""

        def hook(g: Tensor) -> Tensor:
            stats.add("task_sq", g.detach().float().pow(2).sum())
            stats.add("inj_sq", injected.detach().float().pow(2).sum())
            return g + injected if apply else g

        return hook
