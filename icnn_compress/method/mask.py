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
    "PEAK_RULES",
    "grid_coordinates",
    "landmark_cells",
    "masked_maps",
    "local_mass_cells",
    "paper_beta_to_grid",
    "peak_cells",
    "spread_cells",
    "template_masks",
]


def grid_coordinates(n: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Return the n cell coordinates on the released code's [-1, 1] grid (a single cell sits at 0)."""
    if n == 1:
        return torch.zeros(1, device=device, dtype=dtype)
    return torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)


def paper_beta_to_grid(beta: float, n: int) -> float:
    """Convert the paper's β (cell units, β = 4) to the [-1, 1]-grid β the mask uses: β·(n−1)/(2n)."""
    return beta * (n - 1) / (2 * n)


def _argmax_cells(x: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's µ̂: the largest cell (ties: the first in row-major order)."""
    b, d, h, w = x.shape
    flat = x.reshape(b, d, h * w).argmax(dim=-1)
    return flat // w, flat % w


def _centroid_cells(x: Tensor) -> tuple[Tensor, Tensor]:
    """The released code's µ̂: the activation-weighted centroid, rounded half up (all-zero map: first cell)."""
    b, d, h, w = x.shape
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
    flat = _local_mass(x).argmax(dim=-1)
    return flat // x.shape[-1], flat % x.shape[-1]


def _local_mass(x: Tensor) -> Tensor:
    """Each cell's 3×3 neighbourhood sum (zero padding) plus 1e-3 of its own value, (B, D, h·w) float; NaN → 0."""
    b, d, h, w = x.shape
    xf = x.float().reshape(b * d, 1, h, w)
    # Sums over the 3×3 window (avg_pool with the padding counted, times 9), plus a small share of the
    # centre cell that only decides between equal sums.
    local = 9.0 * torch.nn.functional.avg_pool2d(xf, 3, stride=1, padding=1, count_include_pad=True) + 1e-3 * xf
    return torch.nan_to_num(local, nan=0.0).reshape(b, d, h * w)


# Peak rules µ̂ by the name ``icnn.peak`` gives them: each maps (B, D, h, w) maps to their (row, col) cells,
# each (B, D) long, with tensor ops only (no host sync, no data-dependent Python branch), so that the fused
# mask function (masked_maps) compiles with any of them. A new rule is one more entry here.
PEAK_RULES: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "centroid": _centroid_cells,
    "argmax": _argmax_cells,
    "local-mass": local_mass_cells,
}
# The share of a category's filters that may peak in one 3×3 neighbourhood under ``peak = "spread"``: one of
# four parts each (the generated creatures have 3-4).
SPREAD_QUOTA = 0.25


def spread_cells(x: Tensor, category: Tensor, quota: float = SPREAD_QUOTA) -> tuple[Tensor, Tensor]:
    """Return each map's local-mass peak, moved off the places its category's earlier filters crowd, each (B, D).

    A landmark-free remedy for the filters piling onto one part (issue 17): filters are ranked by index within
    their category (``category`` (D,) long, the mask's filter categories: no image label is read, so training
    and inference place the masks alike). A filter whose local-mass peak (:func:`local_mass_cells`) lies within
    one cell (3×3) of the local-mass peaks of at least ``quota`` × its category's size earlier filters takes
    instead its strongest 3×3 bump outside every such crowded neighbourhood (where there is none, its own peak).
    The rank is fixed, so the same filters keep the crowded part on every image and the others are trained
    (through the template and the filter loss) on their next part.
    """
    b, d, h, w = x.shape
    local = _local_mass(x)
    own = local.argmax(dim=-1)  # (B, D): local_mass_cells' peak
    near = torch.nn.functional.max_pool2d(
        torch.nn.functional.one_hot(own, h * w).float().reshape(b * d, 1, h, w), 3, stride=1, padding=1
    ).reshape(b, d, h * w)  # 1 within one cell of each filter's peak
    same = category[:, None] == category[None, :]  # (D, D)
    index = torch.arange(d, device=x.device)
    earlier = (same & (index[None, :] < index[:, None])).float()  # [d, e]: e is ranked before d in d's category
    crowd = torch.einsum("de,bej->bdj", earlier, near)  # (B, D, hw): earlier filters peaking near each cell
    full = crowd >= quota * same.sum(dim=1).float()[None, :, None]
    top = local.amax(dim=-1, keepdim=True)
    # in [0, 1] where the map has mass, minus 2 where crowded; an empty cell (-3) is never a place to move to
    score = torch.where(local > 0, local / torch.where(top > 0, top, torch.ones_like(top)) - 2.0 * full.float(), -3.0)
    flat = score.argmax(dim=-1)
    return flat // w, flat % w


