"""The architecture registry: how each supported CNN is built, where its masks go, and its normalisation.

Architecture names: a registered torchvision name (:data:`ARCHITECTURES`), ``"timm:<name>"`` for a model
of timm's registry, or ``"package.module:builder"`` for a user CNN (an installed entry point in group
:data:`BUILDER_ENTRY_POINTS`, or any importable builder with ``--trust-code``).
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from icnn_compress.config import Recipe
from icnn_compress.errors import ModelError, UntrustedCodeError
from icnn_compress.models.weights import build_torchvision_model, load_torchvision_weights

__all__ = [
    "ARCHITECTURES",
    "BUILDER_ENTRY_POINTS",
    "PLAIN",
    "TIMM_PREFIX",
    "VARIANTS",
    "ArchSpec",
    "build_base_model",
    "check_trusted",
    "model_normalization",
    "with_model_normalization",
]

log = logging.getLogger(__name__)

VARIANTS = ("icnn", "baseline")
# the architecture record of a model no icnn run made (icnn_compress.runs.plain): the network as built, no masks
PLAIN = "plain"

# Installed packages list their model builders here; a model file may name those without --trust-code.
BUILDER_ENTRY_POINTS = "icnn_compress.models"
# "timm:<name>" names a model of timm's registry (timm.create_model); no code of the file's choosing is imported.
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture family takes its masks.

    Args:
        top_layer: the top conv block's module name, given the built model; None: found by
            :func:`find_top_layer` at the recipe's image size.
        pool_layer: module after which the second mask goes, or None for right after the new conv.
        head: name of the classifier module to replace, and how to build a new one from
            (in_features, num_classes, head_width); None: the model's last Linear (or last conv, for a
            convolutional head), replaced by one of the same kind when the class count changes.
        paper_head: the paper's layout always uses a freshly initialised classifier (VGG, AlexNet).
        note: where this layout comes from.
        build_kwargs: keyword arguments of the torchvision builder (e.g. no auxiliary heads, whose extra
            outputs a classifier's training loop does not take).
    """

    top_layer: Callable[[nn.Module], str] | None
    pool_layer: Callable[[nn.Module], str | None]
    head: str | None
    make_head: Callable[[int, int, int], nn.Module] | None
    paper_head: bool
    note: str
    build_kwargs: tuple[tuple[str, Any], ...] = ()


def _last_index(seq: nn.Sequential, kind: type[nn.Module]) -> int:
    return max(i for i, mod in enumerate(seq) if isinstance(mod, kind))


def _fc_stack(in_features: int, num_classes: int, width: int) -> nn.Sequential:
    """The paper's fresh classifier: (width, width, C) with dropout."""
    return nn.Sequential(
        nn.Linear(in_features, width),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(width, width),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(width, num_classes),
    )


def _linear(in_features: int, num_classes: int, _width: int) -> nn.Linear:
    return nn.Linear(in_features, num_classes)


_VGG_LIKE = ArchSpec(
    top_layer=lambda m: f"features.{_last_index(m.features, nn.ReLU)}",
    pool_layer=lambda m: f"features.{len(m.features) - 1}",
    head="classifier",
    make_head=_fc_stack,
    paper_head=True,
    note="paper: mask the top conv, new 3x3 conv, the architecture's pool, mask, fresh FC layers",
)
_RESNET = ArchSpec(
    top_layer=lambda m: "layer3",
    pool_layer=lambda m: None,
    head="fc",
    make_head=_linear,
    paper_head=False,
    note="not in the paper: a later port masks layer3's output and a new 3x3 conv before layer4",
)
_MOBILENET = ArchSpec(
    top_layer=lambda m: "features.18",
    pool_layer=lambda m: None,
    head="classifier.1",
    make_head=_linear,
    paper_head=False,
    note="not in the paper: masks the last 1x1 conv (post-ReLU6) and a new 3x3 conv before the pool",
)

_FOUND = ArchSpec(
    top_layer=None,
    pool_layer=lambda m: None,
    head=None,
    make_head=None,
    paper_head=False,
    note="not in the paper: masks the last block with a map of at least 5x5 at the image size (found by a "
         "traced forward) and a new 3x3 conv there; the model's own head is kept",
)
# Inception's auxiliary classifiers make the training forward return a tuple of logits; they only help
# training from scratch, and loading ImageNet weights drops them too when they are off.
_NO_AUX = ArchSpec(**{**_FOUND.__dict__, "build_kwargs": (("aux_logits", False),)})

# torchvision's classification CNNs by name prefix (its transformers, vit_/swin_/maxvit_, have no conv map).
_FOUND_FAMILIES = ("convnext_", "densenet", "efficientnet_", "mnasnet", "mobilenet_v3_", "regnet_", "resnext",
                   "shufflenet_v2_", "squeezenet", "wide_resnet")


def _torchvision_cnns() -> dict[str, ArchSpec]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    found = {name: _FOUND for name in names if name.startswith(_FOUND_FAMILIES)}
    return {**found, "googlenet": _NO_AUX, "inception_v3": _NO_AUX}


ARCHITECTURES: dict[str, ArchSpec] = {
    **{name: _VGG_LIKE for name in ("vgg11", "vgg13", "vgg16", "vgg19")},
    **{f"{name}_bn": _VGG_LIKE for name in ("vgg11", "vgg13", "vgg16", "vgg19")},
    "alexnet": _VGG_LIKE,
    **{f"resnet{d}": _RESNET for d in (18, 34, 50, 101, 152)},
    "mobilenet_v2": _MOBILENET,
    **_torchvision_cnns(),
}


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise ModelError(f"model.arch names a timm model but timm is not installed ({exc}); pip install timm") from None
    return timm


