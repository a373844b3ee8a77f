"""The recipe's dataclasses: one per TOML section, one field per key, with the checks each field carries."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


__all__ = [
    "CRITERIA",
    "GENERATORS",
    "OPTIMIZERS",
    "DataConfig",
    "EvalConfig",
    "ICNNConfig",
    "ModelConfig",
    "PretrainConfig",
    "PruneConfig",
    "Recipe",
    "TrainConfig",
]

# The names a recipe may choose from, defined once: the pruning criteria (each registered in
# icnn_compress.prune with register_criterion), the dataset generators and the optimisers.
CRITERIA = ("icnn", "icnn-l1", "l1", "fpgm", "taylor", "random")
GENERATORS = ("parts", "fashion-canvas")
OPTIMIZERS = ("sgd", "adamw")

# torchvision's ImageNet normalisation (torchvision/transforms/_presets.py declares it inline, not publicly).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# intervals (low, high, open_low, open_high) for numeric fields
_POSITIVE = (0.0, math.inf, True, True)  # finite and > 0
_NON_NEGATIVE = (0.0, math.inf, False, True)  # finite and >= 0


def _choices(*values: str, default: Any = dataclasses.MISSING, number: tuple | None = None) -> Any:
    """A field whose string values must be one of ``values``; a number, where the type allows one, must lie in
    the interval ``number`` (low, high, open_low, open_high)."""
    return field(default=default, metadata={"choices": values, **({"interval": number} if number else {})})


def _at_least(bound: float, default: Any) -> Any:
    """A numeric field that must be ``>= bound`` (None passes for Optional fields)."""
    return field(default=default, metadata={"min": bound})


def _within(low: float, high: float, default: Any, *, open_low: bool = False, open_high: bool = False) -> Any:
    """A numeric field inside the interval from ``low`` to ``high`` (each end included unless ``open_*``)."""
    return field(default=default, metadata={"interval": (low, high, open_low, open_high)})


def _positive(default: float) -> Any:
    """A float field that must be finite and > 0 (a learning rate: 0 trains nothing, inf diverges)."""
    return field(default=default, metadata={"interval": _POSITIVE})


def _finite(default: float) -> Any:
    """A float field that must be finite and >= 0."""
    return field(default=default, metadata={"interval": _NON_NEGATIVE})


def _interval_holds(value: float, low: float, high: float, open_low: bool, open_high: bool) -> bool:
    above = low < value if open_low else low <= value
    below = value < high if open_high else value <= high
    return above and below  # NaN fails both


def _interval_text(low: float, high: float, open_low: bool, open_high: bool) -> str:
    return f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"


@dataclass
class ModelConfig:
    """Which CNN to start from and how to make it interpretable."""

    arch: str = "vgg16"  # a registered torchvision name, or "package.module:builder" for a user CNN
    weights: str | None = None  # torchvision weights enum member ("IMAGENET1K_V1", "DEFAULT"); None = random
    checkpoint: str | None = None  # a user .pth (state_dict, or a dict holding one); loaded after `weights`
    num_classes: int | None = _at_least(1, None)  # None = the dataset's class count
    reset_head: bool = False  # replace the classifier when the checkpoint's class count differs
    top_layer: str | None = None  # module name of the top conv block (required for user CNNs)
    pool_layer: str | None = None  # module after which the second mask goes (None: right after the new conv)
    new_conv: bool = True  # add the paper's new 3x3 conv above the top conv
    new_filters: int | None = _at_least(1, None)  # None = the top conv's channel count (the paper's M = C)
    head_width: int = _at_least(1, 4096)  # hidden width of the fresh VGG/AlexNet classifier


@dataclass
class DataConfig:
    """Where the images are and how they are read."""

    root: str = "data/parts"  # relative paths stay relative (resolved against the current directory)
    # "cub": the CUB-200-2011 layout (images.txt, parts/ ...); "imagefolder": class folders as torchvision's
    # ImageFolder reads them (optional train/, val/, test/); "auto": cub where root holds images.txt (or
    # is still to be generated), imagefolder where it holds folders
    format: str = _choices("auto", "cub", "imagefolder", default="auto")
    # imagefolder only: a COCO-style keypoints JSON giving landmarks (relative paths are read from root)
    keypoints: str | None = None
    # imagefolder without train/: the share of each class held out as the test split, drawn with split_seed
    test_fraction: float = _within(0.0, 1.0, 0.2, open_low=True, open_high=True)
    split_seed: int = 0
    image_size: int = _at_least(1, 64)
    crop_to_box: bool = False
    hflip: bool = False  # random horizontal flips of training images (classes must be flip-invariant)
    # per-channel normalisation; None: the model's own (its torchvision weights enum's or timm pretrained_cfg's
    # transforms), else ImageNet's; resolved when a run starts and saved with its recipe
    mean: list[float] | None = None
    std: list[float] | None = None
    num_workers: int = _at_least(0, 0)
    limit_train: int | None = _at_least(1, None)
    limit_test: int | None = _at_least(1, None)
    generate: str | None = _choices(*GENERATORS, default=None)  # build the dataset when missing
    generate_seed: int = 0
    # the part names location instability averages over (None: every part of parts/parts.txt)
    landmarks: list[str] | None = None
    # the validation split, carved per class from the training split with `val_seed`: what training reads
    # to choose (collapse guard, kappa correction, per-epoch accuracy); the test split is read only by
    # `icnn evaluate` and the numbers reported
    val_fraction: float = _within(0.0, 1.0, 0.1, open_high=True)
    val_seed: int = 0


@dataclass
class TrainConfig:
    """The interpretable fine-tuning run."""

    epochs: int = _at_least(1, 10)  # 0 would save the untrained model as a run
    batch_size: int = _at_least(1, 32)
    optimizer: str = _choices(*OPTIMIZERS, default="sgd")
    lr: float = _positive(1e-2)
    lr_end: float = _finite(1e-3)
    # "paper": logspace lr -> lr_end over `schedule_epochs`, then lr_end
    schedule: str = _choices("constant", "cosine", "paper", default="cosine")
    schedule_epochs: int = _at_least(1, 10)
    momentum: float = _at_least(0.0, 0.9)
    weight_decay: float = _at_least(0.0, 5e-4)
    device: str = "auto"
    seed: int = 0
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # CUDA only
    # torch.compile the model and the fused mask / filter-loss functions (FilterLoss(compile=True))
    compile: bool = False
    # CUDA only: capture the compiled graphs as CUDA graphs (torch.compile mode "reduce-overhead"), which
    # replays each one with a single launch; needs static shapes (a smaller last batch records a new graph)
    cuda_graphs: bool = False
    deterministic: bool = True
    eval_batch_size: int = _at_least(1, 128)


@dataclass
class PretrainConfig:
    """The plain training that makes the quickstart's "existing checkpoint" (0 epochs: skipped)."""

    epochs: int = _at_least(0, 0)
    lr: float = _positive(1e-2)
    lr_end: float = _finite(1e-3)
    optimizer: str = _choices(*OPTIMIZERS, default="sgd")


