"""Fine-tuning: plain pre-training, the ICNN / masks-only / baseline arms, resume, NaN and collapse guards.

One loop serves every arm so that comparisons differ only in what the arm changes:

* ``icnn`` — masks active, filter loss at κ_t = κ₀ / epoch (κ₀ measured by the pilot when "auto");
* ``masks-only`` — masks active, κ = 0 (METHOD.md §8: most of the new layer's gain is the mask);
* ``baseline`` — identical modules with inactive masks and no filter loss.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from .checkpoint import (
    RunDir,
    append_jsonl,
    atomic_save,
    atomic_write_text,
    load_model_file,
    load_state_dict_checked,
    read_state_dict,
    save_model_file,
    trim_jsonl,
)
from .config import Recipe, recipe_to_dict, recipe_to_toml
from .data.cub import CubDataset
from .data.recipe import open_split, task_object
from .distributed import (
    all_reduce_mask_state,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    is_distributed,
    is_main,
    shard_indices,
    world_size,
)
from .errors import CheckpointError, DatasetError, ModelError, TrainingError
from .kappa import R_BANDS, R_COLLAPSE, CollapseGuard, calibrate_kappa
from .loss import FilterLoss
from .plain_model import PlainCheckpoint
from .run_folder import check_same_run, claim_folder, locked
from .surgery import PLAIN, build_base_model, build_model, make_interpretable, with_model_normalization

__all__ = ["ARMS", "build_for_recipe", "calibrate", "finetune", "load_run_model", "pretrain", "resolve_device"]

log = logging.getLogger(__name__)
_MAX_NAMED = 8  # classes named in a warning

ARMS = ("icnn", "masks-only", "baseline")


def _rng_states(device: torch.device) -> dict[str, Tensor]:
    """The generators a resumed run must continue: the CPU's (shuffling) and, on a GPU, the device's (dropout)."""
    states = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(state: dict) -> None:
    # torch.load(map_location=<the GPU>) moved the saved byte tensors there; the setters want them on the CPU.
    torch.set_rng_state(state["rng"].cpu())
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"].cpu())


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"train.device is {name!r}, which is not a device torch knows: use 'auto', 'cpu' "
                            "or 'cuda[:N]'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train.device is {name!r} but no CUDA device is available; use 'cpu' or 'auto'")
    return device


def seed_everything(seed: int, *, deterministic: bool) -> None:
    """Seed torch; on request make CPU kernels deterministic (CUDA keeps its fast kernels)."""
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def loader(dataset: CubDataset, *, batch_size: int, shuffle: bool, seed: int, workers: int, device: torch.device,
           distributed: bool = False):
    """A DataLoader with a seeded shuffle; pinned memory and persistent workers on CUDA.

    ``distributed`` (under torchrun): the training split goes through a ``DistributedSampler`` (seeded
    with ``seed``, which changes every epoch, so the shards reshuffle; it pads every rank to the same
    number of batches, which DDP's lock-step needs); an evaluation split is sharded without padding, so
    that the all-reduced accuracy counts every image once.
    """
    gen = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed and is_distributed():
        if shuffle:
            sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)
            sampler.set_epoch(seed)
            shuffle = False
        else:
            dataset = Subset(dataset, shard_indices(len(dataset)))
    per_rank = len(dataset) // world_size() if sampler is not None else len(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=gen,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=(shuffle or sampler is not None) and per_rank > batch_size,
    )


def lr_at(recipe_lr: float, lr_end: float, schedule: str, schedule_epochs: int, epoch: int, frac: float, epochs: int) -> float:
    """Learning rate at ``epoch`` (1-based) and fraction ``frac`` of it.

    ``paper``: logspace(lr → lr_end) over ``schedule_epochs`` epochs, then lr_end (METHOD.md §5);
    ``cosine``: cosine from lr to lr_end over the run; ``constant``: lr.
    """
    if schedule == "constant":
        return recipe_lr
    if schedule == "paper":
        k = min(epoch - 1, schedule_epochs - 1)
        if schedule_epochs == 1:
            return recipe_lr
        return recipe_lr * (lr_end / recipe_lr) ** (k / (schedule_epochs - 1))
    t = ((epoch - 1) + frac) / max(epochs, 1)
    return lr_end + 0.5 * (recipe_lr - lr_end) * (1 + math.cos(math.pi * min(t, 1.0)))


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _to(batch: dict, device: torch.device, channels_last: bool, hflip: bool = False) -> tuple[Tensor, Tensor]:
    images = batch["image"].to(device, non_blocking=True)
    if hflip:  # training-only augmentation; landmarks are not used in training
        flip = torch.rand(images.shape[0], device=device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["label"].to(device, non_blocking=True)


@torch.inference_mode()
def validate(model: nn.Module, data: DataLoader, device: torch.device, *, amp: bool, channels_last: bool) -> float:
    """Top-1 accuracy (%) of ``model`` on ``data``."""
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    total = 0
    for batch in data:
        images, labels = _to(batch, device, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        correct += (logits.argmax(dim=1) == labels).sum()
        total += labels.numel()
    if is_distributed():  # each rank saw its own shard of the split (see loader)
        counts = all_reduce_sum(torch.stack((correct, torch.tensor(total, device=device))))
        correct, total = counts[0], int(counts[1])
    return 100.0 * correct.item() / max(total, 1)


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
        train = loader(self.train_data, batch_size=r.train.batch_size, shuffle=True, seed=epoch_seed,
                       workers=r.data.num_workers, device=self.device, distributed=True)
        val = loader(self.val_data, batch_size=r.train.eval_batch_size, shuffle=False, seed=0,
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
    """State-dict keys of the model's last Linear (or last parameterised) layer: what model.reset_head frees."""
    last = [n for n, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))][-1]
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


