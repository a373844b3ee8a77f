"""Tests for icnn_compress/config.py: recipes map one-to-one onto the dataclasses, and say why when not."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from icnn_compress.config import (
    DataConfig,
    ICNNConfig,
    PruneConfig,
    Recipe,
    TrainConfig,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    recipe_to_toml,
)
from icnn_compress.errors import RecipeError


RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    recipe = load_recipe()
    assert recipe == Recipe()
    assert recipe.model.arch == "vgg16" and recipe.train.epochs == 10 and recipe.icnn.kappa == "auto"
    assert recipe.data.mean is None and recipe.data.std is None  # the model's own, resolved when a run starts


def test_file_values_and_int_for_float(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[model]
arch = "resnet18"
weights = "IMAGENET1K_V1"
num_classes = 4
[data]
root = "rel/dir"
mean = [0, 0.5, 1]
[train]
lr = 1
[icnn]
kappa = 0.001
beta = 2
""",
    )
    recipe = load_recipe(path)
    assert recipe.model.arch == "resnet18" and recipe.model.weights == "IMAGENET1K_V1"
    assert recipe.model.num_classes == 4
    assert recipe.data.root == "rel/dir"  # relative paths stay as given
    assert recipe.data.mean == [0.0, 0.5, 1.0] and all(type(v) is float for v in recipe.data.mean)
    assert recipe.train.lr == 1.0 and type(recipe.train.lr) is float
    assert recipe.icnn.kappa == 0.001
    assert recipe.icnn.beta == 2.0 and type(recipe.icnn.beta) is float
    assert recipe.train.epochs == 10  # untouched keys keep their defaults


def test_prune_section(tmp_path: Path) -> None:
    text = '[prune]\ncriterion = "l1"\ntarget_macs = 1\nround_to = 16\nfloor = 0.5\nrecover_epochs = 0\n'
    path = write(tmp_path, text)
    assert load_recipe(path).prune == PruneConfig(criterion="l1", target_macs=1.0, round_to=16, floor=0.5,
                                                  recover_epochs=0)
    assert load_recipe().prune == PruneConfig(criterion="icnn-l1", target_macs=0.5, round_to=8, floor=0.25,
                                              recover_epochs=1)
    assert load_recipe(None, ["prune.round_to=16"]).prune.round_to == 16
    with pytest.raises(RecipeError, match=r"unknown key 'prune.round'; did you mean 'prune.round_to'\?"):
        load_recipe(write(tmp_path, "[prune]\nround = 16\n"))


def test_prune_target_auto_and_steps(tmp_path: Path) -> None:
    prune = load_recipe(write(tmp_path, '[prune]\ntarget_macs = "auto"\nsteps = 3\n')).prune
    assert (prune.target_macs, prune.steps) == ("auto", 3)
    assert load_recipe().prune.steps == 1  # one-shot unless asked
    assert load_recipe(None, ["prune.target_macs=auto"]).prune.target_macs == "auto"
    assert load_recipe(None, ["prune.target_macs=0.3"]).prune.target_macs == 0.3


def test_prune_criteria_are_the_pruning_stage_criteria() -> None:
    from icnn_compress.prune import CRITERIA

    criterion = next(f for f in dataclasses.fields(PruneConfig) if f.name == "criterion")
    assert criterion.metadata["choices"] == CRITERIA


def test_recipes_carry_a_prune_section() -> None:
    import tomllib

    paths = sorted(RECIPES.glob("*.toml"))
    assert paths
    for path in paths:
        assert "prune" in tomllib.loads(path.read_text()), path.name
    assert load_recipe(RECIPES / "quickstart.toml").prune == PruneConfig(criterion="icnn", target_macs=0.5,
                                                                         round_to=16, floor=0.25, recover_epochs=3)


def test_unknown_key_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "[train]\nepoch = 3\n")
    expected = f"{re.escape(str(path))}: unknown key 'train.epoch'; did you mean 'train.epochs'\\? valid keys: "
    with pytest.raises(RecipeError, match=expected) as info:
        load_recipe(path)
    assert "train.batch_size" in str(info.value)


