"""Plain pre-training (no masks): the "existing checkpoint" of the quickstart, trained the way a user would."""

from __future__ import annotations

import logging
from pathlib import Path


from icnn_compress.config import Recipe
from icnn_compress.errors import TrainingError
from icnn_compress.models.registry import build_base_model, with_model_normalization
from icnn_compress.runs.model_file import RunDir
from icnn_compress.runtime.device import rng_states
from icnn_compress.runtime.distributed import barrier, is_main
from icnn_compress.runtime.files import append_jsonl, atomic_save

from ._loop import _check_diverged, _prepare, _train_epoch, _wrap_ddp, make_optimizer, validate
from ._resume import _PLAIN_FILES, _resume, _settings, _writing
from ._setup import _setup

log = logging.getLogger(__name__)


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
            log.info("pretrain epoch %d: loss %.4f acc %.2f%% val %.2f%%", epoch, stats["train_loss"],
                     100 * stats["train_acc"], 100 * stats["val_acc"])
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                         "settings": settings, **rng_states(setup.device)}, run.last_path)
    path = run.path / "model.pth"
    if is_main():
        atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    barrier()
    return path