def validate_filters(
    model: nn.Module, data: DataLoader, device: torch.device, masks: dict[str, nn.Module], *, amp: bool,
    channels_last: bool,
) -> tuple[float, dict[str, int]]:
    """Accuracy (%) and, per masked layer, the filters silent on every validation image (dead).

    Dead filters are counted on the model as it stands after the epoch: a filter killed late in an
    epoch looks alive in that epoch's training statistics.
    """
    peak: dict[str, Tensor] = {}

    def hook(name: str):
        def record(_mod, inputs, _out) -> None:
            top = inputs[0].detach().float().amax(dim=(0, 2, 3))
            peak[name] = top if name not in peak else torch.maximum(peak[name], top)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in masks.items()]
    try:
        acc = validate(model, data, device, amp=amp, channels_last=channels_last)
    finally:
        for h in handles:
            h.remove()
    return acc, {n: int((p <= 0).sum()) for n, p in peak.items()}


def _epoch_stats(filter_loss: FilterLoss) -> dict:
    """Per-layer summary of an epoch (host values; called once per epoch)."""
    out = {}
    for name, st in filter_loss.stats.items():
        mask = filter_loss.masks[name]
        rec: dict = {"filters": mask.num_filters}
        if st.peak_max is not None:
            rec["dead_in_epoch"] = int((st.peak_max <= 0).sum())
            rec["fire_rate"] = float(st.fired.float().mean() / max(st.images, 1))
        if st.batches:
            rec["neg_mi"] = float(st.neg_mi / st.batches)
        if st.task_sq is not None and float(st.task_sq) > 0:
            rec["R"] = math.sqrt(float(st.inj_sq) / float(st.task_sq))
        rec["beta"] = {"mean": float(mask.beta.mean()), "min": float(mask.beta.min()), "max": float(mask.beta.max())}
        rec["categories"] = torch.bincount(mask.category, minlength=mask.num_classes).tolist()
        out[name] = rec
    return out


