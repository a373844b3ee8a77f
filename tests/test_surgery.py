"""Every registered architecture end to end: surgery, forward/backward, masks in eval, save/load."""

from __future__ import annotations

import io
import sys
import tomllib
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn
from conftest import BUILDER

from icnn_compress.config import recipe_from_dict
from icnn_compress.errors import UntrustedCodeError
from icnn_compress.method.filter_loss import FilterLoss
from icnn_compress.method.mask import InterpretableMask
from icnn_compress.models.registry import (
    ARCHITECTURES,
    BUILDER_ENTRY_POINTS,
    build_base_model,
    model_normalization,
    with_model_normalization,
)
from icnn_compress.models.surgery import build_model, find_top_layer, make_interpretable

SIZE = 96
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def interpretable(arch: str, variant: str = "icnn", num_classes: int = 3):
    torch.manual_seed(0)
    model = build_base_model(arch, num_classes=num_classes)
    layout = make_interpretable(
        model, arch=arch, num_classes=num_classes, image_size=SIZE, variant=variant, head_width=32
    )
    record = {
        "arch": arch, "num_classes": num_classes, "image_size": SIZE, "variant": variant, "new_conv": True,
        "head_width": 32, "peak": "centroid", "beta": "learned", **layout,
    }
    return model, record


# the fixed layouts; the families whose top block is found run in test_architectures.py
@pytest.mark.parametrize("arch", sorted(n for n, spec in ARCHITECTURES.items() if spec.top_layer is not None))
def test_registered_architecture_end_to_end(arch):
    model, record = interpretable(arch)
    masks = [m for m in model.modules() if isinstance(m, InterpretableMask)]
    assert [n for n, m in model.named_modules() if isinstance(m, InterpretableMask)] == record["masks"]
    assert len(masks) == 2 and all(m.active for m in masks)
    x = torch.randn(2, 3, SIZE, SIZE)
    labels = torch.tensor([0, 2])
    model.train()
    fl = FilterLoss(model)
    with fl.batch(labels, kappa=1e-3):
        loss = torch.nn.functional.cross_entropy(model(x), labels)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(s.batches == 1 for s in fl.stats.values())

    model.eval()
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: seen.__setitem__(k, (i[0], o))) for k, m in enumerate(masks)]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    for inp, outp in seen.values():  # masks change the maps in eval mode too
        assert not torch.equal(inp, outp)
    assert out.shape == (2, 3)

    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "architecture": record}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    rebuilt = build_model(saved["architecture"])
    rebuilt.load_state_dict(saved["state_dict"])
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), out)


def test_baseline_variant_has_identical_modules_and_passes_maps_through():
    icnn, _ = interpretable("resnet18")
    base, _ = interpretable("resnet18", variant="baseline")
    assert icnn.state_dict().keys() == base.state_dict().keys()
    mask = base.get_submodule("layer3.mask")
    x = torch.relu(torch.randn(1, mask.num_filters, 4, 4))
    assert torch.equal(mask(x), x)


def test_user_cnn_top_block_is_found_and_its_head_kept(caplog):
    model = build_base_model("icnn_compress.zoo:small_cnn", num_classes=4)
    head = model.head[-1]
    with caplog.at_level("INFO", logger="icnn_compress.models.surgery"):
        layout = make_interpretable(model, arch="icnn_compress.zoo:small_cnn", num_classes=4, image_size=64)
    # features ends with features.14 (its last ReLU, 8x8): the container is the last module with that map
    assert layout["top_layer"] == "features" and "rectify" not in layout
    assert "model.top_layer not set: masking features (its output is 128x8x8 on 64 px images" in caplog.text
    assert model.head[-1] is head

    model = build_base_model("icnn_compress.zoo:small_cnn", num_classes=4)
    head = model.head[-1]
    layout = make_interpretable(
        model, arch="icnn_compress.zoo:small_cnn", num_classes=4, image_size=SIZE, top_layer="features.14"
    )
    assert layout["masks"] == ["features.14.mask", "features.14.new_mask"]
    assert model.head[-1] is head
    assert model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 4)


