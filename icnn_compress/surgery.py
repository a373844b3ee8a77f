"""Model surgery: where each architecture's masks and new conv go (METHOD.md section 5), and the registry.

A model is made interpretable in place: the module named ``top_layer`` (the top conv block, post-ReLU)
is replaced by ``Sequential(inner, mask, conv, relu[, new_mask])`` and, when the layout has a pool
between them, the module named ``pool_layer`` by ``Sequential(inner, mask)``. The rest of the network
is untouched, so any CNN whose top block is named works. The ``baseline`` variant builds the identical
modules with inactive masks, so every comparison is like for like.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

import torch
from torch import nn

from .checkpoint import build_torchvision_model
from .errors import ModelError, UntrustedCodeError
from .mask import InterpretableMask

__all__ = [
    "ARCHITECTURES",
    "BUILDER_ENTRY_POINTS",
    "PLAIN",
    "VARIANTS",
    "ArchSpec",
    "build_base_model",
    "build_model",
    "interpretable_layers",
    "make_interpretable",
]

VARIANTS = ("icnn", "baseline")
# the architecture record of a model no icnn run made (icnn_compress.plain_model): the network as built, no masks
PLAIN = "plain"

# Installed packages list their model builders here; a model file may name those without --trust-code.
BUILDER_ENTRY_POINTS = "icnn_compress.models"


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture family takes its masks.

    Args:
        top_layer: the top conv block's module name (its output is post-ReLU), given the built model.
        pool_layer: module after which the second mask goes, or None for right after the new conv.
        head: name of the classifier module to replace, and how to build a new one from
            (in_features, num_classes, head_width).
        paper_head: the paper's layout always uses a freshly initialised classifier (VGG, AlexNet).
        note: where this layout comes from.
    """

    top_layer: Callable[[nn.Module], str]
    pool_layer: Callable[[nn.Module], str | None]
    head: str
    make_head: Callable[[int, int, int], nn.Module]
    paper_head: bool
    note: str


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

ARCHITECTURES: dict[str, ArchSpec] = {
    **{name: _VGG_LIKE for name in ("vgg11", "vgg13", "vgg16", "vgg19")},
    **{f"{name}_bn": _VGG_LIKE for name in ("vgg11", "vgg13", "vgg16", "vgg19")},
    "alexnet": _VGG_LIKE,
    **{f"resnet{d}": _RESNET for d in (18, 34, 50, 101, 152)},
    "mobilenet_v2": _MOBILENET,
}


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
    if ":" not in arch or trust_code:
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
    """Build the plain network: a registered torchvision name or a user builder ``"pkg.module:fn"``.

    ``weights`` names a member of the architecture's torchvision weights enum, loaded through torchvision
    from the standard hub cache; the model then keeps the weights' class count and
    :func:`make_interpretable` replaces the head (``reset_head``).
    """
    if ":" in arch:
        if weights is not None:
            raise ModelError(f"model.weights names a torchvision enum; a user CNN ({arch}) loads model.checkpoint")
        model = _user_builder(arch)(num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise ModelError(f"the model builder {arch!r} returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    if arch not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"unknown architecture {arch!r}: use one of {known}, or 'package.module:builder'")
    if weights is not None:
        return build_torchvision_model(arch, weights=weights)
    return build_torchvision_model(arch, num_classes=num_classes)


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise ModelError(f"the model has no module {name!r}; some of its modules: {names}") from exc


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _output_channels(model: nn.Module, layer: str, image_size: int) -> int:
    """Channels of ``layer``'s output, by a probe forward on one blank image."""
    seen: list[int] = []

    class _Stop(Exception):
        pass

    def hook(_mod, _inp, out):
        seen.append(out.shape[1])
        raise _Stop

    handle = _get(model, layer).register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    except _Stop:
        pass
    except RuntimeError as exc:  # e.g. a pool's output of 0x0: the images are too small for the network
        raise ModelError(f"the model cannot run on {image_size}x{image_size} images up to {layer} ({exc}); "
                         "raise data.image_size") from None
    finally:
        handle.remove()
        model.train(was_training)
    return seen[0]


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
) -> dict:
    """Insert the masks (and the paper's new conv) into ``model`` in place; return the resolved layout.

    The layout (``top_layer``, ``pool_layer``, ``new_filters``, ``masks``: mask names, top first) is what
    a run saves so that :func:`build_model` rebuilds the same modules.

    Args:
        arch: a registered name (its :class:`ArchSpec` gives the layout) or a user builder string, in which
            case ``top_layer`` is required and the head is kept.
        num_classes: categories of the task; the head is replaced when it differs (needs ``reset_head``)
            or when the registered layout uses a fresh classifier (VGG, AlexNet: the paper's).
        image_size: input side used for a one-image probe of the top block's channels.
        variant: ``"icnn"`` or ``"baseline"`` (identical modules, masks inactive).
        top_layer, pool_layer: override the registered layout.
        new_conv: add a new 3x3 conv (N(0, 0.01²) init) with ``new_filters`` filters (default: as many as
            the top block's channels, the paper's M = C) and a second mask.
    """
    if variant not in VARIANTS:
        raise ModelError(f"variant must be one of {VARIANTS}, got {variant!r}")
    spec = ARCHITECTURES.get(arch)
    if spec is None and top_layer is None:
        raise ModelError(f"{arch!r} is not a registered architecture: name its top conv block (model.top_layer)")
    top = top_layer or spec.top_layer(model)
    pool = pool_layer if (pool_layer or spec is None) else spec.pool_layer(model)
    channels = _output_channels(model, top, image_size)
    filters = new_filters or channels
    if filters != channels and spec is None:
        raise ModelError("new_filters must equal the top block's channels for a user CNN (its head is kept)")
    active = variant == "icnn"

    def mask(n: int) -> InterpretableMask:
        return InterpretableMask(n, num_classes=num_classes, peak=peak, beta=beta, active=active)

    parts: OrderedDict[str, nn.Module] = OrderedDict(inner=_get(model, top), mask=mask(channels))
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
    _set(model, top, nn.Sequential(parts))
    if spec is not None:
        _replace_head(model, spec, num_classes, channels, filters, head_width, reset_head)
    return {"top_layer": top, "pool_layer": pool, "new_filters": filters if new_conv else None, "masks": names}


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
    )
    return model
