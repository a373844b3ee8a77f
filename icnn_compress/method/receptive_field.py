"""Where a layer's cells look in the image: receptive-field centres back-projected through the network.

Location instability (Zhang, Wu, Zhu, CVPR 2018, https://arxiv.org/abs/1710.00935, section 4.2) places a
filter's inferred part at the centre of the receptive field of its peak cell. Rather than hand-coding
per-architecture numbers, or walking conv modules in registration order (which double counts ResNet's
downsample branches), the geometry is measured on a *linear surrogate* of the network itself:

* every ``Conv2d`` becomes a box filter (constant weight ``1/fan_in``, no bias) with the same kernel,
  stride, padding and dilation; every ``Linear`` a channel mean;
* normalisation, activation, dropout and mask modules become ``Identity``; ``MaxPool2d`` becomes the
  ``AvgPool2d`` with the same window; a global adaptive pool (squeeze-excitation gates) becomes a
  constant 1, so that gated branches stay linear;
* the surrogate runs on a constant image large enough that two central cells' receptive fields are not
  cut by the border, and the input gradient of each cell is its receptive field's weight map. The
  surrogate is linear and symmetric about each cell's centre, so the centroid of that map is exactly
  the analytic receptive-field centre, for sequential nets, residual nets and depthwise convs alike.

Coordinates are continuous pixels: the image spans ``[0, S]`` and pixel ``i`` covers ``[i, i + 1)``, so
the centre of pixel ``i`` is ``i + 0.5``. VGG-16's conv5_3 has offset 8 and stride 16, i.e. the paper's
``8.5 + 16·(idx − 1)`` in its 1-based pixel convention.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from typing import Any
from dataclasses import dataclass

import torch
from torch import nn

from icnn_compress.runtime.threads import cpu_threads

__all__ = ["LayerGeometry", "layer_geometry"]

# Largest probe side tried before giving up: beyond this the receptive field is larger than any
# image a CNN of this project sees.
_MAX_PROBE_SIDE = 4096
# Measured geometries of this process, by network structure (see _structure): the probe costs 0.2-0.9 s
# on ResNet-50 and VGG-16, and evaluation, analysis, pruning and comparison each ask for it.
_CACHE: OrderedDict[tuple, LayerGeometry] = OrderedDict()
_CACHE_SIZE = 64


@dataclass(frozen=True)
class LayerGeometry:
    """Pixel geometry of one layer's output grid.

    Attributes:
        offset: ``(y, x)`` pixel position of cell ``(0, 0)``'s receptive-field centre.
        stride: ``(y, x)`` pixels between neighbouring cells.
        size: ``(y, x)`` extent in pixels of one cell's (theoretical) receptive field, or ``None``
            when unknown.
    """

    offset: tuple[float, float]
    stride: tuple[float, float]
    size: tuple[int, int] | None = None

    def cell_centres(self, idx: torch.Tensor) -> torch.Tensor:
        """Return the ``(..., 2)`` pixel centres ``(x, y)`` of cells ``idx`` given as ``(..., 2)`` ``(row, col)``."""
        if idx.shape[-1] != 2:
            raise ValueError(f"cell indices must end in a (row, col) axis of size 2, got shape {tuple(idx.shape)}")
        dtype = idx.dtype if idx.is_floating_point() else torch.get_default_dtype()
        rc = idx.to(dtype)
        y = self.offset[0] + rc[..., 0] * self.stride[0]
        x = self.offset[1] + rc[..., 1] * self.stride[1]
        return torch.stack((x, y), dim=-1)

    def to_json(self, map_size: tuple[int, int] | None = None) -> dict[str, list | None]:
        """The geometry as plain JSON lists: ``offset``, ``stride``, ``receptive_field`` (null when unknown) and,
        when given, the ``map_size`` of the layer's output grid."""
        out: dict[str, list | None] = {"offset": list(self.offset), "stride": list(self.stride),
                                       "receptive_field": list(self.size) if self.size else None}
        if map_size is not None:
            out["map_size"] = list(map_size)
        return out

    def containing_cell(self, xy: torch.Tensor, map_size: int | tuple[int, int]) -> torch.Tensor:
        """Return the ``(..., 2)`` long ``(row, col)`` of the cell whose centre is nearest to pixels ``xy`` ``(..., 2)``.

        Points outside the grid go to the nearest border cell; non-finite points go to cell ``(0, 0)``.
        """
        h, w = _pair(map_size)
        xy = torch.nan_to_num(xy.to(torch.float64), nan=self.offset[1], posinf=0.0, neginf=0.0)
        row = ((xy[..., 1] - self.offset[0]) / self.stride[0]).round().clamp(0, h - 1)
        col = ((xy[..., 0] - self.offset[1]) / self.stride[1]).round().clamp(0, w - 1)
        return torch.stack((row, col), dim=-1).long()