def test_images_too_small_for_the_network_name_the_image_size():
    model = build_base_model("icnn_compress.zoo:small_cnn", num_classes=4)
    with pytest.raises(ValueError, match=r"^the model cannot run on 7x7 images up to features.14 \(.*\); raise "
                                         r"data.image_size$"):
        make_interpretable(model, arch="icnn_compress.zoo:small_cnn", num_classes=4, image_size=7,
                           top_layer="features.14")


def test_a_builder_that_returns_no_module_is_refused():
    with pytest.raises(ValueError, match=r"^the model builder 'collections:OrderedDict' returned a OrderedDict, "
                                         r"not a torch.nn.Module$"):
        build_base_model("collections:OrderedDict", num_classes=4)


def test_head_mismatch_asks_for_reset_head():
    model = build_base_model("resnet18", num_classes=10)
    with pytest.raises(ValueError, match="head has 10 classes but the task has 4; pass --set model.reset_head=true"):
        make_interpretable(model, arch="resnet18", num_classes=4, image_size=SIZE)


def test_unknown_top_layer_lists_modules():
    model = build_base_model("resnet18", num_classes=4)
    with pytest.raises(ValueError, match="no module 'layer9'"):
        make_interpretable(model, arch="resnet18", num_classes=4, image_size=SIZE, top_layer="layer9")


def user_record(arch: str) -> dict:
    """The architecture record of the quickstart's small CNN made interpretable, naming ``arch`` as its builder
    (made without importing ``arch``)."""
    model = build_base_model("icnn_compress.zoo:small_cnn", num_classes=3)
    layout = make_interpretable(model, arch=arch, num_classes=3, image_size=64, top_layer="features.14")
    return {"arch": arch, "num_classes": 3, "image_size": 64, "variant": "icnn", "new_conv": True, "head_width": 32,
            "peak": "centroid", "beta": "learned", **layout}


def test_a_saved_builder_is_not_imported_unless_trusted(user_builder):
    record = user_record(BUILDER)
    with pytest.raises(UntrustedCodeError) as refused:
        build_model(record, source="runs/x/model.pt")
    assert str(refused.value) == (
        "runs/x/model.pt names the model builder 'icnn_test_builder:build': its module 'icnn_test_builder' was not "
        "imported, since a model file is not trusted to run code; pass --trust-code (trust_code=True in Python) if "
        "you trust the file, or register the builder as an entry point in group 'icnn_compress.models'"
    )
    assert not user_builder.exists() and "icnn_test_builder" not in sys.modules
    model = build_model(record, trust_code=True)
    assert user_builder.exists()
    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_a_recipe_builder_is_the_users_choice_and_needs_no_trust(user_builder):
    assert build_base_model(BUILDER, num_classes=3)[-1][-1].out_features == 3
    assert user_builder.exists()


def test_an_entry_point_of_an_installed_package_registers_a_builder(user_builder):
    # A real distribution: importlib.metadata finds the dist-info folder on sys.path (user_builder's folder).
    dist = user_builder.parent / "user_code" / "icnn_test_builders-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: icnn-test-builders\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{BUILDER_ENTRY_POINTS}]\nbuild = {BUILDER}\n")
    build_model(user_record(BUILDER))
    assert user_builder.exists()


def test_a_stale_install_is_told_to_reinstall_for_icnn_compress_builders():
    with pytest.raises(UntrustedCodeError, match=r"'icnn_compress\.zoo' was not imported.*; icnn-compress registers "
                       r"its own builders when installed: reinstall it \(pip install -e \.\)$"):
        build_model(user_record("icnn_compress.zoo:tiny_cnn"))


