"""What a training run needs before its first step: devices, data splits, the model built for an arm, its filter loss."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from icnn_compress.config import Recipe
from icnn_compress.data.cub import CubDataset
from icnn_compress.data.recipe import open_split, task_object
from icnn_compress.errors import DatasetError, ModelError, TrainingError
from icnn_compress.method.filter_loss import FilterLoss
from icnn_compress.models.registry import build_base_model
from icnn_compress.models.state_dict import load_state_dict_checked, read_state_dict
from icnn_compress.models.surgery import classifier_name, make_interpretable
from icnn_compress.runtime.device import resolve_device, seed_everything
from icnn_compress.runtime.distributed import barrier, init_distributed, is_main
from icnn_compress.runtime.loader import make_loader

log = logging.getLogger(__name__)

_MAX_NAMED = 8  # classes named in a warning


@dataclass
class _Setup:
    """What every loop needs, resolved once from the recipe."""

    recipe: Recipe
    device: torch.device
    amp: bool
    channels_last: bool
    train_data: CubDataset
    val_data: CubDataset  # carved from the training images: training never reads the test split
    progress: bool

    def loaders(self, epoch_seed: int) -> tuple[DataLoader, DataLoader]:
        r = self.recipe
        train = make_loader(self.train_data, batch_size=r.train.batch_size, shuffle=True, seed=epoch_seed,
                            workers=r.data.num_workers, device=self.device, distributed=True)
        val = make_loader(self.val_data, batch_size=r.train.eval_batch_size, shuffle=False, seed=0,
                          workers=r.data.num_workers, device=self.device, distributed=True)
        return train, val


def _setup(recipe: Recipe, progress: bool) -> _Setup:
    # Under torchrun (WORLD_SIZE > 1) this joins the process group: nccl on cuda:LOCAL_RANK, else gloo.
    device = init_distributed(resolve_device(recipe.train.device))
    progress = progress and is_main()
    seed_everything(recipe.train.seed, deterministic=recipe.train.deterministic)
    # Rank 0 first: it may generate or download the data, the others then only read it.
    if not is_main():
        barrier()
    obj = task_object(recipe.icnn)
    train_data = open_split(recipe.data, "train", progress=progress, single_object=obj)
    # Everything training chooses (collapse guard, kappa correction, per-epoch accuracy) reads this split;
    # with data.val_fraction = 0 that is the training split itself, never the test split.
    val_data = (open_split(recipe.data, "val", progress=progress, single_object=obj)
                if recipe.data.val_fraction > 0 else train_data)
    if is_main():
        barrier()
    # After the barrier: every rank sees the same split and raises together, none is left waiting.
    if len(train_data) == 0:
        raise DatasetError(f"the train split of {train_data.root} has no image (train_test_split.txt "
                           "marks none with 1): there is nothing to train on")
    absent = sorted(set(range(len(train_data.classes))) - set(train_data.labels.tolist()))
    if absent and is_main():
        log.warning("%d of %d classes have no training image (%s): the model never sees them and their "
                    "filters get no positive image", len(absent), len(train_data.classes),
                    ", ".join(train_data.classes[c] for c in absent[:_MAX_NAMED]))
    if len(val_data) == 0:
        raise TrainingError(f"the validation split of {recipe.data.root} is empty (data.val_fraction = "
                            f"{recipe.data.val_fraction}); raise data.val_fraction")
    cuda = device.type == "cuda"
    if recipe.train.cuda_graphs and not cuda:
        raise TrainingError(f"train.cuda_graphs needs a CUDA device, and this run trains on {device}: set "
                            "train.cuda_graphs = false (train.compile = true compiles without CUDA graphs)")
    return _Setup(recipe, device, recipe.train.amp and cuda, recipe.train.channels_last and cuda,
                  train_data, val_data, progress)


def build_for_recipe(recipe: Recipe, *, arm: str, classes: list[str], image_size: int) -> tuple[nn.Module, dict]:
    """Build the recipe's model for ``arm`` from its weights and checkpoint; return it and its architecture record."""
    m = recipe.model
    if m.num_classes is not None and m.num_classes != len(classes):
        raise ModelError(f"model.num_classes is {m.num_classes} but the data has {len(classes)} classes "
                         f"({', '.join(classes[:_MAX_NAMED])}); remove model.num_classes or fix data.root")
    num_classes = m.num_classes or len(classes)
    model = build_base_model(m.arch, num_classes=num_classes, weights=m.weights)
    if m.checkpoint:
        head = _head_keys(model) if m.reset_head else ()
        load_state_dict_checked(model, read_state_dict(m.checkpoint), source=m.checkpoint, allow_head_mismatch=head)
    layout = make_interpretable(
        model,
        arch=m.arch,
        num_classes=num_classes,
        image_size=image_size,
        variant="baseline" if arm == "baseline" else "icnn",
        top_layer=m.top_layer,
        pool_layer=m.pool_layer,
        new_conv=m.new_conv,
        new_filters=m.new_filters,
        head_width=m.head_width,
        peak=recipe.icnn.peak,
        beta=recipe.icnn.beta,
        reset_head=m.reset_head,
    )
    for mask in (model.get_submodule(n) for n in layout["masks"]):
        mask.category_momentum = recipe.icnn.category_momentum
        mask.beta_lr = recipe.icnn.beta_lr
        mask.beta_grad = _beta_grad(recipe)
    architecture = {
        "arch": m.arch, "num_classes": num_classes, "image_size": image_size,
        "variant": "baseline" if arm == "baseline" else "icnn", "new_conv": m.new_conv,
        "head_width": m.head_width, "peak": recipe.icnn.peak, "beta": recipe.icnn.beta, **layout,
    }
    return model, architecture


