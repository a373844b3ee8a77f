"""The knobs of a comparison, in one frozen dataclass that is written into ``compare.json``."""

from __future__ import annotations

from dataclasses import dataclass

from icnn_compress.errors import CompareError  # re-exported: compare.CompareError

__all__ = ["TARGETS", "CompareError", "CompareSettings"]


TARGETS = ("label", "pred")


@dataclass(frozen=True)
class CompareSettings:
    """Settings of :func:`~icnn_compress.compare.compare`.

    The defaults are sized for the 64-px quickstart on two CPU cores (about 5 s per image and model for
    every explainer, most of it deletion / insertion and occlusion); on a GPU raise ``steps`` (16-50),
    ``ig_steps`` (32-50), ``smoothgrad_samples`` (16-50), ``robust_images`` and halve
    ``occlusion_stride``.

    Args:
        target: the class each map explains: ``"label"`` (the true class, the default: the class whose
            filters should light up, and the pointing game's usual choice) or ``"pred"`` (predicted).
        radius: pointing-game tolerance as a fraction of the image side (0.1 → 6.4 px at 64 px).
        steps: deletion / insertion steps ``k``.
        blur_sigma: σ in pixels of the blurred image insertion starts from; ``None``: ``S / 32``.
        batch_size: images per batch of the streamed dataset.
        internal_batch_size: examples per forward inside Captum (IG and conductance steps, occlusion
            windows and SmoothGrad samples are batched up to this many images).
        ig_steps: integration steps of Integrated Gradients (zero baseline: the mean colour).
        conductance_steps: integration steps of layer conductance.
        occlusion_window, occlusion_stride: occlusion patch side and stride as fractions of the side.
        smoothgrad_samples: noisy samples of SmoothGrad.
        smoothgrad_noise: SmoothGrad's σ as a fraction of the input range (Smilkov et al. use 0.1-0.2).
        robust_images: images (the first of the stream) on which Captum's ``infidelity`` and
            ``sensitivity_max`` are computed: they cost tens of explanations per image.
        infidelity_samples, infidelity_noise: perturbations per image and their Gaussian σ (input units).
        sensitivity_samples, sensitivity_radius: perturbations per image and the L∞ radius (input units).
        seed: seeds every random choice (tie-breaks, the random map, noise): results are reproducible.
    """

    target: str = "label"
    radius: float = 0.1
    steps: int = 10
    blur_sigma: float | None = None
    batch_size: int = 16
    internal_batch_size: int = 256
    ig_steps: int = 16
    conductance_steps: int = 8
    occlusion_window: float = 1 / 8
    occlusion_stride: float = 1 / 8
    smoothgrad_samples: int = 8
    smoothgrad_noise: float = 0.15
    robust_images: int = 8
    infidelity_samples: int = 8
    infidelity_noise: float = 0.1
    sensitivity_samples: int = 4
    sensitivity_radius: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise CompareError(f"target must be one of {TARGETS}, got {self.target!r}")
        if not 0 < self.radius:
            raise CompareError(f"radius is a fraction of the image side and must be positive, got {self.radius}")
        for name in ("steps", "batch_size", "internal_batch_size", "ig_steps", "conductance_steps",
                     "smoothgrad_samples", "infidelity_samples", "sensitivity_samples"):
            if getattr(self, name) < 1:
                raise CompareError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.robust_images < 0:
            raise CompareError(f"robust_images must be >= 0 (0 skips infidelity and sensitivity), got {self.robust_images}")
