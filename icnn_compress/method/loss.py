"""The filter loss of METHOD.md sections 3-4 and the filter → category bookkeeping around it.

Two forms share one driver (:class:`icnn_compress.method.filter_loss.FilterLoss`):

* ``reference`` — the released code's gradient, added to ∂L/∂x of each masked layer's input (section 4).
  It has no loss value; :func:`reference_gradient` also returns its estimate of −MI for logging.
* ``mutual-information`` — an autograd loss following the paper's Eq. 1 with the target-template
  approximation (section 3): all n²+1 templates enter p(x), only the image's own template the outer sum.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from icnn_compress.method.mask import InterpretableMask, beta_update, category_update, grid_coordinates

__all__ = [
    "FORMS",
    "StepResult",
    "class_weights",
    "crowding_gradient",
    "mutual_information_loss",
    "filter_loss_step",
    "injected_gradient",
    "injection_backward",
    "positive_pairs",
    "reference_coefficients",
    "reference_gradient",
]

FORMS = ("reference", "mutual-information")


def _sanitise(t: Tensor) -> Tensor:
    """inf → the largest finite value, NaN → 0 (as the released code does)."""
    return torch.nan_to_num(t, nan=0.0)


def _normalised_weights(z: Tensor, value: Tensor, select: Tensor, guard: bool) -> Tensor:
    """ω = e^z·value over the selected images, normalised to mean 1 over them (per filter), (B, D).

    The exponential is max-shifted per filter; the shift cancels in the normalisation.
    """
    z = torch.where(select, z, torch.full_like(z, -math.inf))
    shift = z.amax(dim=0, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    omega = torch.exp(z - shift) * torch.where(select, value, torch.zeros_like(value))
    count = select.sum(dim=0, keepdim=True).clamp(min=1)
    denom = (omega.abs() if guard else omega).sum(dim=0, keepdim=True) / count
    return _sanitise(omega / denom)


def reference_coefficients(
    x: Tensor,
    m: Tensor,
    positive: Tensor,
    *,
    w_pos: Tensor,
    w_neg: Tensor,
    kappa: float | Tensor,
    a: float = 0.5,
    guard: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return the reference gradient's per-map coefficients (c⁺, c⁻), each (B, D) float64, and its −MI, (D,).

    The injected gradient is ``c⁻ + c⁺·m`` (:func:`injected_gradient`); see :func:`reference_gradient` for the
    arguments. Everything here is (B, D)-sized apart from three map-sized products and their sums, so that the
    map-sized gradient can be made where it is added (the backward hook), fused with that addition.
    """
    b = x.shape[0]
    work = torch.promote_types(x.dtype, torch.float32)
    xw, mw = x.detach().to(work), m.detach().to(work)
    cells = x.shape[-2] * x.shape[-1]
    pos = positive.bool()
    neg = ~pos
    s = (xw * mw).sum(dim=(2, 3), dtype=torch.float64) / cells  # (B, D) strength inside the mask
    r = xw.sum(dim=(2, 3), dtype=torch.float64) / cells  # (B, D) mean activation
    # Monte-Carlo log-partitions: maps paired with masks of the reversed image and reversed filter.
    cross = (xw * mw.flip(0, 1)).sum(dim=(2, 3), dtype=torch.float64) / cells
    log_b = math.log(b)
    a_pos = a * (torch.logsumexp(cross / a, dim=0) - log_b)  # (D,)
    a_neg = a * (torch.logsumexp(-r / a, dim=0) - log_b)
    omega_pos = _normalised_weights(s / a, s - a_pos + a, pos, guard)
    omega_neg = _normalised_weights(-r / a, -r - a_neg + a, neg, guard)
    coef_pos = -kappa * w_pos.double() * omega_pos / b  # (B, D)
    coef_neg = kappa * w_neg.double() * omega_neg / b
    # −MI under the target-template approximation: −Σ p log p with p = e^{(s−A)/a}, per target family.
    lp = torch.where(pos, (s - a_pos) / a, torch.zeros_like(s))
    ln = torch.where(neg, (-r - a_neg) / a, torch.zeros_like(r))
    plogp = torch.exp(lp) * lp * pos
    qlogq = torch.exp(ln) * ln * neg
    n_pos = pos.sum(dim=0).clamp(min=1)
    n_neg = neg.sum(dim=0).clamp(min=1)
    neg_mi = -(w_pos.double() * plogp.sum(dim=0) / n_pos + w_neg.double() * qlogq.sum(dim=0) / n_neg)
    return coef_pos, coef_neg, neg_mi