def test_the_quickstart_builder_is_registered():
    entry_points = tomllib.loads(PYPROJECT.read_text())["project"]["entry-points"]
    assert entry_points == {BUILDER_ENTRY_POINTS: {"small_cnn": "icnn_compress.zoo:small_cnn",
                                                   "functional_cnn": "icnn_compress.zoo:functional_cnn"}}


def test_found_top_layer_skips_shared_modules_and_a_convolutional_head():
    class Shared(nn.Module):  # one ReLU module called after both convs: wrapping it would mask both calls
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.act = nn.ReLU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.act(self.conv2(self.act(self.conv1(x))))
            return self.fc(x.mean(dim=(2, 3)))

    assert find_top_layer(Shared(), image_size=8) == "conv2"
    # SqueezeNet's head is a 1x1 conv whose map is 13x13 at 224 px: the top block is the features before it
    squeeze = build_base_model("squeezenet1_1", num_classes=3)
    assert find_top_layer(squeeze, image_size=224) == "features"
    with pytest.raises(ValueError, match="no module of the model outputs a map of at least 5x5 on 4x4 images: raise "
                                         "data.image_size, or name the top conv block in model.top_layer"):
        find_top_layer(Shared(), image_size=4)


def test_a_signed_top_map_is_rectified_and_an_in_place_op_after_it_gets_a_copy():
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3, padding=1), bn=nn.BatchNorm2d(8),
                                    act=nn.ReLU(inplace=True), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
                                    fc=nn.Linear(8, 3)))
    layout = make_interpretable(net, arch="user:net", num_classes=3, image_size=8, top_layer="bn")
    assert layout["rectify"] is True and net.bn.mask.rectify and not net.bn.new_mask.rectify
    assert list(net.bn._modules) == ["inner", "mask", "conv", "relu", "new_mask", "copy"]
    fl = FilterLoss(net)
    labels = torch.tensor([0, 2])
    with fl.batch(labels, kappa=1e-3, measure=True):  # the in-place ReLU after the top block
        loss = torch.nn.functional.cross_entropy(net(torch.randn(2, 3, 8, 8)), labels)
    loss.backward()
    assert float(fl.stats["bn.mask"].task_sq) > 0 and float(fl.stats["bn.mask"].inj_sq) > 0


def test_timm_models_build_by_name_and_rebuild_from_their_record():
    pytest.importorskip("timm")
    model, record = interpretable("timm:resnet18")
    assert record["top_layer"] == "layer3" and model.fc.out_features == 3
    rebuilt = build_model(record)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match=r"timm has no model 'resnet_18'.*close names"):
        build_base_model("timm:resnet_18", num_classes=3)
    with pytest.raises(ValueError, match="loads its weights from a local file: pass model.checkpoint"):
        build_base_model("timm:resnet18", num_classes=3, weights="DEFAULT")


def test_normalisation_comes_from_the_weights_enum_or_timm_pretrained_cfg():
    assert model_normalization("resnet18") is None  # random weights: nothing to follow
    tv = model_normalization("inception_v3", weights="IMAGENET1K_V1")
    assert tv["mean"] == [0.485, 0.456, 0.406] and tv["input_size"] == 299
    pytest.importorskip("timm")
    inception = model_normalization("timm:inception_v3")
    assert inception["mean"] == [0.5, 0.5, 0.5] and inception["std"] == [0.5, 0.5, 0.5]
    recipe = with_model_normalization(recipe_from_dict({"model": {"arch": "timm:inception_v3"}}))
    assert recipe.data.mean == [0.5, 0.5, 0.5]
    given = with_model_normalization(recipe_from_dict({"model": {"arch": "timm:inception_v3"},
                                                       "data": {"mean": [0.1, 0.2, 0.3]}}))
    assert given.data.mean == [0.1, 0.2, 0.3] and given.data.std == [0.5, 0.5, 0.5]
    plain = with_model_normalization(recipe_from_dict({"model": {"arch": "resnet18"}}))
    assert plain.data.mean == [0.485, 0.456, 0.406] and plain.data.std == [0.229, 0.224, 0.225]
