"""Every registered architecture end to end: surgery, forward/backward, masks in eval, save/load."""

from __future__ import annotations

import io
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import BUILDER

from icnn_compress.errors import UntrustedCodeError
from icnn_compress.loss import FilterLoss
from icnn_compress.mask import InterpretableMask
from icnn_compress.surgery import (
    ARCHITECTURES,
    BUILDER_ENTRY_POINTS,
    build_base_model,
    build_model,
    make_interpretable,
)

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


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
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


def test_user_cnn_needs_its_top_layer_and_keeps_its_head():
    model = build_base_model("icnn_compress.zoo:small_cnn", num_classes=4)
    with pytest.raises(ValueError, match="name its top conv block"):
        make_interpretable(model, arch="icnn_compress.zoo:small_cnn", num_classes=4, image_size=SIZE)
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
    assert entry_points == {BUILDER_ENTRY_POINTS: {"small_cnn": "icnn_compress.zoo:small_cnn"}}
