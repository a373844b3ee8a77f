"""Receptive-field geometry: exact analytic centres for hand-built nets and torchvision backbones."""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from icnn_compress.method import receptive_field
from icnn_compress.method.receptive_field import LayerGeometry, layer_geometry


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Every test here measures: none may pass on a geometry an earlier test left in the cache."""
    receptive_field._CACHE.clear()
    yield
    receptive_field._CACHE.clear()


def _close(got: tuple[float, float], want: tuple[float, float]) -> bool:
    return all(abs(g - w) < 1e-4 for g, w in zip(got, want))


@pytest.fixture(scope="module")
def vgg16() -> nn.Module:
    return torchvision.models.vgg16(weights=None)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None)


def test_vgg16_conv5_3_matches_paper(vgg16: nn.Module) -> None:
    # Paper: p = 8.5 + 16·(idx − 1) in 1-based pixels, i.e. 8 + 16·idx in continuous coordinates.
    g = layer_geometry(vgg16, "features.29", image_size=224)
    assert _close(g.offset, (8.0, 8.0)) and _close(g.stride, (16.0, 16.0))
    assert g.size == (196, 196)
    centres = g.cell_centres(torch.tensor([[0, 0], [13, 2]]))
    torch.testing.assert_close(centres, torch.tensor([[8.0, 8.0], [40.0, 216.0]]))



def test_hand_built_sequential() -> None:
    # conv3 p1: centre of cell i = i + 0.5; maxpool 2: 2i + 1; conv3 s2 p0 over the pooled grid covers
    # pooled cells 2j..2j+2, centred on 2j + 1, i.e. pixel 2(2j + 1) + 1 = 4j + 3. RF: 3 → 4 → 4 + 2·2.
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
    )
    g = layer_geometry(model, "5", image_size=32)
    assert _close(g.offset, (3.0, 3.0)) and _close(g.stride, (4.0, 4.0))
    assert g.size == (8, 8)
    g1 = layer_geometry(model, "2", image_size=32)
    assert _close(g1.offset, (1.0, 1.0)) and _close(g1.stride, (2.0, 2.0))


def test_rectangular_kernel_keeps_y_x_order() -> None:
    # y: kernel 3 pad 1 -> i + 0.5; x: kernel 5 pad 0 stride 2 -> 2j + 2.5.
    model = nn.Sequential(nn.Conv2d(3, 2, (3, 5), stride=(1, 2), padding=(1, 0)))
    g = layer_geometry(model, "0", image_size=16)
    assert _close(g.offset, (0.5, 2.5)) and _close(g.stride, (1.0, 2.0))
    assert g.size == (3, 5)
    torch.testing.assert_close(g.cell_centres(torch.tensor([2, 3])), torch.tensor([8.5, 2.5]))


def test_resnet18_layers(resnet18: nn.Module) -> None:
    # conv1 7×7 s2 p3: cell i centred on pixel 2i, i.e. 2i + 0.5; maxpool 3×3 s2 p1 and every stride-2
    # 3×3 p1 conv (and its 1×1 s2 downsample) centre cell k on the previous cell 2k: offset stays 0.5.
    g3 = layer_geometry(resnet18, "layer3", image_size=224)
    g4 = layer_geometry(resnet18, "layer4", image_size=224)
    assert _close(g3.offset, (0.5, 0.5)) and _close(g3.stride, (16.0, 16.0))
    assert _close(g4.offset, (0.5, 0.5)) and _close(g4.stride, (32.0, 32.0))
    assert g3.size == (211, 211) and g4.size == (435, 435)


def test_mobilenet_v2_last_layer() -> None:
    model = torchvision.models.mobilenet_v2(weights=None)
    g = layer_geometry(model, "features.18", image_size=224)
    assert _close(g.offset, (0.5, 0.5)) and _close(g.stride, (32.0, 32.0))


def test_alexnet_conv5() -> None:
    # conv1 11×11 s4 p2: 4i + 3.5; two 3×3 s2 maxpools around 5×5 p2 / 3×3 p1 convs: 16k + 15.5.
    g = layer_geometry(torchvision.models.alexnet(weights=None), "features.11", image_size=224)
    assert _close(g.offset, (15.5, 15.5)) and _close(g.stride, (16.0, 16.0))


class _PeakMask(nn.Module):
    """A nonlinear, mask-like module: keeps only each map's maximum (the surrogate must drop it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        return (flat == flat.amax(-1, keepdim=True)).to(x.dtype).view_as(x) * x


