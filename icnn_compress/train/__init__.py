"""Fine-tuning: plain pre-training, the ICNN / masks-only / baseline arms, resume, NaN and collapse guards.

One loop serves every arm so that comparisons differ only in what the arm changes:

* ``icnn`` — masks active, filter loss at κ_t = κ₀ / epoch (κ₀ measured by the pilot when "auto");
* ``masks-only`` — masks active, κ = 0 (METHOD.md §8: most of the new layer's gain is the mask);
* ``baseline`` — identical modules with inactive masks and no filter loss.

The package: ``_setup`` (devices, splits, the model built for an arm), ``_loop`` (one epoch, validation,
the schedule), ``_resume`` (run folders, ``last.pt``), ``_finetune`` and ``_pretrain`` (the two commands).
"""

from ._finetune import ARMS, calibrate, finetune
from ._loop import lr_at, make_optimizer, validate
from ._pretrain import pretrain
from ._setup import build_for_recipe

__all__ = ["ARMS", "build_for_recipe", "calibrate", "finetune", "lr_at", "make_optimizer", "pretrain", "validate"]