PEAKS = (*PEAK_RULES, "spread")


def peak_cells(x: Tensor, peak: str, category: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Return the (row, col) cell of each map's peak, each (B, D) long.

    ``centroid`` is the released code's activation-weighted centroid, rounded half up; an all-zero map
    gives the first cell. ``argmax`` is the paper's µ̂ (ties: the first cell in row-major order).
    ``local-mass`` is a remedy for the centroid's drift onto the object's centre (METHOD.md section 8):
    the cell whose 3×3 neighbourhood holds the most activation, i.e. the strongest local bump of a
    multi-bump map rather than the mean of the bumps, and less jumpy than a single-cell argmax
    (:func:`local_mass_cells`).
    """
    if peak == "spread":
        if category is None:
            raise ValueError("peak 'spread' needs the filters' categories")
        return spread_cells(x, category)
    rule = PEAK_RULES.get(peak)
    if rule is None:
        raise ValueError(f"peak must be one of {PEAKS}, got {peak!r}")
    return rule(x)


def landmark_cells(xy: Tensor, image_size: int, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Return the (row, col) cell of an h×w map that holds each pixel point ``xy`` (..., 2) = (x, y).

    The map tiles the S×S image (``image_size`` S, the continuous square [0, S]² of the data readers) evenly:
    column ⌊x·w/S⌋, row ⌊y·h/S⌋, clamped to the map (a point on the far edge x = S is in the last cell).
    """
    cols = torch.floor(xy[..., 0].float() * (w / image_size)).long().clamp_(0, w - 1)
    rows = torch.floor(xy[..., 1].float() * (h / image_size)).long().clamp_(0, h - 1)
    return rows, cols


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


def masked_maps(x: Tensor, beta: Tensor, peak: str, active: bool,
                anchor: tuple[Tensor, Tensor, int] | None = None,
                category: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return ``relu(x ∘ m)`` (or x itself when not ``active``), the masks m and the peak cells (rows, cols).

    The mask layer's whole forward as one function (the peak rule, the templates and the product), so that
    ``torch.compile`` fuses it into a few kernels; eager, it runs exactly the ops of the unfused layer.
    m is in x's dtype and carries no gradient (µ̂ is a constant).

    Args:
        x: the post-ReLU maps, (B, D, h, w). beta: each filter's β on the [-1, 1] grid, (D,).
        peak: a name of :data:`PEAK_RULES`. active: ``False`` passes x through (the baseline's mask).
        anchor: ``(xy, valid, image_size)``, training only (``icnn.anchor``, :mod:`icnn_compress.method.anchor`):
            where ``valid`` (B, D) holds, the anchored µ̂ is the cell of the pixel point ``xy`` (B, D, 2)
            (filter d's assigned landmark on image b). The output's VALUE stays the peak rule's
            ``relu(x ∘ m)``, so nothing downstream can read the landmarks (a forward template on them
            gives the label away: the creature's part layout is its class); its gradient, the returned
            masks and cells (which the filter loss reads) are the anchored template's.
        category: the filters' categories (D,), for ``peak = "spread"`` (:func:`spread_cells`).
    """
    h, w = x.shape[-2:]
    with torch.no_grad():
        rows, cols = peak_cells(x, peak, category)
        m = template_masks(rows, cols, beta.float(), h, w).to(x.dtype)  # (B, D, h, w)
    if anchor is None or not active:
        return (torch.relu(x * m) if active else x), m, rows, cols
    with torch.no_grad():
        xy, valid, image_size = anchor
        a_rows, a_cols = landmark_cells(xy, image_size, h, w)
        a_rows, a_cols = torch.where(valid, a_rows, rows), torch.where(valid, a_cols, cols)
        a_m = template_masks(a_rows, a_cols, beta.float(), h, w).to(x.dtype)
    routed = torch.relu(x * a_m)  # the gradient's path: ∂/∂x = g·a_m·[x ∘ a_m > 0]
    return routed + (torch.relu(x * m) - routed).detach(), a_m, a_rows, a_cols


def category_update(class_peak: Tensor, class_seen: Tensor, peaks: Tensor, labels: Tensor, momentum: float) -> None:
    """Fold one batch's peaks (B, D) into the per-class EMA ``class_peak`` (C, D) and ``class_seen`` (C,), in place."""
    c = class_peak.shape[0]
    labels = labels.clamp(max=c - 1) if c == 1 else labels
    onehot = torch.nn.functional.one_hot(labels, c).float()  # (B, C)
    count = onehot.sum(dim=0)  # (C,)
    batch_mean = (onehot.t() @ peaks) / count.clamp(min=1)[:, None]  # (C, D)
    present = count > 0
    mom = torch.where(class_seen, momentum, 0.0)[:, None]
    updated = mom * class_peak + (1 - mom) * batch_mean
    class_peak.copy_(torch.where(present[:, None], updated, class_peak))
    class_seen |= present


def beta_update(beta: Tensor, velocity: Tensor, x: Tensor, m: Tensor, rows: Tensor, cols: Tensor, positive: Tensor,
                *, lr: float | Tensor, momentum: float, beta_lr: float, beta_grad: float) -> None:
    """One step of the learned β (and its momentum ``velocity``), in place: see :meth:`InterpretableMask.update_beta`.

    ``rows``, ``cols``: the maps' peak cells (B, D), as the mask found them.
    """
    h, w = x.shape[-2:]
    xf = x.detach().float()
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
    grad = -beta_grad * (target - beta)
    if torch.compiler.is_compiling():
        # The learning rate changes every step: passed as a 0-d tensor it stays a graph input, while an
        # ``alpha=`` number would be specialised and recompile the graph at each step.
        velocity.mul_(momentum).add_(grad * (lr * -beta_lr))
    else:
        velocity.mul_(momentum).add_(grad, alpha=-beta_lr * lr)  # type: ignore[arg-type]  # eager: lr is a float
    beta.add_(velocity)


_COMPILED: dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, made once per function and reused (its graphs are cached per input shapes and
    dtypes, so every layer and step after the first of a shape reuses them)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


class InterpretableMask(nn.Module):
    """Mask layer: ``relu(x ∘ m)`` with m the positive template at each map's peak (METHOD.md §2).

    Args:
        num_filters: channels D of the masked post-ReLU maps.
        num_classes: categories C the filters are assigned to (1 for single-category tasks).
        peak: ``"centroid"`` (released code, default), ``"argmax"`` (paper), ``"local-mass"`` (the
            largest 3×3 neighbourhood sum; :func:`local_mass_cells`) or ``"spread"`` (the local-mass peak
            kept off the places a category's earlier filters crowd; :func:`spread_cells`).
        beta: ``"learned"`` (the code's per-filter update toward clip(3/σ̄, 1.5, 3), initialised to 2)
            or a fixed β in the paper's cell units (4 in the paper).
        active: ``False`` builds the baseline: the identical module that passes maps through unchanged
            and only tracks the filter → category statistics, so a baseline is evaluated like for like.
        category_momentum: momentum of the exponential moving average of the per-class mean peak.
        beta_lr: the learned β's learning-rate multiplier (the released code's 0.05).
        beta_grad: the scale of β's pseudo-gradient ``−beta_grad·(target − β)`` (the code's 1e4).
        rectify: the maps are not post-ReLU (GELU, SiLU, Hardswish, a BatchNorm output): mask ``relu(x)``,
            which the filter loss then reads too. A post-ReLU map is its own rectified map; the baseline
            still passes ``x`` through unchanged.

    The mask is computed without gradient (µ̂ is a constant), so backward is ``x.grad = g·m·[x∘m > 0]``.
    """

    # Buffers (registered in __init__), declared for type checkers: nn.Module.__getattr__ is untyped.
    beta: Tensor
    beta_velocity: Tensor
    class_peak: Tensor
    class_seen: Tensor
    class_freq: Tensor

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
        rectify: bool = False,
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
        self.rectify = rectify
        self.register_buffer("beta", torch.full((num_filters,), 2.0))
        # β's momentum buffer: the released code moves β through its momentum SGD (update_beta).
        self.register_buffer("beta_velocity", torch.zeros(num_filters))
        # (C, D) running per-class mean of each filter's peak activation; `class_seen` makes the first
        # observation of a class replace the zero initial value instead of being damped toward it.
        self.register_buffer("class_peak", torch.zeros(num_classes, num_filters))
        self.register_buffer("class_seen", torch.zeros(num_classes, dtype=torch.bool))
        # Class frequency ρ_c of the training set (for the multi-category weights w⁺, w⁻).
        self.register_buffer("class_freq", torch.full((num_classes,), 1.0 / num_classes))
        # Called with (mask, x, m, (rows, cols)) on each forward while the filter loss trains this layer (loss.py).
        self.hook: Callable[[InterpretableMask, Tensor, Tensor, tuple[Tensor, Tensor]], None] | None = None
        # Run the forward as the compiled masked_maps (torch.compile; see FilterLoss(compile=True)).
        self.compiled = False
        # (xy (B, D, 2), valid (B, D), image_size): this training batch's landmark anchors for µ̂, or None
        # (set and cleared around each training forward by icnn_compress.method.anchor.anchored; never in evaluation).
        self.anchor: tuple[Tensor, Tensor, int] | None = None

    @property
    def hook(self) -> Callable[[InterpretableMask, Tensor, Tensor, tuple[Tensor, Tensor]], None] | None:
        """The filter loss' callback for the current batch, or None (see ``FilterLoss.batch``)."""
        return self._hook

    @hook.setter
    def hook(self, fn: Callable[[InterpretableMask, Tensor, Tensor, tuple[Tensor, Tensor]], None] | None) -> None:
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

    @property
    def _spread_category(self) -> Tensor | None:
        """The filter categories the ``spread`` peak rule ranks filters in; None for the other rules."""
        return self.category if self.peak == "spread" else None

    def grid_beta(self, n: int) -> Tensor:
        """β on the [-1, 1] grid for an n-cell map, (D,)."""
        if self.beta_mode == "learned":
            return self.beta
        return torch.full_like(self.beta, paper_beta_to_grid(float(self.beta_mode), n))

    def masks_for(self, x: Tensor) -> Tensor:
        """Return the templates at each map's peak, (B, D, h, w), in x's dtype, without gradient."""
        with torch.no_grad():
            rows, cols = peak_cells(x, self.peak, self._spread_category)
            m = template_masks(rows, cols, self.grid_beta(x.shape[-2]).float(), x.shape[-2], x.shape[-1])
        return m.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, D, h, w), post-ReLU unless rectify
        if not self.active and not self.hooked:
            return x
        # The template is placed on, and the loss' gradient injected into, the rectified map: a signed map's
        # negative cells would otherwise turn positive under a negative template value.
        xr = torch.relu(x) if self.rectify else x
        # Compiled only when nothing traces this forward already (torch.compile of the model, torch.export,
        # the ONNX exporter's tracer): a tracer takes the plain function's ops.
        tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
        fn = compiled(masked_maps) if self.compiled and not tracing else masked_maps
        anchor = self.anchor if self.training and self.active else None
        out, m, rows, cols = fn(xr, self.grid_beta(x.shape[-2]), self.peak, self.active, anchor,
                                self._spread_category)
        if self.hooked:
            self._run_hook(xr, m, (rows, cols))
        return out if self.active else x

    @torch.compiler.disable
    def _run_hook(self, x: Tensor, m: Tensor, cells: tuple[Tensor, Tensor]) -> None:
        """The filter loss' per-batch work, always eager: a compiled model breaks its graph here instead
        of tracing the hook (its statistics and closures change every batch); the hook compiles its own
        fused functions when asked (``FilterLoss(compile=True)``)."""
        assert self._hook is not None, "_run_hook runs only while a hook is installed"
        self._hook(self, x, m, cells)

    @torch.no_grad()
    def update_categories(self, x: Tensor, labels: Tensor, *, peaks: Tensor | None = None) -> None:
        """Fold one training batch into the per-class mean peak (EMA, momentum ``category_momentum``).

        ``peaks``: the maps' maxima ``x.amax(dim=(2, 3)).float()``, (B, D), when the caller has them.
        """
        if peaks is None:
            peaks = x.detach().amax(dim=(2, 3)).float()  # (B, D); max is exact in any dtype
        category_update(self.class_peak, self.class_seen, peaks, labels, self.category_momentum)

    @torch.no_grad()
    def update_beta(self, x: Tensor, m: Tensor, positive: Tensor, *, lr: float, momentum: float = 0.9,
                    cells: tuple[Tensor, Tensor] | None = None) -> None:
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
            cells: the maps' peak cells (rows, cols), each (B, D), when the caller has them (the mask's forward).
        """
        if self.beta_mode != "learned":
            return
        rows, cols = cells if cells is not None else peak_cells(x.detach().float(), self.peak,
                                                                self._spread_category)
        beta_update(self.beta, self.beta_velocity, x, m, rows, cols, positive, lr=lr, momentum=momentum,
                    beta_lr=self.beta_lr, beta_grad=self.beta_grad)

    def extra_repr(self) -> str:
        beta = self.beta_mode if self.beta_mode == "learned" else f"{self.beta_mode} (paper units)"
        return (
            f"{self.num_filters}, num_classes={self.num_classes}, peak={self.peak}, beta={beta}, "
            f"active={self.active}" + (", rectify=True" if self.rectify else "")
        )