@dataclass
class ICNNConfig:
    """The filter loss of Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks", CVPR 2018."""

    # released code | paper | the largest 3x3 neighbourhood sum (a remedy for the drift onto the centre) | that sum
    # kept off the places a category's earlier filters crowd (mask.spread_cells)
    peak: str = _choices("centroid", "argmax", "local-mass", "spread", default="centroid")
    beta: str | float = _choices("learned", default="learned", number=_POSITIVE)  # or a fixed value, the paper's cells
    loss: str = _choices("reference", "mutual-information", default="reference")
    # or a number >= 0 (at epoch 1, divided by the epoch; a negative one would invert the loss)
    kappa: str | float = _choices("auto", default="auto", number=_NON_NEGATIVE)
    a: float = 0.5
    # crowding penalty (loss.crowding_gradient): on images of its category, a filter is pushed down where the
    # templates of the other filters of its category sit, at this multiple of kappa; 0: the method as published
    crowding: float = _at_least(0.0, 0.0)
    # "landmarks": in training, each filter's template sits on its assigned landmark (round robin over the
    # data's landmarks) where that landmark is visible (icnn_compress.method.anchor); weak part supervision the paper
    # does not use. "none": the peak rule everywhere (the method as published). Evaluation always uses the peak rule.
    anchor: str = _choices("none", "landmarks", default="none")
    guard: bool = False
    category_momentum: float = 0.9
    pilot_batches: int = _at_least(0, 8)
    collapse_guard: bool = True
    # the learned beta moves as the released code moves it (InterpretableMask.update_beta): raw strengths,
    # target 3 without positive images, a pseudo-gradient -beta_grad * (target - beta) through momentum
    # SGD (train.momentum) at beta_lr x the learning rate, no weight decay
    # beta_grad None: 1 / train.lr, which is the code's 1e4 at the code's lr 1e-4 and keeps its per-step
    # pull (0.05 of the gap at the first lr) at any other learning rate
    beta_lr: float = _at_least(0.0, 0.05)
    beta_grad: float | None = _at_least(0.0, None)
    # "single-category": the paper's main setting, `object` against all other images as negatives, every
    # filter the object's, a two-way (object / other) head
    task: str = _choices("multi-category", "single-category", default="multi-category")
    object: str | None = None


@dataclass
class PruneConfig:
    """Interpretability-guided structured pruning (``icnn prune``, the pipeline's prune stage)."""

    # the names of icnn_compress.prune.CRITERIA (not imported: the prune stage imports this module)
    criterion: str = _choices(*CRITERIA, default="icnn-l1")
    # MACs of the result over the unpruned model's, in (0, 1]; or "auto": remove exactly the filters the analysis
    # flags (silent ones, and the members of each redundancy cluster other than its best), nothing else
    target_macs: str | float = _choices("auto", default=0.5, number=(0.0, 1.0, True, False))
    round_to: int = _at_least(1, 8)  # kept channel counts rounded to the nearest multiple (1: no rounding)
    floor: float = _within(0.0, 1.0, 0.25, open_low=True, open_high=True)  # fraction of each layer always kept
    recover_epochs: int = _at_least(0, 1)  # fine-tuning epochs after pruning (0: save the pruned model as is)
    # rounds of prune + recovery (torch-pruning's iterative steps): round k reaches 1 - k/steps of the MACs to
    # remove, and the recover_epochs are shared out over the rounds (same budget as one-shot; needs
    # recover_epochs >= steps when steps > 1)
    steps: int = _at_least(1, 1)
    # module names whose output channels are not pruned (layers torch-pruning cannot prune; the error names them)
    ignore: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    """How interpretability is measured (``icnn evaluate``, the analysis, the comparison)."""

    # where each filter's map is read and which class it is measured for (icnn_compress.method.protocol)
    # the names of icnn_compress.method.protocol.PROTOCOLS (not imported: this module stays free of torch)
    protocol: str = _choices("official", "paper", "masked-output", default="official")
    top_k: int = _at_least(1, 100)  # images per (filter, landmark), the paper's 100


@dataclass
class Recipe:
    """A whole recipe: one field per TOML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    icnn: ICNNConfig = field(default_factory=ICNNConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------------------
# the generic dict <-> dataclass routine