def _build_timm(arch: str, *, num_classes: int) -> nn.Module:
    """``timm.create_model(name, pretrained=False)``: weights come from model.checkpoint, never downloaded."""
    timm = _timm()
    name = arch[len(TIMM_PREFIX):]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ModelError(f"timm has no model {name!r} (model.arch = {arch!r}){hint}")
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def _user_builder(arch: str) -> Callable[..., nn.Module]:
    module_name, _, attr = arch.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"cannot import the model builder {arch!r} ('package.module:function'): {exc}") from exc


def check_trusted(arch: str, *, trust_code: bool, source: str) -> None:
    """Raise UntrustedCodeError, before anything is imported, for a ``"module:builder"`` read from ``source``
    that ``trust_code`` does not allow and no installed package registers.

    Importing the module runs its code, and the name comes from a file that may have been downloaded; entry
    points are read from the installed packages' metadata, which imports nothing.
    """
    if ":" not in arch or trust_code or arch.startswith(TIMM_PREFIX):
        return
    if arch in {f"{ep.module}:{ep.attr}" for ep in entry_points(group=BUILDER_ENTRY_POINTS)}:
        return
    module = arch.partition(":")[0]
    stale = ""
    if module.partition(".")[0] == "icnn_compress":  # a checkout installed before it registered its own builders
        stale = "; icnn-compress registers its own builders when installed: reinstall it (pip install -e .)"
    raise UntrustedCodeError(
        f"{source} names the model builder {arch!r}: its module {module!r} was not imported, since a model file "
        f"is not trusted to run code; pass --trust-code (trust_code=True in Python) if you trust the file, or "
        f"register the builder as an entry point in group {BUILDER_ENTRY_POINTS!r}{stale}"
    )


def build_base_model(arch: str, *, num_classes: int, weights: str | None = None) -> nn.Module:
    """Build the plain network: a registered torchvision name, ``"timm:<name>"`` or a user builder ``"pkg.module:fn"``.

    ``weights`` names a member of the architecture's torchvision weights enum, loaded through torchvision
    from the standard hub cache; the model then keeps the weights' class count and
    :func:`make_interpretable` replaces the head (``reset_head``). A timm model is built with random
    weights: its pretrained weights load from a local file (``model.checkpoint``).
    """
    if arch.startswith(TIMM_PREFIX):
        if weights is not None:
            raise ModelError(f"model.weights names a torchvision enum; a timm model ({arch}) loads its weights from a "
                             "local file: pass model.checkpoint (a timm .pth or .safetensors state dict)")
        return _build_timm(arch, num_classes=num_classes)
    if ":" in arch:
        if weights is not None:
            raise ModelError(f"model.weights names a torchvision enum; a user CNN ({arch}) loads model.checkpoint")
        model = _user_builder(arch)(num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise ModelError(f"the model builder {arch!r} returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    if arch not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"unknown architecture {arch!r}: use one of {known}, 'timm:<name>', or 'package.module:builder'")
    kwargs = dict(ARCHITECTURES[arch].build_kwargs)
    if weights is not None:
        return build_torchvision_model(arch, weights=weights, **kwargs)
    return build_torchvision_model(arch, num_classes=num_classes, **kwargs)


def model_normalization(arch: str, *, weights: str | None = None) -> dict[str, Any] | None:
    """The per-channel ``mean``/``std`` (and ``input_size``, a side in pixels) the model's weights were trained
    with: a torchvision weights enum's transforms, or a timm model's ``pretrained_cfg``; None when unknown
    (random torchvision weights, a user CNN)."""
    if arch.startswith(TIMM_PREFIX):
        cfg = _timm().get_pretrained_cfg(arch[len(TIMM_PREFIX):])
        if cfg is None:
            return None
        return {"mean": list(cfg.mean), "std": list(cfg.std), "input_size": int(cfg.input_size[-1]),
                "source": f"timm pretrained_cfg of {arch[len(TIMM_PREFIX):]}"}
    if weights is None or ":" in arch:
        return None
    member = load_torchvision_weights(arch, weights)
    preset = member.transforms()
    return {"mean": list(preset.mean), "std": list(preset.std), "input_size": int(preset.crop_size[0]),
            "source": f"torchvision {arch} {member}"}


def with_model_normalization(recipe: Recipe) -> Recipe:
    """``recipe`` with ``data.mean``/``data.std`` filled in, where unset, from :func:`model_normalization`
    (else ImageNet's): what a run trains with and saves in its ``recipe.toml``."""
    from dataclasses import replace

    from icnn_compress.config import IMAGENET_MEAN, IMAGENET_STD

    data = recipe.data
    if data.mean is not None and data.std is not None:
        return recipe
    norm = model_normalization(recipe.model.arch, weights=recipe.model.weights) or {
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "source": "ImageNet's (data.mean/std unset)"}
    if norm.get("input_size") and norm["input_size"] != data.image_size:
        log.info("%s: the weights were trained at %d px; data.image_size is %d", recipe.model.arch,
                 norm["input_size"], data.image_size)
    log.info("data.mean/std from %s: %s / %s", norm["source"], norm["mean"], norm["std"])
    data = replace(data, mean=data.mean if data.mean is not None else norm["mean"],
                   std=data.std if data.std is not None else norm["std"])
    return replace(recipe, data=data)
