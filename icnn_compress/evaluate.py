"""The ``icnn evaluate`` stage: a run's model measured on a split of its dataset, written to ``evaluate.json``.

The measures themselves are :func:`icnn_compress.method.evaluation.evaluate`.
"""

from __future__ import annotations

import json
from pathlib import Path


import torch

from icnn_compress.data.recipe import task_object
from icnn_compress.method.evaluation import evaluate
from icnn_compress.method.protocol import class_rule_for, learned_classes
from icnn_compress.runs.folder import check_output
from icnn_compress.runs.open import default_layers, open_run, say_what_needs_landmarks
from icnn_compress.runs.results import EvaluateResult
from icnn_compress.runtime.device import resolve_device
from icnn_compress.runtime.files import atomic_write_text
from icnn_compress.runtime.loader import make_loader

__all__ = ["evaluate", "evaluate_run"]


def evaluate_run(
    run: str | Path,
    *,
    data_root: str | Path | None = None,
    split: str = "test",
    protocol: str | None = None,
    json_path: str | Path | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
    trust_code: bool = False,
) -> EvaluateResult:
    """Evaluate a run directory's ``model.pt`` on a split of its dataset (or ``data_root``).

    Measures every masked layer of the model under ``protocol`` (None: the recipe's ``eval.protocol``,
    ``official`` by default; :mod:`icnn_compress.method.protocol`), adds what the run recorded (``arm``,
    ``kappa0``, dead filters per layer at the last epoch, the task), the ``split`` and the ``data_root``
    (None: the run's own data), and writes the result atomically to ``json_path`` when given. A
    single-category run is measured on the object's images, and its accuracy is the binary one.
    ``trust_code``: see :func:`~icnn_compress.runs.open.load_run_model`.
    """
    if json_path is not None:
        check_output(json_path)
    dev = resolve_device(str(device))
    model, saved, recipe, dataset = open_run(run, data_root=data_root, split=split, device=dev, progress=progress,
                                             trust_code=trust_code)
    say_what_needs_landmarks(dataset, "icnn evaluate")
    protocol = protocol or recipe.eval.protocol
    layers = default_layers(saved["architecture"], run)
    rule = class_rule_for(protocol)
    categories = learned_classes(model, layers) if rule == "learned" else None
    obj = task_object(recipe.icnn)
    loader = make_loader(dataset, batch_size=recipe.train.eval_batch_size, shuffle=False, seed=0,
                         workers=recipe.data.num_workers, device=dev)
    result = evaluate(model, loader, layers=layers, filter_category=categories, classes=dataset.classes,
                      landmark_names=dataset.landmark_names, image_size=dataset.image_size, protocol=protocol,
                      class_rule=None if rule == "learned" else rule, architecture=saved["architecture"],
                      single_category=None if obj is None else 1, device=dev, top_k=recipe.eval.top_k,
                      progress=progress)
    final_layers = (saved.get("final") or {}).get("layers", {})
    for name, entry in result["layers"].items():
        if "dead" in final_layers.get(name, {}):
            entry["dead"] = final_layers[name]["dead"]
    result.update(split=split, data_root=None if data_root is None else str(data_root), run=str(run),
                  arm=saved.get("arm"), kappa0=saved.get("kappa0"),
                  task={"task": recipe.icnn.task, "object": obj})
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result