def injected_gradient(coef_pos: Tensor, coef_neg: Tensor, m: Tensor, dtype: torch.dtype) -> Tensor:
    """Return the map-sized injected gradient ``c⁻ + c⁺·m`` in ``dtype`` (NaN → 0), (B, D, h, w)."""
    work = torch.promote_types(dtype, torch.float32)
    grad = torch.addcmul(coef_neg.to(work)[..., None, None], coef_pos.to(work)[..., None, None], m.detach().to(work))
    return torch.nan_to_num_(grad, nan=0.0).to(dtype)


def reference_gradient(
    x: Tensor,
    m: Tensor,
    positive: Tensor,
    *,
    w_pos: Tensor,
    w_neg: Tensor,
    kappa: float,
    a: float = 0.5,
    guard: bool = False,
) -> tuple[Tensor, Tensor]:
    """Return the released code's injected gradient for ∂L/∂x, (B, D, h, w), and its −MI estimate, (D,).

    Args:
        x: post-ReLU maps entering the mask, (B, D, h, w).
        m: the masks applied to them (peak value 1), (B, D, h, w).
        positive: whether image b belongs to filter d's category, (B, D) bool.
        w_pos, w_neg: per-filter weights w⁺, w⁻, (D,).
        kappa: the loss strength κ_t of this epoch.
        a: the temperature (0.5 in the code).
        guard: normalise ω by mean |ω| instead of mean ω, so the sign cannot flip near collapse.

    The gradient is per image divided by B, to sit beside a batch-mean task loss. Reductions run in
    float64 (METHOD.md §8: the mean-ω normalisation is ill-conditioned near collapse). The map-sized
    products stay float32 (exact for bf16 maps) and only their sums are float64: full float64 copies of
    the maps doubled this function's memory traffic on a GPU.
    """
    coef_pos, coef_neg, neg_mi = reference_coefficients(x, m, positive, w_pos=w_pos, w_neg=w_neg, kappa=kappa, a=a,
                                                        guard=guard)
    return injected_gradient(coef_pos, coef_neg, m, x.dtype), neg_mi


def crowding_gradient(
    m: Tensor, positive: Tensor, category: Tensor, *, num_classes: int, w_pos: Tensor, kappa: float, weight: float
) -> Tensor:
    """Return the crowding penalty's gradient for ∂L/∂x, (B, D, h, w): filters of one category kept apart.

    A remedy for METHOD.md section 8's drift (with the centroid µ̂ most filters of a category end on the
    object's centre as near-copies). The penalty is ``κ·weight·Σ_b Σ_d w⁺_d·[b of d's category]·
    ⟨x_bd, O_bd⟩ / B`` with ``O_bd`` the mean positive template ``relu(m)`` of the OTHER filters of d's
    category on image b (0 for a filter alone in its category). Its gradient pushes a filter down where
    its category's other filters already peak, so that on a crowded spot the reference gradient's pull
    toward the filter's own template is cancelled and a filter on a part nobody else covers keeps it.
    Like the reference gradient it is injected, per image divided by B; with ``weight = 0`` it is zero.

    Args:
        m: the masks (peak value 1), (B, D, h, w). positive: (B, D) bool, image b is of d's category.
        category: (D,) long filter categories. num_classes: C. w_pos: (D,) the weights w⁺.
        kappa: this epoch's κ. weight: the penalty's multiple of κ (``icnn.crowding``).
    """
    b = m.shape[0]
    work = torch.promote_types(m.dtype, torch.float32)
    occupied = torch.relu(m.detach().to(work)) * positive.to(work)[..., None, None]  # (B, D, h, w)
    onehot = nn.functional.one_hot(category.long(), num_classes).to(work)  # (D, C)
    per_class = torch.einsum("bdhw,dc->bchw", occupied, onehot)  # (B, C, h, w)
    others = per_class[:, category] - occupied  # (B, D, h, w): the other filters of d's category
    count = (onehot.sum(dim=0)[category] - 1).clamp(min=1)  # (D,)
    coef = kappa * weight * w_pos.to(work) / (count * b)  # (D,)
    return (others * coef[None, :, None, None] * positive.to(work)[..., None, None]).to(m.dtype)