def layer_geometry(model: nn.Module, layer: str, *, image_size: int, in_channels: int = 3) -> LayerGeometry:
    """Return the receptive-field geometry of the output of ``model``'s submodule ``layer``.

    The model is not modified: the probe runs on a structural clone that shares no state with it, on
    the CPU in float64, so this is cheap (box filters on one channel) even for VGG-16.

    Args:
        model: any CNN built from ``nn.Module`` s (sequential, residual, depthwise, inverted residual).
        layer: a name from ``model.named_modules()`` whose output is a 4-D ``(B, D, n, n)`` map.
        image_size: side of the (square) input images the layer will see. The geometry does not depend
            on it for ordinary padding; it sets the first probe size.
        in_channels: channels of the input image.

    Raises:
        ValueError: ``layer`` is not a module of ``model``, is not reached by the forward pass, does not
            output a 4-D tensor, or has a receptive field larger than the largest probe.

    Layers behind an adaptive pool with an output larger than 1 (whose geometry depends on the input
    size) and models that call ``F.max_pool2d`` functionally instead of through a module are outside
    what the surrogate reproduces exactly.
    """
    names = dict(model.named_modules())
    if layer not in names:
        convs = [n for n, m in names.items() if isinstance(m, nn.Conv2d)]
        hint = ", ".join(convs[-5:]) or ", ".join(list(names)[1:6])
        raise ValueError(f"model {type(model).__name__} has no module named {layer!r}; "
                         f"pass a name from model.named_modules(), e.g. {hint}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    key = (_structure(model), layer, image_size, in_channels)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    geometry = _measure(model, layer, image_size=image_size, in_channels=in_channels)
    _CACHE[key] = geometry
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return geometry


def _structure(model: nn.Module) -> tuple:
    """What the geometry can depend on: each module's name, class, settings (``extra_repr``) and plain
    attributes (flags a custom ``forward`` may read); no weights, which the surrogate replaces anyway."""
    def plain(k: str, v: object) -> bool:
        if k.startswith("_") or k == "training" or not isinstance(v, (bool, int, float, str, tuple, type(None))):
            return False
        try:
            hash(v)
        except TypeError:
            return False
        return True

    return tuple(
        (name, type(m).__module__, type(m).__qualname__, m.extra_repr(),
         tuple(sorted((k, v) for k, v in vars(m).items() if plain(k, v))))
        for name, m in model.named_modules())


def _measure(model: nn.Module, layer: str, *, image_size: int, in_channels: int) -> LayerGeometry:
    # The probe needs autograd, also when called from inside evaluate()'s inference_mode.
    # One thread: the probe is many tiny float64 ops (icnn_compress.runtime.threads).
    with torch.inference_mode(False), torch.enable_grad(), cpu_threads(1):
        surrogate = _linear_surrogate(model)
        target = surrogate.get_submodule(layer)
        side = image_size
        while True:
            found = _probe(surrogate, target, layer, side=side, in_channels=in_channels)
            if found is not None:
                return found
            side *= 2
            if side > _MAX_PROBE_SIDE:
                raise ValueError(f"the receptive field of {layer!r} does not fit a {_MAX_PROBE_SIDE} px "
                                 "probe; is the layer behind a global pool?")


class _StopForward(Exception):
    """Raised by the probe's hook to stop the forward pass at the measured layer."""

    def __init__(self, output: object) -> None:
        super().__init__()
        self.output = output


def _probe(surrogate: nn.Module, target: nn.Module, layer: str, *, side: int,
           in_channels: int) -> LayerGeometry | None:
    """Measure the geometry on a ``side``-pixel probe, or return ``None`` when the probe is too small."""

    def stop(_module: nn.Module, _inputs: object, output: object) -> None:
        raise _StopForward(output)

    handle = target.register_forward_hook(stop)
    # A positive input keeps any functional ReLU the forward calls in its linear (identity) part.
    x = torch.ones(1, in_channels, side, side, dtype=torch.float64, requires_grad=True)
    try:
        surrogate(x)
    except _StopForward as stopped:
        out = stopped.output
    else:
        raise ValueError(f"layer {layer!r} is never called by the model's forward pass; "
                         "pass a module that the forward uses")
    finally:
        handle.remove()
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"layer {layer!r} outputs {shape}, not a 4-D (B, D, n, n) map; "
                         "pick a convolutional layer")
    h, w = out.shape[-2:]
    if h < 2 or w < 2:
        return None
    r, c = (h - 1) // 2, (w - 1) // 2
    cells = ((r, c), (r + 1, c + 1))
    maps = []
    for i, (ri, ci) in enumerate(cells):
        (grad,) = torch.autograd.grad(out[0, :, ri, ci].sum(), x, retain_graph=i == 0)
        maps.append(grad[0].sum(0))  # (S, S): the cell's receptive-field weights

    centres, extent = [], None
    for g in maps:
        support = g.abs() > g.abs().max() * 1e-12
        if not bool(support.any()):
            raise ValueError(f"layer {layer!r} does not depend on the input image")
        # A receptive field cut by the border would bias the centroid: probe larger.
        if bool(support[0].any() or support[-1].any() or support[:, 0].any() or support[:, -1].any()):
            return None
        centre_px = torch.arange(side, dtype=torch.float64) + 0.5
        total = g.sum()
        cy = float((g.sum(1) * centre_px).sum() / total)
        cx = float((g.sum(0) * centre_px).sum() / total)
        centres.append((cy, cx))
        rows = support.any(1).nonzero()
        cols = support.any(0).nonzero()
        extent = (int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1)
    (y0, x0), (y1, x1) = centres
    stride = (y1 - y0, x1 - x0)
    offset = (y0 - r * stride[0], x0 - c * stride[1])
    return LayerGeometry(offset=_clean(offset), stride=_clean(stride), size=extent)


