"""Modality augmentation: random intensity remaps that make a patch's contrast unreliable, so that meta-training on
CT (and T1) learns features that still hold in another modality (a T2 MR query of a CT-trained organ).

The remap is drawn per patch: a random non-linear monotonic curve (MONAI's ``RandHistogramShift``), a random gamma
(``RandAdjustContrast``), and with probability ``invert_prob`` a sign flip of the z-scored intensities (bright
becomes dark, as fat and fluid do between CT and T2 MR); the patch is z-scored again after.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandHistogramShiftd,
    RandomizableTransform,
)

__all__ = ["RandInvertIntensity", "RandInvertIntensityd", "modality_augmentation"]


class RandInvertIntensity(RandomizableTransform):
    """``-x`` with probability ``prob`` (for z-scored images: the contrast inverted about the mean)."""

    def __init__(self, prob: float = 0.5) -> None:
        RandomizableTransform.__init__(self, prob)

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize(None)
        return -img if self._do_transform else img


class RandInvertIntensityd(MapTransform, RandomizableTransform):
    """Dictionary version of :class:`RandInvertIntensity`: one draw for all ``keys``."""

    def __init__(self, keys: KeysCollection, prob: float = 0.5, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        for key in self.key_iterator(d):
            if self._do_transform:
                d[key] = -d[key]
        return d


def modality_augmentation(keys: KeysCollection = "image", prob: float = 0.8, invert_prob: float = 0.5) -> Compose:
    """The random remap of the module docstring, for z-scored images under ``keys``; z-scores again at the end.

    Args:
        keys: image keys (not labels).
        prob: probability of the histogram shift and of the gamma.
        invert_prob: probability of the sign flip.
    """
    return Compose([
        RandHistogramShiftd(keys=keys, num_control_points=(5, 10), prob=prob),
        RandAdjustContrastd(keys=keys, gamma=(0.5, 2.0), prob=prob),
        RandInvertIntensityd(keys=keys, prob=invert_prob),
        NormalizeIntensityd(keys=keys),
    ])
