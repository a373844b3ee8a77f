"""Templates and the mask layer of METHOD.md section 2.

The mask keeps each filter's activation near the filter's peak in the image and suppresses it elsewhere,
in training and in evaluation: it is part of the model. It also owns the per-filter state that the filter
loss needs (β, the filter → category statistics) so that this state travels with the model's state_dict
and is pruned with its channels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "InterpretableMask",
    "grid_coordinates",
    "local_mass_cells",
    "paper_beta_to_grid",
    "peak_cells",
    "template_masks",
]

PEAKS = ("centroid", "argmax", "local-mass")


def grid_coordinates(n: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Return the n cell coordinates on the released code's [-1, 1] grid (a single cell sits at 0)."""
    if n == 1:
        return torch.zeros(1, device=device, dtype=dtype)
    return torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)


def paper_beta_to_grid(beta: float, n: int) -> float:
    """Convert the paper's β (cell units, β = 4) to the [-1, 1]-grid β the mask uses: β·(n−1)/(2n)."""
    return beta * (n - 1) / (2 * n)


def peak_cells(x: Tensor, peak: str) -> tuple[Tensor, Tensor]:
    """Return the (row, col) cell of each map's peak, each (B, D) long.

    ``centroid`` is the released code's activation-weighted centroid, rounded half up; an all-zero map
    gives the first cell. ``argmax`` is the paper's µ̂ (ties: the first cell in row-major order).
    ``local-mass`` is a remedy for the centroid's drift onto the object's centre (METHOD.md section 8):
    the cell whose 3×3 neighbourhood holds the most activation, i.e. the strongest local bump of a
    multi-bump map rather than the mean of the bumps, and less jumpy than a single-cell argmax
    (:func:`local_mass_cells`).
    """
    b, d, h, w = x.shape
    if peak == "argmax":
        flat = x.reshape(b, d, h * w).argmax(dim=-1)
        return flat // w, flat % w
    if peak == "local-mass":
        return local_mass_cells(x)
    if peak != "centroid":
        raise ValueError(f"peak must be one of {PEAKS}, got {peak!r}")
    xf = x.float()
    mass = xf.sum(dim=(2, 3))  # (B, D)
    rows = torch.arange(h, device=x.device, dtype=torch.float32)
    cols = torch.arange(w, device=x.device, dtype=torch.float32)
    safe = torch.where(mass > 0, mass, torch.ones_like(mass))
    ri = (xf.sum(dim=3) * rows).sum(dim=2) / safe
    ci = (xf.sum(dim=2) * cols).sum(dim=2) / safe
    # A non-finite map (a diverging run) must still index the grid: the NaN guard reports it later.
    ri = torch.floor(torch.nan_to_num(ri, nan=0.0) + 0.5).clamp_(0, h - 1).long()
    ci = torch.floor(torch.nan_to_num(ci, nan=0.0) + 0.5).clamp_(0, w - 1).long()
    return ri, ci


def local_mass_cells(x: Tensor) -> tuple[Tensor, Tensor]:
    """Return the (row, col) of each map's largest 3×3 neighbourhood sum (zero padding), each (B, D) long.

    Equal sums go to the cell with the larger own value (a lone spike is its own peak, not the first of
    the windows that contain it), then to the first cell in row-major order; an all-zero map gives the first cell.
    """
    b, d, h, w = x.shape
    xf = x.float().reshape(b * d, 1, h, w)
    # Sums over the 3×3 window (avg_pool with the padding counted, times 9), plus a small share of the
    # centre cell that only decides between equal sums.
    local = 9.0 * torch.nn.functional.avg_pool2d(xf, 3, stride=1, padding=1, count_include_pad=True) + 1e-3 * xf
    flat = torch.nan_to_num(local, nan=0.0).reshape(b, d, h * w).argmax(dim=-1)
    return flat // w, flat % w


def template_masks(rows: Tensor, cols: Tensor, beta: Tensor, h: int, w: int) -> Tensor:
    """Return the positive templates without τ (peak value 1) at the given cells, (B, D, h, w).

    m_ij = max(1 − β_d(|u_i − u_î| + |u_j − u_ĵ|), −1) on the [-1, 1] grid, β per filter (D,).
    """
    dtype = beta.dtype if beta.is_floating_point() else torch.float32
    u = grid_coordinates(h, device=rows.device, dtype=dtype)
    v = grid_coordinates(w, device=rows.device, dtype=dtype)
    dist = (u[None, None, :, None] - u[rows][..., None, None]).abs() + (
        v[None, None, None, :] - v[cols][..., None, None]
    ).abs()  # (B, D, h, w)
    return torch.clamp(1.0 - beta.to(dtype)[None, :, None, None] * dist, min=-1.0)