def _head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the model's classifier (:func:`~icnn_compress.models.surgery.classifier_name`): what
    model.reset_head frees."""
    last = classifier_name(model)
    return [f"{last}.weight", f"{last}.bias"]


def _set_class_frequency(model: nn.Module, labels: Tensor, num_classes: int) -> None:
    freq = torch.bincount(labels, minlength=num_classes).float()
    freq = freq / freq.sum().clamp(min=1)
    for mod in FilterLoss(model).masks.values():
        mod.class_freq.copy_(freq.clamp(min=1e-6))


def _filter_loss(model: nn.Module, recipe: Recipe) -> FilterLoss:
    """The recipe's filter loss; a single-category task makes every filter the object's (label 1).

    With ``train.compile`` (or ``train.cuda_graphs``) its fused functions run compiled.
    """
    single = 1 if task_object(recipe.icnn) else None
    return FilterLoss(model, form=recipe.icnn.loss, a=recipe.icnn.a, guard=recipe.icnn.guard, single_category=single,
                      compile=recipe.train.compile or recipe.train.cuda_graphs, crowding=recipe.icnn.crowding)


def _beta_grad(recipe: Recipe) -> float:
    """The scale of β's pseudo-gradient: ``icnn.beta_grad``, or 1/lr (the code's 1e4 at its lr 1e-4)."""
    if recipe.icnn.beta_grad is not None:
        return recipe.icnn.beta_grad
    return 1.0 / recipe.train.lr if recipe.train.lr > 0 else 0.0


def _check_beta_step(recipe: Recipe, arm: str) -> None:
    """Refuse a learned-β step that makes β's momentum update diverge (heavy ball: lr·g < 2(1 + momentum))."""
    i, t = recipe.icnn, recipe.train
    step = t.lr * i.beta_lr * _beta_grad(recipe)
    if arm != "baseline" and i.beta == "learned" and step >= 2 * (1 + t.momentum):
        raise TrainingError(
            f"the learned beta would diverge: train.lr x icnn.beta_lr x icnn.beta_grad = {step:.3g} must stay "
            f"under 2 x (1 + train.momentum) = {2 * (1 + t.momentum):.3g}; the released code's value is 0.05 "
            f"(lr 1e-4): set icnn.beta_grad = {0.05 / (t.lr * i.beta_lr):.3g}")
