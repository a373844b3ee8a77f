"""Model surgery: where each architecture's masks and new conv go (METHOD.md section 5), and the registry.

A model is made interpretable in place: the module named ``top_layer`` (the top conv block) is replaced by
``Sequential(inner, mask, conv, relu[, new_mask])`` and, when the layout has a pool between them, the
module named ``pool_layer`` by ``Sequential(inner, mask)``. The rest of the network is untouched, so any
CNN works: when no layout names its top block, :func:`find_top_layer` finds it by a traced forward (the
last module whose output is a spatial map of at least 5x5 at the recipe's image size). A top block whose
output is not post-ReLU (GELU, SiLU, Hardswish, a BatchNorm output) is masked as its rectified map. The
``baseline`` variant builds the identical modules with inactive masks, so every comparison is like for like.

Architecture names: a registered torchvision name (:data:`ARCHITECTURES`), ``"timm:<name>"`` for a model
of timm's registry, or ``"package.module:builder"`` for a user CNN.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import build_torchvision_model, load_torchvision_weights
from .config import Recipe
from .errors import ModelError, UntrustedCodeError
from .mask import InterpretableMask

__all__ = [
    "ARCHITECTURES",
    "BUILDER_ENTRY_POINTS",
    "PLAIN",
    "MIN_TOP_CELLS",
    "TIMM_PREFIX",
    "VARIANTS",
    "ArchSpec",
    "build_base_model",
    "build_model",
    "find_top_layer",
    "interpretable_layers",
    "make_interpretable",
    "model_normalization",
    "with_model_normalization",
]

log = logging.getLogger(__name__)

VARIANTS = ("icnn", "baseline")
# the architecture record of a model no icnn run made (icnn_compress.plain_model): the network as built, no masks
PLAIN = "plain"

# Installed packages list their model builders here; a model file may name those without --trust-code.
BUILDER_ENTRY_POINTS = "icnn_compress.models"
# "timm:<name>" names a model of timm's registry (timm.create_model); no code of the file's choosing is imported.
TIMM_PREFIX = "timm:"
# The found top block's map is at least this many cells a side: the templates need room (METHOD.md §8: a
# 4x4 mask is already degenerate).
MIN_TOP_CELLS = 5


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


def _check_trusted(arch: str, *, trust_code: bool, source: str) -> None:
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

    from .config import IMAGENET_MEAN, IMAGENET_STD

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


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise ModelError(f"the model has no module {name!r}; some of its modules: {names}") from exc


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class _Stop(Exception):
    """Ends a probe forward once the probed layer has run."""


def _probe_image(image_size: int) -> Tensor:
    # A seeded random image rather than a blank one: a BatchNorm or GELU output shows its negative values.
    return torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def _probe(model: nn.Module, layer: str, image_size: int) -> tuple[Tensor, bool]:
    """``layer``'s output on one probe image (eval mode), and whether the rest of the forward modifies it in
    place (an in-place activation after a BatchNorm or conv that is the top block)."""
    seen: list[tuple[Any, Any, int]] = []

    def hook(_mod, _inp, out):
        if not seen:  # a copy of the values: an in-place op later on would change them
            tensor = isinstance(out, Tensor)
            seen.append((out.clone() if tensor else out, out, out._version if tensor else 0))

    handle = _get(model, layer).register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(_probe_image(image_size))
    except RuntimeError as exc:  # e.g. a pool's output of 0x0: the images are too small for the network
        if not seen:
            raise ModelError(f"the model cannot run on {image_size}x{image_size} images up to {layer} ({exc}); "
                             "raise data.image_size") from None
        raise ModelError(f"the model cannot run on {image_size}x{image_size} images ({exc}); raise "
                         "data.image_size") from None
    finally:
        handle.remove()
        model.train(was_training)
    out, original, version = seen[0] if seen else (None, None, 0)
    if not isinstance(out, Tensor) or out.dim() != 4:
        raise ModelError(f"{layer}'s output is not a (B, C, h, w) feature map "
                         f"({type(out).__name__}{'' if not isinstance(out, Tensor) else tuple(out.shape)}); "
                         "name a conv block in model.top_layer")
    return out, original._version != version


class _Copy(nn.Module):
    """Returns a copy of its input: the masked output, which the mask's ReLU keeps for its backward, is then
    free for an in-place op after the top block (``out = bn(conv(x)); relu_(out)`` with the BatchNorm masked)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.clone()