def test_mask_modules_are_transparent() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), _PeakMask(), nn.MaxPool2d(2))
    g = layer_geometry(model, "3", image_size=16)
    assert _close(g.offset, (1.0, 1.0)) and _close(g.stride, (2.0, 2.0))


def test_model_is_left_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    handle = model[0].register_forward_hook(lambda *_: calls.append(1))
    layer_geometry(model, "3", image_size=16)
    assert calls == []  # the probe runs on a clone without the caller's hooks
    assert model.training and model[1].training
    assert isinstance(model[3], nn.MaxPool2d) and isinstance(model[2], nn.ReLU)
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype
        torch.testing.assert_close(v, before[k])
    model(torch.rand(1, 3, 8, 8))
    assert calls == [1]
    handle.remove()


def test_unknown_layer_lists_names() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"no module named 'conv9'.*0"):
        layer_geometry(model, "conv9", image_size=16)


def test_non_spatial_layer_is_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="4-D"):
        layer_geometry(model, "3", image_size=16)


def test_runs_inside_inference_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2))
    with torch.inference_mode():
        g = layer_geometry(model, "1", image_size=16)
    assert _close(g.offset, (1.0, 1.0))


@settings(max_examples=50, deadline=None)
@given(
    offset=st.tuples(st.floats(-8, 8), st.floats(-8, 8)),
    stride=st.tuples(st.sampled_from([1.0, 2.0, 4.0, 16.0]), st.sampled_from([1.0, 4.0, 32.0])),
    row=st.integers(0, 9),
    col=st.integers(0, 9),
)
def test_containing_cell_inverts_cell_centres(offset, stride, row, col) -> None:
    g = LayerGeometry(offset=offset, stride=stride)
    xy = g.cell_centres(torch.tensor([[row, col]], dtype=torch.float64))
    # Anything within less than half a stride of a centre belongs to that cell.
    jitter = torch.tensor([[0.49 * stride[1], -0.49 * stride[0]]], dtype=torch.float64)
    assert g.containing_cell(xy + jitter, 10).tolist() == [[row, col]]
    assert g.containing_cell(xy + 100 * stride[0] + 100 * stride[1], 10).tolist() == [[9, 9]]


class _FlagNet(nn.Module):
    """A custom forward that pools or not by a plain attribute: same modules, different geometry."""

    def __init__(self, pool: bool) -> None:
        super().__init__()
        self.pool = pool
        self.conv = nn.Conv2d(1, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.avg_pool2d(x, 2) if self.pool else x)


def test_cached_geometry_follows_the_structure_and_plain_flags() -> None:
    first = layer_geometry(_FlagNet(True), "conv", image_size=32, in_channels=1)
    assert len(receptive_field._CACHE) == 1
    assert layer_geometry(_FlagNet(True), "conv", image_size=32, in_channels=1) is first  # measured once
    other = layer_geometry(_FlagNet(False), "conv", image_size=32, in_channels=1)
    assert (first.stride, other.stride) == ((2.0, 2.0), (1.0, 1.0))
    assert len(receptive_field._CACHE) == 2


def test_a_functional_squeeze_excitation_gate_is_not_a_global_pool() -> None:
    """timm's SqueezeExcite pools with ``x.mean((2, 3))`` (no pool module): its gate is still a per-channel
    scale, so timm's EfficientNet-B0 block has torchvision's geometry (67 px field, stride 8 at 64 px)."""
    timm = pytest.importorskip("timm")
    ours = layer_geometry(timm.create_model("efficientnet_b0", pretrained=False, num_classes=3), "blocks.3.0.bn1",
                          image_size=64)
    reference = layer_geometry(torchvision.models.efficientnet_b0(num_classes=3), "features.4.0.block.0",
                               image_size=64)
    assert (ours.offset, ours.stride, ours.size) == (reference.offset, reference.stride, reference.size)
    assert (ours.stride, ours.size) == ((8.0, 8.0), (67, 67))
