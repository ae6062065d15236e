"""Registration as a data engine (``atlas_selftrain``) on a real BTCV CT: a carried mask that is off by a few voxels
is pulled back toward the true organ by the appearance model learned from it, a carried mask that is right stays
right, results are deterministic, and bad settings are named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monai_metalearn.learners import AtlasSelfTrainingSegmenter, create_segmentation_learner, self_training_posterior
from monai_metalearn.metrics import binary_dice

FAST = {"spacing": 5.0, "levels": (2, 1), "iterations": (30, 20), "affine_iterations": (40, 20),
        "initial_refine_iterations": 10}


def _dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    return float(binary_dice(pred.reshape(1, 1, *pred.shape[-3:]).long(), truth.reshape(1, 1, *truth.shape[-3:]).long()))


@pytest.fixture(scope="module")
def spleen(ct4):
    return ct4["image"].as_tensor().float(), ct4["label"].as_tensor()[0] == 1


@pytest.mark.parametrize("error", ["shift", "dilate"])
def test_a_misplaced_carried_mask_is_corrected_toward_the_organ(spleen, error):
    """The spleen of BTCV 7 at 4 mm, carried with a registration error (shifted 2 voxels = 8 mm along two axes, or
    2 voxels too large): the learned appearance model gives a mask closer to the truth than the carried one, by a clear margin."""
    image, truth = spleen
    if error == "shift":
        carried = torch.roll(truth, shifts=(2, -2), dims=(0, 1)).float()
    else:
        carried = F.max_pool3d(truth.float()[None, None], 5, 1, 2)[0, 0]
    before = _dice(carried >= 0.5, truth)
    after = _dice(self_training_posterior(carried[None], image, steps=150) > 0.5, truth)
    assert after > before + 0.08, (before, after)


def test_a_right_carried_mask_stays_right_and_runs_are_deterministic(spleen):
    image, truth = spleen
    p1 = self_training_posterior(truth.float()[None], image, steps=100)
    p2 = self_training_posterior(truth.float()[None], image, steps=100)
    assert torch.equal(p1, p2)
    assert _dice(p1 > 0.5, truth) > 0.85
    idx = truth.nonzero()
    box = tuple(slice(max(0, int(a) - 8), int(b) + 9) for a, b in zip(idx.min(0).values, idx.max(0).values))
    outside = p1[0].clone()
    outside[box] = 0
    assert float(p1[0][box].max()) > 0.5 and not bool(outside.any())  # nothing outside the training box


def test_the_learner_carries_a_scan_onto_itself(ct5):
    mask = (ct5["label"] == 6).float()
    learner = create_segmentation_learner("atlas_selftrain", registration=FAST, spacing=(5.0, 5.0, 5.0), steps=80)
    assert isinstance(learner, AtlasSelfTrainingSegmenter) and not learner.trainable
    pred = learner.adapt([ct5["image"]], [mask])(ct5["image"][None]).argmax(1, keepdim=True)
    assert float(binary_dice(pred, mask[None].long())) > 0.9


def test_empty_carried_masks_and_bad_settings():
    assert not bool(self_training_posterior(torch.zeros(1, 6, 6, 6), torch.rand(1, 6, 6, 6)).any())
    with pytest.raises(ValueError, match="differ"):
        self_training_posterior(torch.zeros(1, 6, 6, 6), torch.rand(1, 6, 6, 7))
    with pytest.raises(ValueError, match="margin"):
        AtlasSelfTrainingSegmenter(margin=-1)
    with pytest.raises(ValueError, match="steps"):
        AtlasSelfTrainingSegmenter(steps=0)


@pytest.mark.parametrize("name", ["atlas", "multiatlas", "atlas_em", "atlas_selftrain"])
def test_the_bundle_builds_every_atlas_learner_with_its_defaults(name):
    """The segmentation bundle's ``learner_defaults`` (``similarity``, ``spacing`` ... are AtlasSegmenter arguments
    reached through ``**kwargs``) are accepted, and a wrong key is still a one-line ConfigError."""
    import json
    from pathlib import Path

    from monai_metalearn.apps.segmentation import build_segmentation_learner
    from monai_metalearn.errors import ConfigError

    cfg = json.loads((Path(__file__).parents[2] / "bundles/fewshot_segmentation_3d/configs/train.json").read_text())
    defaults = {name: {k: ([2.0, 2.0, 2.0] if v == "@pixdim" else v) for k, v in cfg["learner_defaults"][name].items()}}
    learner = build_segmentation_learner(name, None, 16, [], defaults, {"seed": 3})
    assert learner.spacing == (2.0, 2.0, 2.0) and learner.seed == 3 and learner.similarity == "auto"
    with pytest.raises((ConfigError, SystemExit), match="no_such"):
        build_segmentation_learner(name, None, 16, [], defaults, {"no_such": 1})