def find_top_layer(model: nn.Module, *, image_size: int) -> str:
    """Return the name of the model's top conv block: the last module whose output is a map of at least
    :data:`MIN_TOP_CELLS` cells a side on ``image_size`` images, found by a traced forward (hooks).

    A module called more than once per forward (a shared activation) is never chosen, since wrapping it would
    mask every call; nor one that returns its input unchanged in eval mode (Dropout, Identity); nor anything from
    the classifier on (the last parameterised layer to run and what
    runs after it start), so a convolutional head (SqueezeNet's) is not mistaken for the top block.
    """
    names = {mod: name for name, mod in model.named_modules() if name}
    calls: dict[str, int] = {}
    order: list[tuple[str, str, Any]] = []  # (event, name, output shape) in execution order

    def pre(mod, _inp):
        order.append(("start", names[mod], None))

    def post(mod, inp, out):
        name = names[mod]
        calls[name] = calls.get(name, 0) + 1
        # a module that returns its input in eval mode (Dropout, Identity) adds nothing to mask
        passthrough = bool(inp) and out is inp[0]
        order.append(("end", name, tuple(out.shape) if isinstance(out, Tensor) and not passthrough else None))

    handles = [h for mod in names for h in (mod.register_forward_pre_hook(pre), mod.register_forward_hook(post))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(_probe_image(image_size))
    except RuntimeError as exc:
        raise ModelError(f"the model cannot run on {image_size}x{image_size} images ({exc}); raise "
                         "data.image_size") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    # the classifier: the last layer with weights of its own to start running
    weighted = {name for mod, name in names.items() if next(mod.parameters(recurse=False), None) is not None}
    head_start = max((i for i, (event, name, _) in enumerate(order) if event == "start" and name in weighted),
                     default=len(order))
    best, shape = None, None
    for event, name, out in order[:head_start]:
        if (event == "end" and calls[name] == 1 and out is not None and len(out) == 4
                and min(out[2:]) >= MIN_TOP_CELLS):
            best, shape = name, out
    if best is None:
        raise ModelError(f"no module of the model outputs a map of at least {MIN_TOP_CELLS}x{MIN_TOP_CELLS} on "
                         f"{image_size}x{image_size} images: raise data.image_size, or name the top conv block "
                         "in model.top_layer")
    log.info("model.top_layer not set: masking %s (its output is %dx%dx%d on %d px images, the last map of at "
             "least %dx%d); set model.top_layer to choose another block", best, shape[1], shape[2], shape[3],
             image_size, MIN_TOP_CELLS, MIN_TOP_CELLS)
    return best


def make_interpretable(
    model: nn.Module,
    *,
    arch: str,
    num_classes: int,
    image_size: int,
    variant: str = "icnn",
    top_layer: str | None = None,
    pool_layer: str | None = None,
    new_conv: bool = True,
    new_filters: int | None = None,
    head_width: int = 4096,
    peak: str = "centroid",
    beta: str | float = "learned",
    reset_head: bool = False,
    rectify: bool | None = None,
) -> dict:
    """Insert the masks (and the paper's new conv) into ``model`` in place; return the resolved layout.

    The layout (``top_layer``, ``pool_layer``, ``new_filters``, ``masks``: mask names, top first,
    ``rectify``) is what a run saves so that :func:`build_model` rebuilds the same modules.

    Args:
        arch: a registered name (its :class:`ArchSpec` gives the layout), ``"timm:<name>"`` or a user
            builder string; for the last two, and registered families without a fixed layout, the top
            block is found by :func:`find_top_layer` unless ``top_layer`` names it. A user CNN keeps its head.
        num_classes: categories of the task; the head is replaced when it differs (needs ``reset_head``)
            or when the registered layout uses a fresh classifier (VGG, AlexNet: the paper's).
        image_size: input side used for a one-image probe of the top block's channels (and to find it).
        variant: ``"icnn"`` or ``"baseline"`` (identical modules, masks inactive).
        top_layer, pool_layer: override the registered (or found) layout.
        new_conv: add a new 3x3 conv (N(0, 0.01²) init) with ``new_filters`` filters (default: as many as
            the top block's channels, the paper's M = C) and a second mask.
        rectify: mask the top block's rectified map (for an output that is not post-ReLU); None decides from
            the probe: rectify when the top block's output has negative values.
    """
    if variant not in VARIANTS:
        raise ModelError(f"variant must be one of {VARIANTS}, got {variant!r}")
    spec = ARCHITECTURES.get(arch)
    if spec is None or spec.head is None:  # timm, user CNNs and the found families keep their own head
        head = _classifier(model)
    if top_layer:
        top = top_layer
    elif spec is not None and spec.top_layer is not None:
        top = spec.top_layer(model)
    else:
        top = find_top_layer(model, image_size=image_size)
    pool = pool_layer if (pool_layer or spec is None) else spec.pool_layer(model)
    probe, modified_after = _probe(model, top, image_size)
    channels = probe.shape[1]
    if rectify is None:
        rectify = bool(probe.min() < 0)
    filters = new_filters or channels
    if filters != channels and (spec is None or spec.head is None):
        raise ModelError(f"new_filters must equal the top block's channels ({channels}) for {arch} (its head is kept)")
    active = variant == "icnn"

    def mask(n: int, rectified: bool = False) -> InterpretableMask:
        return InterpretableMask(n, num_classes=num_classes, peak=peak, beta=beta, active=active, rectify=rectified)

    parts: OrderedDict[str, nn.Module] = OrderedDict(inner=_get(model, top), mask=mask(channels, rectify))
    names = [f"{top}.mask"]
    if new_conv:
        conv = nn.Conv2d(channels, filters, 3, padding=1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        parts.update(conv=conv, relu=nn.ReLU())
        if pool is None:
            parts["new_mask"] = mask(filters)
            names.append(f"{top}.new_mask")
        else:
            _set(model, pool, nn.Sequential(OrderedDict(inner=_get(model, pool), mask=mask(filters))))
            names.append(f"{pool}.mask")
    if modified_after:
        parts["copy"] = _Copy()
    _set(model, top, nn.Sequential(parts))
    if spec is not None and spec.head is not None:
        _replace_head(model, spec, num_classes, channels, filters, head_width, reset_head)
    elif spec is not None or arch.startswith(TIMM_PREFIX):
        _replace_classifier(model, head, num_classes, reset_head)
    layout = {"top_layer": top, "pool_layer": pool, "new_filters": filters if new_conv else None, "masks": names}
    if rectify:  # only written when set, so the records of post-ReLU layouts stay as they were
        layout["rectify"] = True
    return layout


def _classifier(model: nn.Module) -> str:
    """The name of the layer that produces the logits: the last Linear registered, else the last conv."""
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    layers = layers or [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not layers:
        raise ModelError("the model has no Linear or conv layer that could be its classifier")
    return layers[-1]


def _replace_classifier(model: nn.Module, name: str, num_classes: int, reset: bool) -> None:
    """Give the classifier ``name`` ``num_classes`` outputs (a fresh layer of the same kind) when it differs."""
    old = _get(model, name)
    out = old.out_features if isinstance(old, nn.Linear) else old.out_channels
    if out == num_classes:
        return
    if not reset:
        raise ModelError(f"the model's head has {out} classes but the task has {num_classes}; "
                         "pass --set model.reset_head=true")
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = type(old)(old.in_channels, num_classes, old.kernel_size, stride=old.stride, padding=old.padding,
                        bias=old.bias is not None)
    _set(model, name, new.to(old.weight.device))


def _replace_head(
    model: nn.Module, spec: ArchSpec, num_classes: int, channels: int, filters: int, width: int, reset: bool
) -> None:
    old = _get(model, spec.head)
    first = old if isinstance(old, nn.Linear) else next(m for m in old.modules() if isinstance(m, nn.Linear))
    last = old if isinstance(old, nn.Linear) else [m for m in old.modules() if isinstance(m, nn.Linear)][-1]
    if last.out_features != num_classes and not (reset or spec.paper_head):
        raise ModelError(
            f"the model's head has {last.out_features} classes but the task has {num_classes}; "
            "pass --set model.reset_head=true"
        )
    if spec.paper_head or last.out_features != num_classes or filters != channels:
        in_features = first.in_features * filters // channels
        _set(model, spec.head, spec.make_head(in_features, num_classes, width))


def interpretable_layers(model: nn.Module) -> list[str]:
    """Names of the model's mask modules in registration order (the top conv's first)."""
    return [name for name, mod in model.named_modules() if isinstance(mod, InterpretableMask)]


def build_model(architecture: dict, *, trust_code: bool = False, source: str = "the architecture record") -> nn.Module:
    """Rebuild a model (random weights) from the ``architecture`` record a run saved.

    Args:
        architecture: the record of a model file, which may come from anywhere (a downloaded run).
        trust_code: import a ``"module:builder"`` arch that no installed package registers as an entry point in
            group :data:`BUILDER_ENTRY_POINTS`; without it such a record raises
            :class:`~icnn_compress.errors.UntrustedCodeError` and nothing is imported. Torchvision names always build.
        source: where the record was read, for that error's message.
    """
    a = architecture
    _check_trusted(a["arch"], trust_code=trust_code, source=source)
    model = build_base_model(a["arch"], num_classes=a["num_classes"])
    if a["variant"] == PLAIN:
        return model
    make_interpretable(
        model,
        arch=a["arch"],
        num_classes=a["num_classes"],
        image_size=a["image_size"],
        variant=a["variant"],
        top_layer=a.get("top_layer"),
        pool_layer=a.get("pool_layer"),
        new_conv=a["new_conv"],
        new_filters=a.get("new_filters"),
        head_width=a["head_width"],
        peak=a["peak"],
        beta=a["beta"],
        reset_head=True,
        rectify=a.get("rectify", False),
    )
    return model