def _template_kernels(beta: Tensor, h: int, w: int) -> Tensor:
    """Return each filter's positive template as a function of the offset to µ, (D, 1, 2h−1, 2w−1)."""
    du = grid_coordinates(h, device=beta.device, dtype=beta.dtype)
    dv = grid_coordinates(w, device=beta.device, dtype=beta.dtype)
    step_u = du[1] - du[0] if h > 1 else du.new_tensor(0.0)
    step_v = dv[1] - dv[0] if w > 1 else dv.new_tensor(0.0)
    oy = torch.arange(-(h - 1), h, device=beta.device, dtype=beta.dtype).abs() * step_u
    ox = torch.arange(-(w - 1), w, device=beta.device, dtype=beta.dtype).abs() * step_v
    dist = oy[:, None] + ox[None, :]  # (2h−1, 2w−1)
    return torch.clamp(1.0 - beta[:, None, None] * dist, min=-1.0)[:, None]


def mutual_information_loss(
    x: Tensor,
    beta: Tensor,
    rows: Tensor,
    cols: Tensor,
    positive: Tensor,
    *,
    w_pos: Tensor,
    w_neg: Tensor,
) -> Tensor:
    """Return Loss_f = −MI(X; T) per filter, (D,), differentiable in x (paper Eq. 1, float32).

    Its value is the stated formula; its autograd gradient is not the paper's Eq. 4, which keeps only the
    target template's term and treats Z_T as a constant: the two agree only where the activations are
    large against 1/τ (the target template then dominates p(x)), and the loss is paper-literal only with
    the paper's mask (``icnn.peak = "argmax"``, a fixed ``icnn.beta``), which training warns about.

    Templates t⁺(µ) = τ·max(1 − β‖·−µ‖₁, −1) on the [-1, 1] grid, t⁻ = −τ, τ = 0.5/n², uniform priors
    over the n²+1 templates. Z_T is the batch's Monte-Carlo partition, held constant (as in the paper);
    only each image's target template T̂ (its peak for images of the filter's category, T⁻ otherwise)
    enters the outer sum, weighted by w⁺ or w⁻.

    Args:
        x: post-ReLU maps, (B, D, h, w). beta: grid β per filter, (D,).
        rows, cols: each map's peak cell µ̂, (B, D) long. positive: (B, D) bool.
    """
    bsz, d, h, w = x.shape
    xf = x.float()
    tau = 0.5 / (h * w)
    kernels = _template_kernels(beta.detach().float(), h, w)
    # tr(x·T_µ) for every µ at once: a depthwise correlation of the map with its template kernel.
    tr_pos = tau * nn.functional.conv2d(xf, kernels, padding=(h - 1, w - 1), groups=d)  # (B, D, h, w)
    tr_neg = -tau * xf.sum(dim=(2, 3))  # (B, D)
    log_p_pos = tr_pos - torch.logsumexp(tr_pos.detach(), dim=0, keepdim=True)
    log_p_neg = tr_neg - torch.logsumexp(tr_neg.detach(), dim=0, keepdim=True)
    log_prior = -math.log(1 + h * w)
    all_templates = torch.cat([log_p_pos.reshape(bsz, d, h * w), log_p_neg[..., None]], dim=-1)
    log_px = log_prior + torch.logsumexp(all_templates, dim=-1)  # (B, D)
    own = log_p_pos.reshape(bsz, d, h * w).gather(-1, (rows * w + cols)[..., None])[..., 0]
    pos = positive.bool()
    log_p_target = torch.where(pos, own, log_p_neg)
    weight = torch.where(pos, w_pos.float()[None], w_neg.float()[None])
    terms = weight * math.exp(log_prior) * torch.exp(log_p_target) * (log_p_target - log_px)
    return -terms.sum(dim=0)


def positive_pairs(labels: Tensor, category: Tensor, single_category: int | None) -> Tensor:
    """Return whether image b is of filter d's category, (B, D) bool.

    Single-category tasks (``single_category`` = the object's label) make every filter the object's.
    """
    if single_category is not None:
        return (labels == single_category)[:, None].expand(-1, category.shape[0])
    return labels[:, None] == category[None, :]


def class_weights(mask: InterpretableMask, single_category: int | None) -> tuple[Tensor, Tensor]:
    """Return (w⁺, w⁻) per filter, (D,): 1 and 1 single-category, else 0.5/ρ_c and 0.5/(1 − ρ_c)."""
    return _class_weights(mask.category, mask.class_freq, single_category)