def test_unknown_section_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "[trian]\nepochs = 3\n")
    message = r"unknown section 'trian'; did you mean 'train'\? valid sections: model"
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_section_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"'train' must be a table, got 3"):
        load_recipe(write(tmp_path, "train = 3\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[train]\nepochs = "3"\n', r"'train.epochs' expects int, got '3' \(str\)"),
        ("[train]\nepochs = 2.5\n", r"'train.epochs' expects int, got 2.5 \(float\)"),
        ("[train]\namp = 1\n", r"'train.amp' expects bool, got 1 \(int\)"),
        ("[train]\nlr = true\n", r"'train.lr' expects float, got True \(bool\)"),
        ('[data]\nmean = [0.5, "x", 0.5]\n', r"'data.mean' expects list\[float\] \| None, got \[0.5, 'x', 0.5\]"),
        ("[model]\nweights = 1\n", r"'model.weights' expects str \| None, got 1 \(int\)"),
        ("[prune]\nround_to = 8.0\n", r"'prune.round_to' expects int, got 8.0 \(float\)"),
    ],
)
def test_wrong_type(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError, match=f"^{re.escape(str(path))}: {message}"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[train]\noptimizer = "adam"\n', r"'train.optimizer' must be one of 'sgd', 'adamw', got 'adam'"),
        ('[train]\nschedule = "step"\n', r"'train.schedule' must be one of 'constant', 'cosine', 'paper'"),
        ('[icnn]\npeak = "max"\n', r"'icnn.peak' must be one of 'centroid', 'argmax', 'local-mass', 'spread', got 'max'"),
        ('[icnn]\nloss = "mi"\n', r"'icnn.loss' must be one of 'reference', 'mutual-information', got 'mi'"),
        ('[icnn]\nkappa = "big"\n', r"'icnn.kappa' must be one of 'auto' or a number, got 'big'"),
        ('[icnn]\nbeta = "fixed"\n', r"'icnn.beta' must be one of 'learned' or a number, got 'fixed'"),
        ('[data]\ngenerate = "cub"\n', r"'data.generate' must be one of 'parts', 'fashion-canvas', got 'cub'"),
        ("[train]\nbatch_size = 0\n", r"'train.batch_size' must be >= 1, got 0"),
        ('[prune]\ncriterion = "l2"\n', r"'prune.criterion' must be one of 'icnn', 'icnn-l1', 'l1', 'fpgm', "
                                       r"'taylor', 'random', got 'l2'"),
        ("[prune]\ntarget_macs = 0\n", r"'prune.target_macs' must be in \(0, 1\], got 0.0"),
        ("[prune]\ntarget_macs = 1.5\n", r"'prune.target_macs' must be in \(0, 1\], got 1.5"),
        ("[prune]\ntarget_macs = nan\n", r"'prune.target_macs' must be in \(0, 1\], got nan"),
        ('[prune]\ntarget_macs = "half"\n', r"'prune.target_macs' must be one of 'auto' or a number, got 'half'"),
        ("[prune]\nsteps = 0\n", r"'prune.steps' must be >= 1, got 0"),
        ("[prune]\nsteps = 2.0\n", r"'prune.steps' expects int, got 2.0 \(float\)"),
        ("[prune]\nfloor = 1\n", r"'prune.floor' must be in \(0, 1\), got 1.0"),
        ("[prune]\nfloor = 0.0\n", r"'prune.floor' must be in \(0, 1\), got 0.0"),
        ("[prune]\nround_to = 0\n", r"'prune.round_to' must be >= 1, got 0"),
        ("[prune]\nrecover_epochs = -1\n", r"'prune.recover_epochs' must be >= 0, got -1"),
        ("[train]\nepochs = 0\n", r"'train.epochs' must be >= 1, got 0"),
        ("[train]\nlr = inf\n", r"'train.lr' must be in \(0, inf\), got inf"),
        ("[train]\nlr = 0\n", r"'train.lr' must be in \(0, inf\), got 0.0"),
        ("[pretrain]\nlr_end = nan\n", r"'pretrain.lr_end' must be in \[0, inf\), got nan"),
        ("[icnn]\nkappa = -1\n", r"'icnn.kappa' must be in \[0, inf\), got -1.0"),
        ("[icnn]\nbeta = -2\n", r"'icnn.beta' must be in \(0, inf\), got -2.0"),
        ("[icnn]\ncrowding = -1\n", r"'icnn.crowding' must be >= 0"),
        ("[icnn]\nanchor = \"parts\"\n", r"'icnn.anchor' must be one of 'none', 'landmarks', got 'parts'"),
        ("[data]\nmean = [0.5, 0.5]\n", r"'data.mean' needs 3 values \(R, G, B; images are read as RGB\)"),
        ("[data]\nstd = [0.2, 0.0, 0.2]\n", r"'data.std' must be finite and > 0"),
    ],
)
def test_bad_enum_or_bound(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, text))