def _clean(v: tuple[float, float]) -> tuple[float, float]:
    # Strip float64 accumulation noise: real geometry is a multiple of a small power of two.
    return (round(v[0], 9) + 0.0, round(v[1], 9) + 0.0)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# ------------------------------------------------------------------------------------------------
# The linear surrogate


class _BoxConv2d(nn.Module):
    """A conv with constant weight ``1/fan_in``, computed on one channel (all channels are equal)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.out_channels = conv.out_channels
        # conv's geometry is (int, int) tuples for a Conv2d; its annotations say tuple[int, ...]
        geometry: dict[str, Any] = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        self.box = nn.Conv2d(1, 1, conv.kernel_size, **geometry, bias=False,  # type: ignore[arg-type]
                             padding_mode=conv.padding_mode, dtype=torch.float64)
        kh, kw = self.box.kernel_size
        self.box.weight.requires_grad_(False).fill_(1.0 / (kh * kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every channel of the probe carries the same map (the input is constant across channels and
        # every surrogate op treats channels alike), so the constant-weight conv is a box filter of
        # the channel mean, copied to all output channels. Contiguous: the model may add in place.
        y = self.box(_ChannelMean.apply(x))  # (1, 1, h, w)
        return y.expand(-1, self.out_channels, -1, -1).contiguous()


class _ChannelMean(torch.autograd.Function):
    """The channel mean of a map whose channels are all equal: channel 0, with a broadcast backward.

    Same values and gradient as ``x.mean(1, keepdim=True)`` on such maps, without reading every channel
    forward or writing a full-size gradient backward (the probe's dominant cost on wide layers).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.channels = x.shape[1]
        return x[:, :1].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return (grad / ctx.channels).expand(-1, ctx.channels, -1, -1)


class _MeanLinear(nn.Module):
    """A linear layer with constant weight ``1/in_features`` (channel mixing in channels-last blocks)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=-1, keepdim=True).expand(*x.shape[:-1], self.out_features).contiguous()


class _GlobalOne(nn.Module):
    """Replaces a global pool by a constant 1, so a squeeze-excitation gate ``x * s(x)`` stays linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(*x.shape[:-2], 1, 1, dtype=x.dtype, device=x.device)


# Leaf modules replaced by Identity by class name, for classes outside torch.nn (torchvision's
# FrozenBatchNorm2d, timm's LayerNorm2d, this project's InterpretableMask). Only leaves: a container
# such as torchvision's Conv2dNormActivation holds the conv and must be looked into.
_IDENTITY_NAME = re.compile(r"(Norm(\dd)?|Mask|Dropout(\dd)?|DropPath|StochasticDepth)$", re.IGNORECASE)
# Channel gates (squeeze-excitation and kin) whose global pool is functional (timm's ``x.mean((2, 3))``), so no
# pool module is there to replace: the gate ``x * s(x)`` is the identity once s is the constant 1 (_GlobalOne).
_GATE_NAME = re.compile(r"^(SqueezeExcit(e|ation)\w*|SEModule|EffectiveSEModule|EcaModule|CecaModule)$")
_IDENTITY_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
                   nn.CrossMapLRN2d, nn.modules.dropout._DropoutNd)