def _class_weights(category: Tensor, class_freq: Tensor, single_category: int | None) -> tuple[Tensor, Tensor]:
    if single_category is not None:
        one = torch.ones(category.shape[0], device=class_freq.device)
        return one, one
    c = class_freq.shape[0]
    freq = class_freq if c <= 10 else torch.full_like(class_freq, 1.0 / c)
    rho = freq[category]
    return 0.5 / rho, 0.5 / (1 - rho).clamp(min=1e-6)


class StepResult(NamedTuple):
    """What :func:`filter_loss_step` returns for one masked layer and batch (every entry on the device)."""

    fired: Tensor  # (D,) images where the filter's map is not all zero
    peak_max: Tensor  # (D,) the batch's largest activation per filter
    positive: Tensor  # (B, D) bool, from the categories before this batch's update
    w_pos: Tensor | None  # (D,) w⁺, w⁻ when ``inject``
    w_neg: Tensor | None
    coef_pos: Tensor | None  # (B, D) the reference gradient's coefficients (``inject`` and ``reference``)
    coef_neg: Tensor | None
    neg_mi: Tensor | None  # (D,) its −MI estimate


def filter_loss_step(
    x: Tensor,
    m: Tensor,
    rows: Tensor,
    cols: Tensor,
    labels: Tensor,
    class_peak: Tensor,
    class_seen: Tensor,
    class_freq: Tensor,
    beta: Tensor,
    beta_velocity: Tensor,
    *,
    single_category: int | None,
    inject: bool,
    reference: bool,
    learn_beta: bool,
    update: bool,
    kappa: float | Tensor,
    a: float,
    guard: bool,
    lr: float | Tensor,
    momentum: float,
    category_momentum: float,
    beta_lr: float,
    beta_grad: float,
) -> StepResult:
    """One masked layer's filter-loss work for one training batch, as one function; returns a :class:`StepResult`.

    In order: the images positive for each filter (from the categories as they stand), the batch's peak
    statistics, (``inject``) the weights w± and (``reference``) the reference gradient's coefficients with
    their log-sum-exp partitions, then (``update``) the learned β step (``learn_beta``) and the category EMA,
    both in place on the mask's buffers. Every value stays on the device (no host sync, no data-dependent
    Python branch), so ``torch.compile`` fuses it into a few kernels; eager, it runs exactly the ops of the
    unfused methods (:meth:`InterpretableMask.update_beta`, :meth:`~InterpretableMask.update_categories`,
    :func:`reference_gradient`), so eager results do not change.

    Args:
        x, m: the masked layer's input maps and their masks, (B, D, h, w). rows, cols: their peak cells, (B, D).
        labels: (B,). class_peak, class_seen, class_freq, beta, beta_velocity: the mask's buffers.
        The keywords: the filter loss' and the mask's settings and the step's κ, learning rate and momentum;
        compiled, pass κ and the learning rate as 0-d float64 tensors (they change between steps).
    """
    with torch.no_grad():
        category = class_peak.argmax(dim=0)
        positive = positive_pairs(labels, category, single_category)
        peaks = x.detach().amax(dim=(2, 3)).float()  # (B, D); max is exact in any dtype
        fired = (peaks > 0).sum(dim=0)
        top = peaks.amax(dim=0)
        w_pos = w_neg = coef_pos = coef_neg = neg_mi = None
        if inject:
            w_pos, w_neg = _class_weights(category, class_freq, single_category)
            if reference:
                coef_pos, coef_neg, neg_mi = reference_coefficients(x, m, positive, w_pos=w_pos, w_neg=w_neg,
                                                                    kappa=kappa, a=a, guard=guard)
        if update:
            if learn_beta:
                beta_update(beta, beta_velocity, x, m, rows, cols, positive, lr=lr, momentum=momentum,
                            beta_lr=beta_lr, beta_grad=beta_grad)
            category_update(class_peak, class_seen, peaks, labels, category_momentum)
    return StepResult(fired, top, positive, w_pos, w_neg, coef_pos, coef_neg, neg_mi)


def injection_backward(g: Tensor, coef_pos: Tensor, coef_neg: Tensor, m: Tensor, apply: bool
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """The backward side of the reference gradient: returns (g + injection, or g unchanged when not ``apply``;
    ‖g‖²; ‖injection‖²), the injection made here from its coefficients (:func:`injected_gradient`)."""
    injected = injected_gradient(coef_pos, coef_neg, m, g.dtype)
    task_sq = g.detach().float().pow(2).sum()
    inj_sq = injected.detach().float().pow(2).sum()
    return (g + injected if apply else g), task_sq, inj_sq
