"""The elastix reference engine (itk-elastix, in the ``test`` extra) on a real CT moved by a known translation."""

from __future__ import annotations

import pytest
import torch

from monai_metalearn.apps.pairs import pair_dice
from monai_metalearn.registration.elastix import elastix_available, elastix_register


def test_elastix_is_installed_with_the_test_extra():
    assert elastix_available()


def test_elastix_recovers_a_translation_and_carries_the_label(ct5):
    from monai.data import MetaTensor

    image, label = ct5["image"], ct5["label"]
    shift = (3, -2, 2)  # voxels of 5 mm
    moved_image = MetaTensor(torch.roll(image.as_tensor(), shift, dims=(1, 2, 3)), affine=image.affine)
    moved_label = MetaTensor(torch.roll(label.as_tensor(), shift, dims=(1, 2, 3)), affine=label.affine)
    liver = (label == 6).to(torch.uint8)  # BTCV label 6: liver
    before = pair_dice((moved_label == 6).to(torch.uint8), liver)
    result = elastix_register(moved_image, image, parameter_maps=("translation",), threads=2)
    carried = result.warp_label(moved_label)
    assert carried.shape == label.shape and carried.dtype == label.dtype
    assert torch.allclose(torch.as_tensor(carried.affine, dtype=torch.float64),
                          torch.as_tensor(image.affine, dtype=torch.float64))
    after = pair_dice((carried == 6).to(torch.uint8), liver)
    assert before < 0.8 and after > 0.9, (before, after)
    assert result.seconds > 0 and result.parameter_maps == ("translation",)


def test_elastix_needs_meta_tensors(ct5):
    with pytest.raises(ValueError, match="MetaTensors"):
        elastix_register(torch.zeros(1, 8, 8, 8), ct5["image"])
