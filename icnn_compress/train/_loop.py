"""The training loop's parts: the learning-rate schedule, one epoch, validation, divergence checks, DDP and compile wrappers."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from icnn_compress.errors import TrainingError
from icnn_compress.method.anchor import anchored
from icnn_compress.method.filter_loss import FilterLoss
from icnn_compress.method.mask_sync import all_reduce_mask_state
from icnn_compress.runtime.distributed import all_reduce_sum, is_distributed

from ._setup import _Setup


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


def _to(batch: dict, device: torch.device, channels_last: bool, hflip: bool = False
        ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The batch's images and labels on ``device``, and which images ``hflip`` flipped ((B,) bool, or None)."""
    images = batch["image"].to(device, non_blocking=True)
    flip = None
    if hflip:  # training-only augmentation
        flip = torch.rand(images.shape[0], device=device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["label"].to(device, non_blocking=True), flip


def _maybe_anchored(model: nn.Module, batch: dict, flip: Tensor | None, setup: _Setup, parts: Sequence[int] | None):
    """``icnn.anchor = "landmarks"``: this batch's landmarks (flipped with their images) anchor the masks' µ̂."""
    if parts is None:
        return contextlib.nullcontext()
    size = setup.recipe.data.image_size
    xy = batch["landmarks"].to(setup.device)  # (B, K, 2)
    if flip is not None:  # the image spans [0, S]: a flipped point's x is S − x
        xy = torch.where(flip[:, None, None], torch.stack((size - xy[..., 0], xy[..., 1]), dim=-1), xy)
    return anchored(model, xy, batch["visible"].to(setup.device), image_size=size, parts=parts)


@torch.inference_mode()
def validate(model: nn.Module, data: DataLoader, device: torch.device, *, amp: bool, channels_last: bool) -> float:
    """Top-1 accuracy of ``model`` on ``data``, a fraction in [0, 1]."""
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    total = 0
    for batch in data:
        images, labels, _ = _to(batch, device, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        correct += (logits.argmax(dim=1) == labels).sum()
        total += labels.numel()
    if is_distributed():  # each rank saw its own shard of the split (see loader)
        counts = all_reduce_sum(torch.stack((correct, torch.tensor(total, device=device))))
        correct, total = counts[0], int(counts[1])
    return correct.item() / max(total, 1)


def validate_filters(
    model: nn.Module, data: DataLoader, device: torch.device, masks: dict[str, nn.Module], *, amp: bool,
    channels_last: bool,
) -> tuple[float, dict[str, int]]:
    """Accuracy (a fraction) and, per masked layer, the filters silent on every validation image (dead).

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
    anchor_parts: Sequence[int] | None = None,
) -> dict:
    """One epoch; returns host-side loss and accuracy. Raises TrainingError on a non-finite loss.

    ``anchor_parts``: the landmark indices the masks' µ̂ is anchored on (``icnn.anchor``), or None.
    """
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
        images, labels, flip = _to(batch, device, setup.channels_last, setup.recipe.data.hflip)
        with (_maybe_filter_loss(filter_loss, labels, kappa, optimizer.param_groups[0]["lr"],
                                 setup.recipe.train.momentum),
              _maybe_anchored(model, batch, flip, setup, anchor_parts)):
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
    return {"train_loss": float(total_loss) / max(seen, 1), "train_acc": float(correct) / max(seen, 1)}


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
