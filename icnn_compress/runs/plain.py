"""A model that no ``icnn`` run made (an architecture and a ``.pth``), taken by analyze, evaluate, prune and export.

"What is dead weight in my model?" comes before any fine-tuning: :class:`PlainCheckpoint` names the
architecture, the checkpoint and the data, and :func:`~icnn_compress.runs.open.load_run_model` turns it into the
model and the record a run's ``model.pt`` would hold (architecture variant ``"plain"``: no masks, no new
conv; the recipe defaults with this model and data). A pruned plain model is saved as a run (``icnn prune``)
and loads like one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from icnn_compress.config import DataConfig, ModelConfig, Recipe, recipe_to_dict
from icnn_compress.errors import CheckpointError, ModelError
from icnn_compress.models.registry import ARCHITECTURES, PLAIN, build_base_model
from icnn_compress.models.state_dict import load_state_dict_checked, read_state_dict

__all__ = ["PlainCheckpoint"]


@dataclass(frozen=True)
class PlainCheckpoint:
    """A plain CNN's weights and the data to measure it on, in place of a run directory.

    Args:
        arch: a registered torchvision name (``mobilenet_v2``) or a user builder ``"package.module:fn"``
            (called with ``num_classes``), as ``model.arch`` in a recipe.
        checkpoint: the ``.pth`` (a state_dict, or a dict holding one under ``state_dict``/``model``).
        data: where the images are and how they are read; the model's class count must be the data's.
        top_layer: the module analysed by default (None: the architecture's top conv for a registered
            torchvision name; a user builder then needs ``layers`` given to the analysis).
    """

    arch: str
    checkpoint: str | Path
    data: DataConfig
    top_layer: str | None = None

    @classmethod
    def on_folder(cls, arch: str, checkpoint: str | Path, data_root: str | Path, *, image_size: int = 224,
                  top_layer: str | None = None) -> PlainCheckpoint:
        """The checkpoint measured on the dataset folder ``data_root`` (any layout: ``data.format = "auto"``)
        at ``image_size``, read whole, with the recipe defaults for everything else (ImageNet normalisation)."""
        from icnn_compress.config import recipe_from_dict

        # Through the recipe checks, so that a bad size is the same one-line error as in a recipe.
        data = recipe_from_dict({"data": {"root": str(data_root), "image_size": image_size}},
                                source="--data/--image-size").data
        if not Path(checkpoint).is_file():
            raise CheckpointError(f"the checkpoint {checkpoint} does not exist or is not a file; pass the .pth "
                                  "of your model with --checkpoint")
        return cls(arch=arch, checkpoint=checkpoint, data=data, top_layer=top_layer)

    def __fspath__(self) -> str:
        return os.fspath(self.checkpoint)

    def __str__(self) -> str:
        return os.fspath(self.checkpoint)

    def recipe(self) -> Recipe:
        """The recipe defaults with this model and data (prune's recovery trains with its ``[train]``)."""
        return Recipe(model=ModelConfig(arch=self.arch, checkpoint=str(self.checkpoint), top_layer=self.top_layer,
                                        new_conv=False),
                      data=self.data)

    def load(self) -> tuple[nn.Module, dict[str, Any]]:
        """Build the model with the checkpoint's weights; return it and its model-file record (no state_dict)."""
        from icnn_compress.data.recipe import open_split

        classes = list(open_split(self.data, "test", progress=False).classes)
        model = build_base_model(self.arch, num_classes=len(classes))
        try:
            load_state_dict_checked(model, read_state_dict(self.checkpoint), source=str(self.checkpoint))
        except CheckpointError as err:
            if "classes but the model has" not in str(err):
                raise CheckpointError(str(err).replace("check model.arch", f"check the architecture ({self.arch}, "
                                                       "--model on the command line)")) from None
            raise CheckpointError(f"{self.checkpoint} is a classifier of another class count than the "
                                  f"{len(classes)} classes of {self.data.root}; measure a model on the classes it "
                                  "was trained on (or fine-tune it first: icnn finetune with model.reset_head)") from None
        top = self.top_layer
        spec_top = ARCHITECTURES[self.arch].top_layer if self.arch in ARCHITECTURES else None
        if top is None and spec_top is not None:  # a registered layout names it (None: found, for masks only)
            top = spec_top(model)
        if top is not None and top not in dict(model.named_modules()):
            raise ModelError(f"{self.arch} has no module named {top!r}; pass a name from model.named_modules()")
        architecture = {"arch": self.arch, "num_classes": len(classes), "image_size": self.data.image_size,
                        "variant": PLAIN, "masks": [], "top_layer": top, "new_conv": False}
        return model, {"architecture": architecture, "classes": classes, "recipe": recipe_to_dict(self.recipe()),
                       "arm": PLAIN, "source": str(self.checkpoint)}
