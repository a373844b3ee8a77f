"""The explainers: the ICNN's own filter maps and Captum's attribution methods, as maps at input resolution.

Every explainer is a callable ``(images (B, 3, S, S), target (B,) long) -> (B, S, S)`` float map, higher
= more evidence for ``target``. Captum does the attribution (nothing of Captum is re-implemented here);
this module only chooses the layer, batches, and reduces Captum's output to one map per image:

=================  ==========================================================================  =========
name               what                                                                        reduction
=================  ==========================================================================  =========
``icnn``           mean of the layer's maps of the filters whose category is ``target``        layer, RF
``gradcam``        ``captum.attr.LayerGradCam`` on the same layer, ReLU'd (Selvaraju 2017)      layer, RF
``guided_gradcam`` ``captum.attr.GuidedGradCam`` (same layer; bilinear, Captum's interpolation)  Σ_c |·|
``ig``             ``captum.attr.IntegratedGradients``, zero (mean colour) baseline             Σ_c
``occlusion``      ``captum.attr.Occlusion``, zero patches over all channels                    Σ_c
``smoothgrad``     ``captum.attr.NoiseTunnel`` (smoothgrad) over ``captum.attr.Saliency`` (|∇|)  Σ_c
``conductance``    ``captum.attr.LayerConductance`` on the same layer, summed over filters      layer, RF
``centre``         reference: a Gaussian at the image centre, whatever the image               -
``random``         reference: uniform noise (chance level of every measure)                    -
=================  ==========================================================================  =========

"layer, RF": a ``(B, h, w)`` layer map up-sampled through the layer's receptive fields
(:func:`~icnn_compress.compare._measures.upsample_to_input`), the same for the three layer explainers so
that only the attribution differs. Signed sums for attributions with a sign convention (IG, occlusion:
positive = for the class); absolute values for gradients, whose sign per colour channel is not evidence.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator

import torch
from captum.attr import (
    GuidedGradCam,
    IntegratedGradients,
    LayerConductance,
    LayerGradCam,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from torch import Tensor, nn

from icnn_compress.method.protocol import MeasurePoint, read_map
from icnn_compress.method.receptive_field import LayerGeometry

from ._measures import upsample_to_input
from ._settings import CompareError, CompareSettings

__all__ = ["EXPLAINERS", "REFERENCE_EXPLAINERS", "Explainer", "build_explainers"]

EXPLAINERS: dict[str, str] = {
    "icnn": "the model's own masked filter maps of the class's filters (one forward pass)",
    "gradcam": "Captum LayerGradCam on the same layer",
    "guided_gradcam": "Captum GuidedGradCam on the same layer",
    "ig": "Captum IntegratedGradients",
    "occlusion": "Captum Occlusion",
    "smoothgrad": "Captum NoiseTunnel(Saliency), smoothgrad",
    "conductance": "Captum LayerConductance on the same layer, summed over filters",
    "centre": "reference: a fixed Gaussian at the image centre",
    "random": "reference: uniform random map",
}
REFERENCE_EXPLAINERS = ("centre", "random")


class Explainer:
    """A map maker: ``explainer(images, target) -> (B, S, S)``; subclasses set ``name``."""

    name = ""

    def __call__(self, images: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError


def _grad_input(images: Tensor) -> Tensor:
    # Captum sets requires_grad itself but warns each call; a leaf that already requires it is quiet.
    return images.detach().clone().requires_grad_(True)


class IcnnMaps(Explainer):
    """The model's own explanation: the mean of the ``target`` class's filter maps at ``layer``.

    The maps are read where the measurement protocol reads them (``point``: under ``official`` a mask's
    input, before the mask moves the peak; without a point, the layer's output),
    so :meth:`capture` around the forward the comparison makes anyway yields them at no extra cost;
    calling the explainer directly (as ``sensitivity_max`` does) runs its own forward. A class with no
    filter gets a flat zero map (chance level, counted as empty).
    """

    name = "icnn"

    def __init__(self, model: nn.Module, layer: nn.Module, geometry: LayerGeometry, image_size: int,
                 category: Tensor, point: MeasurePoint | None = None) -> None:
        self.model, self.layer, self.geometry, self.image_size = model, layer, geometry, image_size
        self.category = category.long()
        self.point = point
        self.activation: Tensor | None = None

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Keep the maps (``point``'s, else the layer's output) of the forward passes run inside the block."""

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self.activation = (output if self.point is None else read_map(self.point, module, inputs, output)).detach()

        handle = self.layer.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def from_activation(self, activation: Tensor, target: Tensor) -> Tensor:
        """Return the maps from the layer's ``(B, D, h, w)`` output."""
        category = self.category.to(activation.device)
        chosen = (category[None, :] == target.to(activation.device)[:, None]).to(activation.dtype)  # (B, D)
        cell = torch.einsum("bd,bdhw->bhw", chosen, activation) / chosen.sum(dim=1).clamp(min=1)[:, None, None]
        return upsample_to_input(cell, self.geometry, self.image_size)

    def __call__(self, images: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad(), self.capture():
            self.model(images)
        return self.from_activation(self.activation, target)


class _GradCam(Explainer):
    name = "gradcam"

    def __init__(self, model: nn.Module, layer: nn.Module, geometry: LayerGeometry, image_size: int) -> None:
        self.method = LayerGradCam(model, layer)
        self.geometry, self.image_size = geometry, image_size

    def __call__(self, images: Tensor, target: Tensor) -> Tensor:
        cam = self.method.attribute(_grad_input(images), target=target, relu_attributions=True)  # (B, 1, h, w)
        return upsample_to_input(cam[:, 0].detach(), self.geometry, self.image_size)


class _Conductance(Explainer):
    """Layer conductance toward ``target``; also keeps each filter's total, ``(B, D)``, of the last call."""

    name = "conductance"

    def __init__(self, model: nn.Module, layer: nn.Module, geometry: LayerGeometry, image_size: int,
                 settings: CompareSettings) -> None:
        self.method = LayerConductance(model, layer)
        self.geometry, self.image_size, self.settings = geometry, image_size, settings
        self.filter_totals: Tensor | None = None

    def __call__(self, images: Tensor, target: Tensor) -> Tensor:
        cond = self.method.attribute(_grad_input(images), baselines=0.0, target=target,
                                     n_steps=self.settings.conductance_steps,
                                     internal_batch_size=self.settings.internal_batch_size).detach()  # (B, D, h, w)
        self.filter_totals = cond.sum(dim=(2, 3))
        return upsample_to_input(cond.sum(dim=1), self.geometry, self.image_size)


class _GuidedGradCam(Explainer):
    name = "guided_gradcam"

    def __init__(self, model: nn.Module, layer_name: str) -> None:
        # Guided backprop overrides nn.ReLU's backward through module hooks, which in-place ReLUs can
        # break: it runs on a copy whose ReLUs are out of place (the mask's own functional relu is left
        # as it is: it is part of the model, not a backprop rule).
        self.model = copy.deepcopy(model)
        for mod in self.model.modules():
            if isinstance(mod, nn.ReLU):
                mod.inplace = False
        self.method = GuidedGradCam(self.model, self.model.get_submodule(layer_name))

    def __call__(self, images: Tensor, target: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
            attr = self.method.attribute(_grad_input(images), target=target, interpolate_mode="bilinear")
        return attr.detach().abs().sum(dim=1)


class _IntegratedGradients(Explainer):
    name = "ig"

    def __init__(self, model: nn.Module, settings: CompareSettings) -> None:
        self.method, self.settings = IntegratedGradients(model), settings

    def __call__(self, images: Tensor, target: Tensor) -> Tensor:
        attr = self.method.attribute(_grad_input(images), baselines=0.0, target=target,
                                     n_steps=self.settings.ig_steps,
                                     internal_batch_size=self.settings.internal_batch_size)
        return attr.detach().sum(dim=1)


class _Occlusion(Explainer):
    name = "occlusion"

    def __init__(self, model: nn.Module, image_size: int, settings: CompareSettings) -> None:
        self.method, self.settings = Occlusion(model), settings
        self.window = max(1, round(settings.occlusion_window * image_size))
        self.stride = max(1, round(settings.occlusion_stride * image_size))

    def __call__(self, images: Tensor, target: Tensor) -> Tensor:
        c = images.shape[1]
        per_eval = max(1, self.settings.internal_batch_size // images.shape[0])
        with torch.no_grad():
            attr = self.method.attribute(images, sliding_window_shapes=(c, self.window, self.window),
                                         strides=(c, self.stride, self.stride), baselines=0.0, target=target,
                                         perturbations_per_eval=per_eval)
        return attr.detach().sum(dim=1)


class _SmoothGrad(Explainer):
    name = "smoothgrad"

    def __init__(self, model: nn.Module, settings: CompareSettings, input_range: float) -> None:
        self.method, self.settings = NoiseTunnel(Saliency(model)), settings
        self.stdev = settings.smoothgrad_noise * input_range

    def __call__(self, images: Tensor, target: Tensor) -> Tensor:
        per_batch = max(1, self.settings.internal_batch_size // images.shape[0])
        attr = self.method.attribute(_grad_input(images), nt_type="smoothgrad",
                                     nt_samples=self.settings.smoothgrad_samples,
                                     nt_samples_batch_size=min(per_batch, self.settings.smoothgrad_samples),
                                     stdevs=self.stdev, target=target)
        return attr.detach().sum(dim=1)


class _Centre(Explainer):
    name = "centre"

    def __init__(self, image_size: int) -> None:
        px = torch.arange(image_size, dtype=torch.float32) + 0.5 - image_size / 2
        sigma = image_size / 4
        self.map = torch.exp(-(px[:, None] ** 2 + px[None, :] ** 2) / (2 * sigma**2))  # (S, S)

    def __call__(self, images: Tensor, target: Tensor) -> Tensor:
        return self.map.to(images.device).expand(images.shape[0], -1, -1).clone()


class _Random(Explainer):
    name = "random"

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: Tensor, target: Tensor) -> Tensor:
        b, _, h, w = images.shape
        return torch.rand(b, h, w, generator=self.generator).to(images.device)


def build_explainers(
    model: nn.Module,
    methods: list[str] | tuple[str, ...],
    *,
    layer: str,
    image_size: int,
    geometry: LayerGeometry,
    filter_category: Tensor | None,
    settings: CompareSettings,
    input_range: float = 1.0,
    point: MeasurePoint | None = None,
    point_geometry: LayerGeometry | None = None,
) -> dict[str, Explainer]:
    """Return the named explainers for ``model`` (in eval mode), in the order given.

    Args:
        model: the classifier; ``(B, 3, S, S) -> (B, C)`` logits.
        methods: names from :data:`EXPLAINERS`.
        layer: the module (``model.named_modules()``) of the ICNN maps and of the layer methods.
        image_size: ``S``.
        geometry: ``layer``'s receptive-field geometry (``receptive_field.layer_geometry``).
        filter_category: ``(D,)`` long category of each filter of ``layer``; needed by ``icnn``.
        settings: steps, batch sizes, noise.
        input_range: ``max - min`` of a normalised input; SmoothGrad's noise is a fraction of it.
        point, point_geometry: where the ``icnn`` maps are read (:mod:`icnn_compress.method.protocol`) and that
            module's geometry; default: ``layer``'s output.
    """
    unknown = [m for m in methods if m not in EXPLAINERS]
    if unknown:
        raise CompareError(f"unknown explainer(s) {unknown}; choose from {', '.join(EXPLAINERS)}")
    if len(set(methods)) != len(methods):
        raise CompareError(f"explainers are listed twice in {list(methods)}")
    module = model.get_submodule(layer)
    out: dict[str, Explainer] = {}
    for name in methods:
        if name == "icnn":
            if filter_category is None:
                raise CompareError(f"the icnn explainer needs each filter's category at {layer!r}: measure a "
                                 "mask layer (InterpretableMask.category) or pass filter_category")
            icnn_module = module if point is None else model.get_submodule(point.module)
            out[name] = IcnnMaps(model, icnn_module, point_geometry or geometry, image_size, filter_category, point)
        elif name == "gradcam":
            out[name] = _GradCam(model, module, geometry, image_size)
        elif name == "conductance":
            out[name] = _Conductance(model, module, geometry, image_size, settings)
        elif name == "guided_gradcam":
            out[name] = _GuidedGradCam(model, layer)
        elif name == "ig":
            out[name] = _IntegratedGradients(model, settings)
        elif name == "occlusion":
            out[name] = _Occlusion(model, image_size, settings)
        elif name == "smoothgrad":
            out[name] = _SmoothGrad(model, settings, input_range)
        elif name == "centre":
            out[name] = _Centre(image_size)
        elif name == "random":
            out[name] = _Random(settings.seed + 1)
    return out


def input_range_of(mean: list[float] | None, std: list[float] | None) -> float:
    """Return ``max - min`` of images in ``[0, 1]`` after ``(x - mean) / std`` (1 without normalisation)."""
    if mean is None or std is None:
        return 1.0
    hi = max((1 - m) / s for m, s in zip(mean, std))
    lo = min((0 - m) / s for m, s in zip(mean, std))
    return float(hi - lo) if math.isfinite(hi - lo) else 1.0