def _train_epoch(
    model: nn.Module,
    filter_loss: FilterLoss | None,
    optimizer: torch.optim.Optimizer,
    data: DataLoader,
    setup: _Setup,
    *,
    epoch: int,
    epochs: int,
    kappa: float,
    lr: tuple[float, float, str, int],
    desc: str,
) -> dict:
    """One epoch; returns host-side loss and accuracy. Raises TrainingError on a non-finite loss."""
    model.train()
    device = setup.device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    finite = torch.ones((), device=device, dtype=torch.bool)
    seen = 0
    steps = len(data)
    bar = tqdm(data, desc=desc, leave=False, disable=not setup.progress, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(lr[0], lr[1], lr[2], lr[3], epoch, step / steps, epochs)
        images, labels = _to(batch, device, setup.channels_last, setup.recipe.data.hflip)
        with _maybe_filter_loss(filter_loss, labels, kappa, optimizer.param_groups[0]["lr"],
                                setup.recipe.train.momentum):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.amp):
                logits = model(images)
            loss = nn.functional.cross_entropy(logits.float(), labels)
            if filter_loss is not None:
                loss = loss + filter_loss.loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if filter_loss is not None:
            # Every rank folded its own batch into the masks' categories and β: average them now so that
            # the ranks stay identical at every step (one small all-reduce; no-op in one process).
            all_reduce_mask_state(model)
        finite &= torch.isfinite(loss.detach())
        total_loss += loss.detach() * labels.numel()
        correct += (logits.detach().argmax(dim=1) == labels).sum()
        seen += labels.numel()
        if setup.progress and (step % 10 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{float(total_loss) / seen:.3f}", acc=f"{100.0 * float(correct) / seen:.1f}")
        if step % 25 == 24 and not _all_finite(finite):
            break
    if not _all_finite(finite):
        raise TrainingError(f"the loss became NaN or infinite in epoch {epoch}")
    if is_distributed():
        sums = all_reduce_sum(torch.stack((total_loss.double(), correct.double(),
                                           torch.tensor(float(seen), device=device, dtype=torch.float64))))
        total_loss, correct, seen = sums[0], sums[1], int(sums[2])
    return {"train_loss": float(total_loss) / max(seen, 1), "train_acc": 100.0 * float(correct) / max(seen, 1)}


# A mean cross-entropy this large is a diverged run, finite or not (a random classifier's is ln(classes)).
_DIVERGED_LOSS = 1e6


def _check_diverged(model: nn.Module, stats: dict, epoch: int) -> None:
    """Raise TrainingError when an epoch left weights or buffers non-finite (e.g. a BatchNorm running_var of
    inf) or a loss so large that the run has diverged: such an epoch must never become the last good one."""
    state = model.state_dict()
    bad = next((name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())),
               None)
    if bad is not None:
        raise TrainingError(f"{bad} became NaN or infinite in epoch {epoch}")
    if stats["train_loss"] > _DIVERGED_LOSS:
        raise TrainingError(f"the loss diverged in epoch {epoch} (mean {stats['train_loss']:.3g})")


def _all_finite(finite: Tensor) -> bool:
    """Whether every rank's loss stayed finite: all ranks must agree to stop, or the others would hang."""
    if not is_distributed():
        return bool(finite)
    bad = all_reduce_sum((~finite).to(torch.int32).reshape(1))
    return int(bad) == 0


def _maybe_filter_loss(filter_loss: FilterLoss | None, labels: Tensor, kappa: float, lr: float, momentum: float):
    if filter_loss is None:
        return contextlib.nullcontext()
    return filter_loss.batch(labels, kappa, lr=lr, momentum=momentum)


