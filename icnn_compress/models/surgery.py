"""Model surgery: where each architecture's masks and new conv go (METHOD.md section 5), and the registry.

A model is made interpretable in place: the module named ``top_layer`` (the top conv block) is replaced by
``Sequential(inner, mask, conv, relu[, new_mask])`` and, when the layout has a pool between them, the
module named ``pool_layer`` by ``Sequential(inner, mask)``. The rest of the network is untouched, so any
CNN works: when no layout names its top block, :func:`find_top_layer` finds it by a traced forward (the
last module whose output is a spatial map of at least 5x5 at the recipe's image size). A top block whose
output is not post-ReLU (GELU, SiLU, Hardswish, a BatchNorm output) is masked as its rectified map. The
``baseline`` variant builds the identical modules with inactive masks, so every comparison is like for like.

Which architectures are known, and how each is built: :mod:`icnn_compress.models.registry`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from icnn_compress.errors import ModelError
from icnn_compress.method.mask import InterpretableMask
from icnn_compress.models.registry import (
    ARCHITECTURES,
    PLAIN,
    TIMM_PREFIX,
    VARIANTS,
    ArchSpec,
    build_base_model,
    check_trusted,
)
from icnn_compress.runtime.device import eval_mode

__all__ = [
    "MIN_TOP_CELLS", "build_model", "classifier_name", "find_top_layer", "interpretable_layers", "make_interpretable",
]

log = logging.getLogger(__name__)

# The found top block's map is at least this many cells a side: the templates need room (METHOD.md §8: a
# 4x4 mask is already degenerate).
MIN_TOP_CELLS = 5


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
    try:
        with eval_mode(model), torch.no_grad():
            model(_probe_image(image_size))
    except RuntimeError as exc:  # e.g. a pool's output of 0x0: the images are too small for the network
        if not seen:
            raise ModelError(f"the model cannot run on {image_size}x{image_size} images up to {layer} ({exc}); "
                             "raise data.image_size") from None
        raise ModelError(f"the model cannot run on {image_size}x{image_size} images ({exc}); raise "
                         "data.image_size") from None
    finally:
        handle.remove()
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
    try:
        with eval_mode(model), torch.no_grad():
            model(_probe_image(image_size))
    except RuntimeError as exc:
        raise ModelError(f"the model cannot run on {image_size}x{image_size} images ({exc}); raise "
                         "data.image_size") from None
    finally:
        for h in handles:
            h.remove()
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
        head = classifier_name(model)
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


def classifier_name(model: nn.Module) -> str:
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
    check_trusted(a["arch"], trust_code=trust_code, source=source)
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