def _surrogate_of(m: nn.Module) -> nn.Module | None:
    """The surrogate replacing module ``m``, or ``None`` to keep it (and look inside it)."""
    if isinstance(m, nn.Conv2d):
        return _BoxConv2d(m)
    if isinstance(m, nn.Linear):
        return _MeanLinear(m.out_features)
    if isinstance(m, (nn.MaxPool2d, nn.LPPool2d)):
        dilation = getattr(m, "dilation", 1)
        if _pair(dilation) != (1, 1):
            raise ValueError(f"dilated pooling ({m}) is not supported by the receptive-field probe")
        return nn.AvgPool2d(m.kernel_size, stride=m.stride, padding=getattr(m, "padding", 0),
                            ceil_mode=m.ceil_mode, count_include_pad=True)
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        if m.output_size in (1, (1, 1)):
            return _GlobalOne()
        return nn.AdaptiveAvgPool2d(m.output_size)
    if type(m).__module__ == "torch.nn.modules.activation" and not isinstance(m, nn.MultiheadAttention):
        return nn.Identity()
    if isinstance(m, _IDENTITY_TYPES):
        return nn.Identity()
    if not m._modules and _IDENTITY_NAME.search(type(m).__name__):
        return nn.Identity()
    if _GATE_NAME.match(type(m).__name__):
        return nn.Identity()
    return None


def _linear_surrogate(model: nn.Module) -> nn.Module:
    """A structural clone of ``model`` made linear; it shares no mutable state with ``model``."""

    memo: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        replacement = _surrogate_of(m)
        if replacement is not None:
            memo[id(m)] = replacement
            return replacement
        # Shallow copy, then fresh containers: no tensor is copied (VGG-16's 550 MB of weights stay
        # where they are) and nothing the probe does reaches the original module.
        new = copy.copy(m)
        new.__dict__["_modules"] = OrderedDict((k, None if c is None else clone(c)) for k, c in m._modules.items())
        new.__dict__["_parameters"] = {
            k: None if p is None else nn.Parameter(p.detach().to("cpu", _float64_if_float(p)), requires_grad=False)
            for k, p in m._parameters.items()}
        new.__dict__["_buffers"] = {
            k: None if b is None else b.detach().to("cpu", _float64_if_float(b)) for k, b in m._buffers.items()}
        # Drop the caller's hooks (evaluate()'s own collectors among them) from the clone.
        for key, value in list(new.__dict__.items()):
            if "hooks" in key and isinstance(value, dict):
                new.__dict__[key] = type(value)()
        new.training = False
        memo[id(m)] = new
        return new

    return clone(model)


def _float64_if_float(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.is_floating_point() else t.dtype