def _prepare(model: nn.Module, setup: _Setup) -> nn.Module:
    model.to(setup.device)
    if setup.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` when more than one rank runs, else ``model`` itself.

    Buffers are broadcast from rank 0 at each forward (DDP's default): BatchNorm statistics follow rank 0,
    and the mask state, all-reduced after every step, is already identical there.
    """
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=device.index if ids else None)


# A folder holding any of these holds another run: refused unless resumed (or replaced with --force).
_RUN_FILES = ("model.pt", "last.pt", "metrics.jsonl")
_PLAIN_FILES = ("model.pth", "last.pt", "metrics.jsonl")


@contextlib.contextmanager
def _writing(run: RunDir, command: str, files: tuple[str, ...], *, resume: bool, force: bool, what: str):
    """Hold the run folder's lock (the launching rank only) and claim the folder for this command."""
    def check() -> None:
        if resume and not run.last_path.exists():
            raise TrainingError(f"--resume: {run.path} has no last.pt to resume from")

    if os.environ.get("RANK", "0") != "0":  # torchrun's other ranks: rank 0 holds the lock and writes, but
        # every rank refuses what rank 0 refuses (read-only), so that none waits for a rank 0 that stopped
        if not force:
            claim_folder(run.path, files, resume=resume, force=False, what=what)
        check()
        yield
        return
    with locked(run.path, command):
        claim_folder(run.path, files, resume=resume, force=force, what=what)
        check()
        yield


def _settings(recipe: Recipe, arm: str, schedule: Any) -> dict[str, Any]:
    """What makes a run that run: a --resume must ask for the same arm, data and schedule."""
    d = recipe.data
    return {"arm": arm, "data.root": d.root, "data.image_size": d.image_size, "data.limit_train": d.limit_train,
            "data.val_fraction": d.val_fraction, "data.val_seed": d.val_seed, "data.crop_to_box": d.crop_to_box,
            "train.batch_size": recipe.train.batch_size, "train.seed": recipe.train.seed,
            **{f"schedule.{k}": v for k, v in dataclasses.asdict(schedule).items()
               if k in ("epochs", "optimizer", "lr", "lr_end", "schedule", "schedule_epochs")}}


def _resume(run: RunDir, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
            stage: str, settings: dict[str, Any], force: bool) -> dict:
    """Load ``last.pt`` into the model, optimiser and generators; drop the metrics of epochs it does not hold.

    Refused when ``last.pt`` was written with other ``settings`` (another arm, data or schedule) unless ``force``.
    """
    try:
        state = torch.load(run.last_path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError) as exc:  # a truncated or overwritten file
        raise CheckpointError(f"--resume: {run.last_path} cannot be read ({exc}); the run cannot continue from it: "
                              "start again with --force") from None
    check_same_run(state.get("settings"), settings, run.path, force=force)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_states(state)
    if is_main():
        trim_jsonl(run.metrics_path, stage, state["epoch"])
    log.info("resuming %s from epoch %d", run.path, state["epoch"] + 1)
    return state


def pretrain(recipe: Recipe, out: str | Path, *, resume: bool = False, force: bool = False,
             progress: bool = True) -> Path:
    """Train the recipe's plain architecture (no masks) with ``[pretrain]``; write ``model.pth`` (a state_dict).

    This makes the quickstart's "existing checkpoint", the way a user's own training would. Like
    :func:`finetune`, it keeps ``last.pt`` after each complete epoch; ``resume=True`` continues from it, and
    a folder holding another training is refused unless ``force`` replaces it.
    """
    recipe = with_model_normalization(recipe)
    run = RunDir(Path(out))
    with _writing(run, "pretrain", _PLAIN_FILES, resume=resume, force=force, what="plain training"):
        return _pretrain(recipe, run, resume, force, progress)


def _pretrain(recipe: Recipe, run: RunDir, resume: bool, force: bool, progress: bool) -> Path:
    setup = _setup(recipe, progress)
    if is_main():
        run.ensure()
    p = recipe.pretrain
    model = _prepare(build_base_model(recipe.model.arch, num_classes=len(setup.train_data.classes),
                                      weights=recipe.model.weights), setup)
    runner = _wrap_ddp(model, setup.device)
    optimizer = make_optimizer(model, p.optimizer, p.lr, recipe.train.momentum, recipe.train.weight_decay)
    settings = _settings(recipe, "plain", p)
    start = _resume(run, model, optimizer, setup.device, "pretrain", settings, force)["epoch"] + 1 if resume else 1
    for epoch in range(start, p.epochs + 1):
        train_data, val_data = setup.loaders(recipe.train.seed + epoch)
        try:
            stats = _train_epoch(runner, None, optimizer, train_data, setup, epoch=epoch, epochs=p.epochs,
                                 kappa=0.0, lr=(p.lr, p.lr_end, "cosine", p.epochs), desc=f"pretrain {epoch}/{p.epochs}")
            _check_diverged(model, stats, epoch)
        except TrainingError as exc:
            raise TrainingError(f"{exc}; the last good checkpoint is {run.last_path} (epoch {epoch - 1}): lower "
                                "pretrain.lr and run again with --resume --force") from None
        stats.update(epoch=epoch, val_acc=validate(model, val_data, setup.device, amp=setup.amp,
                                                   channels_last=setup.channels_last))
        if is_main():
            append_jsonl(run.metrics_path, {"stage": "pretrain", **stats})
            log.info("pretrain epoch %d: %s", epoch, stats)
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                         "settings": settings, **_rng_states(setup.device)}, run.last_path)
    path = run.path / "model.pth"
    if is_main():
        atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    barrier()
    return path


def calibrate(recipe: Recipe, *, progress: bool = True) -> dict:
    """Run the κ pilot alone on the recipe's ICNN model (what ``kappa = "auto"`` does at the start)."""
    recipe = with_model_normalization(recipe)
    setup = _setup(recipe, progress)
    model, architecture = build_for_recipe(recipe, arm="icnn", classes=setup.train_data.classes,
                                           image_size=recipe.data.image_size)
    _prepare(model, setup)
    _set_class_frequency(model, setup.train_data.labels.to(setup.device), architecture["num_classes"])
    filter_loss = _filter_loss(model, recipe)
    train_data, _ = setup.loaders(recipe.train.seed)
    return calibrate_kappa(model, filter_loss, train_data, setup.device, optimizer=recipe.train.optimizer,
                           batches=recipe.icnn.pilot_batches, amp=setup.amp, channels_last=setup.channels_last)


def finetune(
    recipe: Recipe,
    out: str | Path,
    *,
    arm: str = "icnn",
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    model: nn.Module | None = None,
    architecture: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Fine-tune the recipe's model as ``arm`` into run directory ``out``; return the final epoch's record.

    Writes ``recipe.toml`` (resolved), ``metrics.jsonl`` (one record per epoch), ``last.pt`` after each
    complete epoch (atomic; ``resume=True`` continues from it, with the arm, data and schedule that wrote it
    unless ``force``) and ``model.pt`` at the end. The folder is locked while the run writes; one that holds
    another run's files is refused unless ``force`` replaces them.

    Args:
        model, architecture: fine-tune this already built model (e.g. a pruned one, for recovery)
            instead of building the recipe's; ``architecture`` is its saved record.
        extra: more entries for ``model.pt`` (e.g. a pruning history).
    """
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    recipe = with_model_normalization(recipe)
    run = RunDir(Path(out))
    with _writing(run, f"finetune {arm}", _RUN_FILES, resume=resume, force=force, what="run"):
        return _finetune(recipe, run, arm, resume, force, progress, model, architecture, extra)


def _finetune(recipe: Recipe, run: RunDir, arm: str, resume: bool, force: bool, progress: bool,
              model: nn.Module | None, architecture: dict | None, extra: dict | None) -> dict:
    _check_beta_step(recipe, arm)
    if arm == "icnn" and recipe.icnn.loss == "mutual-information" and (
            recipe.icnn.peak != "argmax" or recipe.icnn.beta == "learned"):
        log.warning("icnn.loss = 'mutual-information' is the paper's loss only with the paper's mask: set "
                    "icnn.peak = 'argmax' and a fixed icnn.beta (4.0); this run uses peak %r, beta %r",
                    recipe.icnn.peak, recipe.icnn.beta)
    setup = _setup(recipe, progress)
    # Under torchrun only rank 0 writes (run directory, metrics, checkpoints); every rank reads last.pt.
    main = is_main()
    if main:
        run.ensure()
    classes = setup.train_data.classes
    if model is None:
        model, architecture = build_for_recipe(recipe, arm=arm, classes=classes, image_size=recipe.data.image_size)
    elif architecture is None:
        raise ValueError("finetune(model=...) needs the model's architecture record too")
    _prepare(model, setup)
    # A plain model (a pruned PlainCheckpoint recovering, arm "baseline") has no mask: no filter loss, no
    # per-filter statistics, the task loss alone.
    plain = architecture.get("variant") == PLAIN
    if not plain:
        _set_class_frequency(model, setup.train_data.labels.to(setup.device), architecture["num_classes"])
    t = recipe.train
    optimizer = make_optimizer(model, t.optimizer, t.lr, t.momentum, t.weight_decay)
    filter_loss = None if plain else _filter_loss(model, recipe)
    masks = {} if filter_loss is None else filter_loss.masks
    settings = _settings(recipe, arm, t)
    start = 1
    kappa0: float
    calibration: dict | None = None
    record: dict = {}
    if resume:
        state = _resume(run, model, optimizer, setup.device, "finetune", settings, force)
        start, kappa0, calibration = state["epoch"] + 1, state["kappa"], state.get("calibration")
        record = state.get("record", {})  # what model.pt keeps as "final" when every epoch had finished
        if start > t.epochs:
            log.info("%s had finished epoch %d of %d: writing model.pt from last.pt", run.path, state["epoch"],
                     t.epochs)
    elif arm != "icnn":
        kappa0 = 0.0
    elif recipe.icnn.kappa == "auto":
        train_data, _ = setup.loaders(t.seed)
        calibration = calibrate_kappa(model, filter_loss, train_data, setup.device, optimizer=t.optimizer,
                                      batches=recipe.icnn.pilot_batches, amp=setup.amp,
                                      channels_last=setup.channels_last)
        # The pilot ran on every rank on the same (unsharded) data; rank 0's verdict is the one.
        calibration = broadcast_object(calibration)
        kappa0 = calibration["kappa"]
        log.info("kappa auto: %s", calibration["reason"])
    else:
        kappa0 = float(recipe.icnn.kappa)
    if main:
        atomic_write_text(run.recipe_path, recipe_to_toml(recipe))
    initial = None
    if calibration is not None and start == 1:
        initial = {"train_loss": calibration["task_loss"],
                   "layers": {n: {"dead": d} for n, d in calibration["dead"].items()}}
    guard = CollapseGuard(enabled=recipe.icnn.collapse_guard and arm == "icnn", initial=initial,
                          r_collapse=R_COLLAPSE[t.optimizer], r_target=R_BANDS[t.optimizer][0])
    if guard.enabled and start == 1:
        _, val_data = setup.loaders(t.seed)
        _, dead = validate_filters(model, val_data, setup.device, masks, amp=setup.amp,
                                   channels_last=setup.channels_last)
        guard.last = {**(initial or {}), "layers": {n: {"dead": d} for n, d in dead.items()}}
    good = _snapshot(model, optimizer)
    epoch, diverged = start, 0  # diverged: epochs in a row that ended non-finite or exploded
    with _compiled(_wrap_ddp(model, setup.device), t.compile or t.cuda_graphs, cuda_graphs=t.cuda_graphs) as runner:
        while epoch <= t.epochs:
            kappa = kappa0 / epoch
            train_data, val_data = setup.loaders(t.seed + epoch)
            if filter_loss is not None:
                filter_loss.reset_stats()
            began = time.perf_counter()
            try:
                stats = _train_epoch(runner, filter_loss, optimizer, train_data, setup, epoch=epoch, epochs=t.epochs,
                                     kappa=kappa, lr=(t.lr, t.lr_end, t.schedule, t.schedule_epochs),
                                     desc=f"{arm} {epoch}/{t.epochs}")
                _check_diverged(model, stats, epoch)
                diverged = 0
            except TrainingError as exc:
                diverged += 1
                if not guard.enabled or diverged > 1:
                    raise TrainingError(f"{exc}; {_divergence_cause(arm, kappa0, t.lr, diverged)}; the last good "
                                        f"checkpoint is {run.last_path} (epoch {epoch - 1}): run again with "
                                        "--resume --force and the new setting") from None
                stats = {"train_loss": math.inf, "train_acc": 0.0}
            layers = {} if filter_loss is None else _epoch_stats(filter_loss)
            # The bare, eager module: under DDP each rank runs a different number of eval batches and DDP's
            # forward may hold collectives; a compiled runner would recompile for validation's recording
            # hooks, new closures every epoch.
            val_acc, dead = validate_filters(model, val_data, setup.device,
                                             masks, amp=setup.amp, channels_last=setup.channels_last)
            for name, count in dead.items():
                layers[name]["dead"] = count
            record = {"stage": "finetune", "arm": arm, "epoch": epoch, "kappa": kappa, "kappa0": kappa0,
                      "lr": optimizer.param_groups[0]["lr"], **stats, "val_acc": val_acc, "layers": layers,
                      "seconds": time.perf_counter() - began}
            # Loss and accuracy are all-reduced; the per-layer filter statistics are rank 0's share of the
            # data. Rank 0's record decides the collapse guard and the κ correction on every rank, so that
            # no rank restores or rescales alone.
            record = broadcast_object(record)
            verdict = guard.check(record)
            if verdict is not None:
                if main:
                    append_jsonl(run.metrics_path, {**record, "collapse": verdict})
                _restore(model, optimizer, good)
                kappa0 = guard.back_off(kappa0)
                log.warning("epoch %d: %s; restored epoch %d and lowered kappa0 to %.3g", epoch, verdict,
                            epoch - 1, kappa0)
                continue
            if calibration is not None and epoch == 1 and "correction" not in calibration:
                kappa0 = _correct_kappa(calibration, record, kappa0)
            good = _snapshot(model, optimizer)
            if main:
                append_jsonl(run.metrics_path, record)
                log.info("epoch %d: loss %.4f acc %.2f val %.2f", epoch, stats["train_loss"], stats["train_acc"],
                         val_acc)
                atomic_save({"model": good[0], "optimizer": good[1], "epoch": epoch, "kappa": kappa0,
                             "calibration": calibration, "record": record, "settings": settings,
                             **_rng_states(setup.device)}, run.last_path)
            epoch += 1
    guard.final_check(record)
    if not main:
        barrier()  # wait for rank 0's model.pt, so that every rank returns with the run complete
        return record
    save_model_file(
        run.model_path,
        state_dict=model.state_dict(),
        architecture=architecture,
        classes=list(classes),
        extra={
            "arm": arm,
            "kappa0": kappa0,
            "calibration": calibration,
            "recipe": recipe_to_dict(recipe),
            "choices": {"peak": recipe.icnn.peak, "beta": recipe.icnn.beta, "loss": recipe.icnn.loss,
                        "baseline": "same architecture, masks inactive, no filter loss"},
            "filter_categories": {n: m.category.tolist() for n, m in masks.items()},
            "task": {"task": recipe.icnn.task, "object": task_object(recipe.icnn)},
            "splits": {"train": len(setup.train_data), "val": len(setup.val_data) if setup.val_data is not
                       setup.train_data else 0, "val_fraction": recipe.data.val_fraction,
                       "val_seed": recipe.data.val_seed, "test": "read only by icnn evaluate"},
            "final": record,
            **(extra or {}),
        },
    )
    barrier()
    return record


def _divergence_cause(arm: str, kappa0: float, lr: float, diverged: int) -> str:
    """What to lower after a diverged epoch: the learning rate when the filter loss is off or lowering κ did
    not help (the guard already backed it off once), else either."""
    if arm != "icnn" or kappa0 == 0:
        return f"the filter loss is off in this arm, so the learning rate is the cause: lower train.lr (now {lr:g})"
    if diverged > 1:
        return (f"it diverged again after the collapse guard lowered kappa0 to {kappa0:.3g}, so the learning rate is "
                f"the likely cause: lower train.lr (now {lr:g})")
    return f"lower train.lr (now {lr:g}) or icnn.kappa (kappa0 {kappa0:.3g})"


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


def _correct_kappa(calibration: dict, record: dict, kappa0: float) -> float:
    """Close the loop once after epoch 1: rescale κ₀ so that the measured R_top lands on the target.

    METHOD.md §8's bands are for R over the first epoch; the pilot measures before any step, when the
    task gradient is not yet what training sees. R is linear in κ, so one rescaling suffices.
    """
    top = next(iter(record["layers"].values()))
    measured = top.get("R")
    low, high = calibration["band"]
    if measured is None or low <= measured <= high:
        calibration["correction"] = {"R_epoch1": measured, "factor": 1.0}
        return kappa0
    factor = calibration["target_R"] / measured
    calibration["correction"] = {"R_epoch1": measured, "factor": factor}
    log.info("kappa auto: R_top over epoch 1 was %.3g, outside %s: kappa0 %.3g -> %.3g", measured,
             calibration["band"], kappa0, kappa0 * factor)
    return kappa0 * factor


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, good: tuple[dict, dict]) -> None:
    model.load_state_dict(good[0])
    optimizer.load_state_dict(good[1])


class _compiled:
    """Context yielding ``torch.compile(model)`` when asked; the filter-loss hooks stay eager
    (``InterpretableMask._run_hook``) and call their own compiled functions, so the graphs compile once and
    are reused every step. ``cuda_graphs``: mode "reduce-overhead", each graph replayed as a CUDA graph."""

    def __init__(self, model: nn.Module, enabled: bool, *, cuda_graphs: bool = False) -> None:
        self.model, self.enabled, self.cuda_graphs = model, enabled, cuda_graphs

    def __enter__(self) -> nn.Module:
        if not self.enabled:
            return self.model
        return torch.compile(self.model, mode="reduce-overhead" if self.cuda_graphs else None)

    def __exit__(self, *exc) -> bool:
        return False


def load_run_model(
    run: str | Path | PlainCheckpoint, *, device: str | torch.device = "cpu", trust_code: bool = False
) -> tuple[nn.Module, dict]:
    """Load a run's ``model.pt`` (or a model file path) into a fresh model; return it and the saved record.

    A pruned model file (``icnn prune``) also holds ``"pruning"``, the pruning history: the model is
    rebuilt from its architecture record, the history replayed on torch-pruning's dependency graph to
    give it the pruned shapes, then the weights loaded.

    ``trust_code`` lets the file's ``"module:builder"`` arch be imported when no installed package registers it
    (:func:`~icnn_compress.surgery.build_model`); a file from elsewhere runs code only so.
    """
    if isinstance(run, PlainCheckpoint):  # a model no icnn run made: its weights, no model file
        model, saved = run.load()
        return model.to(device).eval(), saved
    path = Path(run)
    path = path / "model.pt" if path.is_dir() else path
    saved = load_model_file(path)
    model = build_model(saved["architecture"], trust_code=trust_code, source=str(path))
    if saved.get("pruning"):
        # Imported here: replaying a history is the prune stage's business (and needs torch-pruning),
        # while every run that was never pruned loads without it.
        from .prune import apply_pruning_history

        apply_pruning_history(model, saved["pruning"])
    load_state_dict_checked(model, saved["state_dict"], source=str(path))
    return model.to(device).eval(), saved