class InterpretableMask(nn.Module):
    """Mask layer: ``relu(x ∘ m)`` with m the positive template at each map's peak (METHOD.md §2).

    Args:
        num_filters: channels D of the masked post-ReLU maps.
        num_classes: categories C the filters are assigned to (1 for single-category tasks).
        peak: ``"centroid"`` (released code, default), ``"argmax"`` (paper) or ``"local-mass"`` (the
            largest 3×3 neighbourhood sum; :func:`local_mass_cells`).
        beta: ``"learned"`` (the code's per-filter update toward clip(3/σ̄, 1.5, 3), initialised to 2)
            or a fixed β in the paper's cell units (4 in the paper).
        active: ``False`` builds the baseline: the identical module that passes maps through unchanged
            and only tracks the filter → category statistics, so a baseline is evaluated like for like.
        category_momentum: momentum of the exponential moving average of the per-class mean peak.
        beta_lr: the learned β's learning-rate multiplier (the released code's 0.05).
        beta_grad: the scale of β's pseudo-gradient ``−beta_grad·(target − β)`` (the code's 1e4).

    The mask is computed without gradient (µ̂ is a constant), so backward is ``x.grad = g·m·[x∘m > 0]``.
    """

    def __init__(
        self,
        num_filters: int,
        *,
        num_classes: int,
        peak: str = "centroid",
        beta: str | float = "learned",
        active: bool = True,
        category_momentum: float = 0.9,
        beta_lr: float = 0.05,
        beta_grad: float = 1e4,
    ) -> None:
        super().__init__()
        if peak not in PEAKS:
            raise ValueError(f"peak must be one of {PEAKS}, got {peak!r}")
        if beta != "learned" and not (isinstance(beta, (int, float)) and beta > 0):
            raise ValueError(f"beta must be 'learned' or a positive number, got {beta!r}")
        self.peak = peak
        self.beta_mode = beta
        self.active = active
        self.category_momentum = category_momentum
        self.beta_lr = beta_lr
        self.beta_grad = beta_grad
        self.register_buffer("beta", torch.full((num_filters,), 2.0))
        # β's momentum buffer: the released code moves β through its momentum SGD (update_beta).
        self.register_buffer("beta_velocity", torch.zeros(num_filters))
        # (C, D) running per-class mean of each filter's peak activation; `class_seen` makes the first
        # observation of a class replace the zero initial value instead of being damped toward it.
        self.register_buffer("class_peak", torch.zeros(num_classes, num_filters))
        self.register_buffer("class_seen", torch.zeros(num_classes, dtype=torch.bool))
        # Class frequency ρ_c of the training set (for the multi-category weights w⁺, w⁻).
        self.register_buffer("class_freq", torch.full((num_classes,), 1.0 / num_classes))
        # Called with (mask, x, m) on each forward while the filter loss trains this layer (loss.py).
        self.hook: Callable[[InterpretableMask, Tensor, Tensor], None] | None = None

    @property
    def hook(self) -> Callable[[InterpretableMask, Tensor, Tensor], None] | None:
        """The filter loss' callback for the current batch, or None (see ``FilterLoss.batch``)."""
        return self._hook

    @hook.setter
    def hook(self, fn: Callable[[InterpretableMask, Tensor, Tensor], None] | None) -> None:
        # forward() reads only this flag: under torch.compile a bool is guarded by value, while the
        # filter loss installs a new closure every batch, which would recompile the graph every step.
        self._hook = fn
        self.hooked = fn is not None

    @property
    def num_filters(self) -> int:
        return self.beta.shape[0]

    @property
    def num_classes(self) -> int:
        return self.class_peak.shape[0]

    @property
    def category(self) -> Tensor:
        """Each filter's category ĉ(f) = argmax_c of the running per-class mean peak, (D,) long."""
        return self.class_peak.argmax(dim=0)

    def grid_beta(self, n: int) -> Tensor:
        """β on the [-1, 1] grid for an n-cell map, (D,)."""
        if self.beta_mode == "learned":
            return self.beta
        return torch.full_like(self.beta, paper_beta_to_grid(float(self.beta_mode), n))

    def masks_for(self, x: Tensor) -> Tensor:
        """Return the templates at each map's peak, (B, D, h, w), in x's dtype, without gradient."""
        with torch.no_grad():
            rows, cols = peak_cells(x, self.peak)
            m = template_masks(rows, cols, self.grid_beta(x.shape[-2]).float(), x.shape[-2], x.shape[-1])
        return m.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, D, h, w), post-ReLU
        if not self.active and not self.hooked:
            return x
        m = self.masks_for(x)
        if self.hooked:
            self._run_hook(x, m)
        if not self.active:
            return x
        return torch.relu(x * m)

    @torch.compiler.disable
    def _run_hook(self, x: Tensor, m: Tensor) -> None:
        """The filter loss' per-batch work, always eager: a compiled model breaks its graph here instead
        of tracing the hook (its statistics and closures change every batch)."""
        self._hook(self, x, m)

    @torch.no_grad()
    def update_categories(self, x: Tensor, labels: Tensor) -> None:
        """Fold one training batch into the per-class mean peak (EMA, momentum ``category_momentum``)."""
        c = self.num_classes
        peaks = x.detach().amax(dim=(2, 3)).float()  # (B, D); max is exact in any dtype
        labels = labels.clamp(max=c - 1) if c == 1 else labels
        onehot = torch.nn.functional.one_hot(labels, c).float()  # (B, C)
        count = onehot.sum(dim=0)  # (C,)
        batch_mean = (onehot.t() @ peaks) / count.clamp(min=1)[:, None]  # (C, D)
        present = count > 0
        mom = torch.where(self.class_seen, self.category_momentum, 0.0)[:, None]
        updated = mom * self.class_peak + (1 - mom) * batch_mean
        self.class_peak.copy_(torch.where(present[:, None], updated, self.class_peak))
        self.class_seen |= present

    @torch.no_grad()
    def update_beta(self, x: Tensor, m: Tensor, positive: Tensor, *, lr: float, momentum: float = 0.9) -> None:
        """Move the learned β toward clip(3/σ̄, 1.5, 3) as the released code does, σ̄ in cell units.

        σ̄_d is the strength-weighted mean spread σ = sqrt(Σ((i−î)² + (j−ĵ)²)·x_ij / Σx_ij) of filter
        d's maps on images of its category (``positive`` (B, D) bool), with the raw strength
        s = mean(x ∘ m) (negative where the map lies outside the mask); a filter with no such image
        targets 3. β moves as a parameter whose gradient is ``−beta_grad·(target − β)``, through
        MatConvNet's momentum SGD at ``beta_lr·lr`` with no weight decay:
        ``v ← momentum·v − beta_lr·lr·g``, ``β ← β + v``.

        Args:
            x: the masked layer's input maps, (B, D, h, w). m: their masks.
            positive: (B, D) bool. lr: the step's learning rate. momentum: the optimiser's momentum.
        """
        if self.beta_mode != "learned":
            return
        h, w = x.shape[-2:]
        xf = x.detach().float()
        rows, cols = peak_cells(xf, self.peak)
        i = torch.arange(h, device=x.device, dtype=torch.float32)
        j = torch.arange(w, device=x.device, dtype=torch.float32)
        d2 = (i[None, None, :, None] - rows[..., None, None]) ** 2 + (
            j[None, None, None, :] - cols[..., None, None]
        ) ** 2  # (B, D, h, w)
        mass = xf.sum(dim=(2, 3))
        sigma = torch.sqrt((d2 * xf).sum(dim=(2, 3)) / mass.clamp(min=1e-12))  # (B, D); 0 for an all-zero map
        strength = (xf * m.float()).mean(dim=(2, 3)) * positive  # (B, D), raw
        total = strength.sum(dim=0)  # (D,)
        # σ̄ = Σsσ / Σs; 3/σ̄ is +inf at σ̄ = 0 and negative for a negative total, both then clipped.
        inverse = total / (strength * sigma).sum(dim=0)
        target = torch.clamp(torch.nan_to_num(3.0 * inverse, nan=3.0), 1.5, 3.0)
        target = torch.where(positive.any(dim=0), target, torch.full_like(target, 3.0))
        grad = -self.beta_grad * (target - self.beta)
        self.beta_velocity.mul_(momentum).add_(grad, alpha=-self.beta_lr * lr)
        self.beta.add_(self.beta_velocity)

    def extra_repr(self) -> str:
        beta = self.beta_mode if self.beta_mode == "learned" else f"{self.beta_mode} (paper units)"
        return (
            f"{self.num_filters}, num_classes={self.num_classes}, peak={self.peak}, beta={beta}, "
            f"active={self.active}"
        )