def test_missing_and_invalid_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(RecipeError, match=f"recipe not found: {re.escape(str(missing))}"):
        load_recipe(missing)
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[train\n"))


def test_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[model]\nweights = "IMAGENET1K_V1"\ncheckpoint = "a.pth"\n')
    recipe = load_recipe(
        path,
        [
            "train.epochs=3",
            "icnn.kappa=1e-3",
            "model.weights=none",
            "model.checkpoint = NULL",
            "model.arch=mypkg.nets:build",
            "train.device=cuda:0",
            "train.amp=false",
            "data.mean=[0.5, 0.5, 0.5]",
            "icnn.beta=learned",
            "model.top_layer=7",  # a str field: the bare text, not the TOML integer
        ],
    )
    assert recipe.train.epochs == 3
    assert recipe.icnn.kappa == pytest.approx(1e-3)
    assert recipe.model.weights is None and recipe.model.checkpoint is None
    assert recipe.model.arch == "mypkg.nets:build"
    assert recipe.train.device == "cuda:0" and recipe.train.amp is False
    assert recipe.data.mean == [0.5, 0.5, 0.5]
    assert recipe.icnn.beta == "learned"
    assert recipe.model.top_layer == "7"


def test_override_applies_after_file_and_last_wins(tmp_path: Path) -> None:
    path = write(tmp_path, "[train]\nepochs = 5\n")
    assert load_recipe(path, ["train.epochs=7", "train.epochs=8"]).train.epochs == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", r"--set train.epoch=3: unknown key 'train.epoch'; did you mean 'train.epochs'\?"),
        ("trian.epochs=3", r"unknown section 'trian'; did you mean 'train'\?"),
        ("train.epochs", r"expected section.key=value"),
        ("epochs=3", r"expected section.key=value"),
        ("train.epochs=three", r"--set train.epochs=three: 'train.epochs' expects int, got 'three' \(str\)"),
        ("train.epochs=none", r"'train.epochs' expects int, got 'none'"),  # not Optional: no None
        ("train.optimizer=adam", r"'train.optimizer' must be one of 'sgd', 'adamw', got 'adam'"),
        ("prune.floor=1.5", r"^--set prune.floor=1.5: 'prune.floor' must be in \(0, 1\), got 1.5$"),
        ("prune.round_to=16.5", r"--set prune.round_to=16.5: 'prune.round_to' expects int, got 16.5"),
    ],
)
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [override])


def test_round_trip_toml(tmp_path: Path) -> None:
    recipe = load_recipe(
        None,
        [
            "model.arch=resnet50",
            "model.num_classes=200",
            'data.root="C:\\\\data \\"quoted\\""',
            "data.limit_train=17",
            "train.lr=1e-05",
            "icnn.kappa=0.25",
            "icnn.beta=3",
            "data.generate=fashion-canvas",
        ],
    )
    assert recipe.data.root == 'C:\\data "quoted"'
    path = tmp_path / "recipe.toml"
    path.write_text(recipe_to_toml(recipe))
    assert load_recipe(path) == recipe
    assert load_recipe(tmp_path / "recipe.toml") != Recipe()


@given(
    epochs=st.integers(1, 10**6),
    lr=st.floats(1e-12, 10),
    mean=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=3, max_size=3),
    root=st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=20),
    kappa=st.one_of(st.just("auto"), st.floats(0, 1e30)),
)
def test_round_trip_property(epochs: int, lr: float, mean: list[float], root: str, kappa: str | float) -> None:
    recipe = Recipe(
        train=TrainConfig(epochs=epochs, lr=lr),
        data=DataConfig(mean=mean, root=root),
        icnn=ICNNConfig(kappa=kappa),
    )
    import tomllib

    assert recipe_from_dict(tomllib.loads(recipe_to_toml(recipe))) == recipe


def test_dict_round_trip_and_source_in_errors() -> None:
    recipe = Recipe()
    d = recipe_to_dict(recipe)
    assert d["train"]["epochs"] == 10 and d["model"]["weights"] is None
    assert recipe_from_dict(d) == recipe
    d["train"]["epochs"] = -1
    with pytest.raises(RecipeError, match=r"^runs/a/recipe.toml: 'train.epochs' must be >= 1, got -1$"):
        recipe_from_dict(d, source="runs/a/recipe.toml")


def test_every_optional_field_defaults_to_none() -> None:
    # recipe_to_toml leaves unset optionals out, which relies on their default being None.
    for section in dataclasses.fields(Recipe):
        cls = typing.get_type_hints(Recipe)[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if type(None) in typing.get_args(hints[f.name]):
                assert f.default is None, f"{cls.__name__}.{f.name}"
