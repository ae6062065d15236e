"""Every segmentation learner learns on the real scans: Dice on a fixed real episode rises after a few meta-steps.

The episodes are real: liver patches of TotalSegmentator CT-1 and CT-2 (support from one subject, query from the
other), cut by the bundle's own transforms at 3 mm. The network is a small MONAI UNet so that the file runs in about a
minute on one CPU thread.
"""

from __future__ import annotations

import math

import pytest
import torch
from monai.data import Dataset

from monai_metalearn.errors import ConfigError
from monai_metalearn.apps import segmentation as seg
from monai_metalearn.data import SegmentationEpisodeDataset
from monai_metalearn.engines import default_prepare_episode
from monai_metalearn.metrics import binary_dice
from monai_metalearn.networks import unet_backbone

STRUCTURES = ["liver", "spleen"]
PATCH = (24, 24, 24)
DEFAULTS = {
    "maml": {"inner_lr": 0.1, "inner_steps": 1, "eval_inner_steps": 5},
    "fomaml": {"inner_lr": 0.1, "inner_steps": 2, "eval_inner_steps": 5},
    "anil": {"inner_lr": 0.5, "inner_steps": 3, "eval_inner_steps": 10},
    "reptile": {"inner_lr": 0.003, "inner_steps": 3, "inner_optimizer": "adam", "eval_inner_steps": 5},
    "protoseg": {},
    "finetune": {"finetune_steps": 5, "finetune_lr": 0.003},
    "scratch": {"finetune_steps": 5, "finetune_lr": 0.003},
}


@pytest.fixture(scope="module")
def subjects(data_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("seg_cache")
    return seg.load_segmentation_subjects(
        str(data_dir), ["totalseg_ct1", "totalseg_ct2"], STRUCTURES, pixdim=(3.0, 3.0, 3.0), progress=False,
        cache_dir=cache,
    )


@pytest.fixture(scope="module")
def episodes(subjects):
    data = Dataset(subjects, transform=seg.subject_transforms())
    train = SegmentationEpisodeDataset(data, ["liver"], 1, 1, 8, episode_transform=seg.patch_transforms(PATCH, 4), seed=3)
    fixed = SegmentationEpisodeDataset(data, ["liver"], 1, 1, 2, episode_transform=seg.patch_transforms(PATCH, 4),
                                       seed=99, balanced=True)
    return train, [fixed[i] for i in range(len(fixed))]


def _fixed_dice(learner, fixed) -> float:
    values = []
    learner.eval()
    for ep in fixed:
        sx, sy, qx, qy = default_prepare_episode(ep, "cpu")
        with torch.enable_grad():
            predictor = learner.adapt(sx, sy)
        with torch.no_grad():
            pred = predictor(qx).argmax(1)
        # Dice pooled over the query patches (background-only patches would otherwise score 1 for an empty mask)
        values.append(float(binary_dice(pred.reshape(1, -1), (qy != 0).reshape(1, -1))))
    learner.train()
    return sum(values) / len(values)


def _learner(name: str):
    torch.manual_seed(0)
    backbone = unet_backbone(feature_channels=8, channels=(8, 16, 32), strides=(2, 2), num_res_units=0)
    return seg.build_segmentation_learner(name, backbone, 8, STRUCTURES, DEFAULTS)


def test_subjects_are_real_and_resampled(subjects):
    names = [s["subject"] for s in subjects]
    assert names == ["totalseg_ct1", "totalseg_ct2"]
    ct1 = subjects[0]
    assert tuple(ct1["image"].shape) == (1, 122, 101, 112)  # CT-1 is already 3 mm
    assert 0.0 <= float(ct1["image"].min()) and float(ct1["image"].max()) <= 1.0
    assert set(ct1["structures"]) == set(STRUCTURES)
    # the liver holds thousands of voxels at 3 mm in CT-1 (a whole liver: about 1.5 litres)
    liver = int((ct1["label"] == ct1["structures"]["liver"]).sum())
    assert 1.0 < liver * 27 / 1e6 < 3.0


def test_cross_subject_episode(episodes):
    train, fixed = episodes
    for ep in fixed:
        assert ep["support_subject"] != ep["query_subject"]
        assert tuple(ep["support_image"].shape) == (4, 1, *PATCH)
        assert float(ep["support_label"].sum()) > 0  # positive crops hold the organ
    # the two fixed episodes take the two query subjects in turn
    assert {fixed[0]["query_subject"][0], fixed[1]["query_subject"][0]} == {"totalseg_ct1", "totalseg_ct2"}


@pytest.mark.parametrize("name", ["protoseg", "finetune", "maml", "fomaml", "anil", "reptile"])
def test_dice_rises_after_meta_steps(name, episodes):
    train, fixed = episodes
    learner = _learner(name)
    before = _fixed_dice(learner, fixed)
    opt = torch.optim.Adam(learner.parameters(), 3e-3)
    prepare = seg.prepare_segmentation_episode_for(name, STRUCTURES)
    losses = []
    for i in range(len(train)):
        metrics = learner.meta_batch_step([prepare(train[i], "cpu")], opt)
        losses.append(metrics["loss"])
    after = _fixed_dice(learner, fixed)
    assert all(math.isfinite(v) for v in losses)
    assert after > before + 0.05, f"{name}: Dice {before:.3f} -> {after:.3f}"


def test_scratch_baseline_has_nothing_to_meta_train(episodes):
    train, fixed = episodes
    learner = _learner("scratch")
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    learner.meta_batch_step([default_prepare_episode(train[0], "cpu")], torch.optim.Adam(learner.parameters(), 1e-2))
    assert all(torch.equal(state[k], v) for k, v in learner.state_dict().items())
    # adapting from scratch on one real support scan already finds some of the organ
    assert 0.0 <= _fixed_dice(learner, fixed) <= 1.0


def test_windows_without_content_are_background():
    """A network that calls everything foreground: the guarded sliding window keeps it only where the image varies."""

    def everything(x):
        return torch.stack([torch.zeros_like(x[:, 0]), torch.ones_like(x[:, 0])], 1)

    image = torch.zeros(1, 1, 64, 32, 32)
    image[:, :, :32] = torch.rand(1, 1, 32, 32, 32)  # tissue in the first half, air (constant) in the second
    guarded = seg.sliding_window_inferer((32, 32, 32), overlap=0.0)(image, everything).argmax(1)
    plain = seg.sliding_window_inferer((32, 32, 32), overlap=0.0, guard_empty=False)(image, everything).argmax(1)
    assert bool(plain.all())
    assert bool(guarded[:, :32].all()) and not bool(guarded[:, 32:].any())


def test_largest_component_keeps_the_biggest_blob_of_each_sample():
    pred = torch.zeros(3, 1, 12, 12, 12, dtype=torch.uint8)
    pred[0, 0, 1:5, 1:5, 1:5] = 1  # 64 voxels
    pred[0, 0, 8:10, 8:10, 8:10] = 1  # 8 voxels, apart: removed
    pred[1, 0, 8:10, 8:10, 8:10] = 1  # the only blob of sample 1: kept although smaller than sample 0's
    pred[1, 0, 10, 10, 10] = 1  # touches it diagonally (full connectivity): kept
    kept = seg.largest_component(pred)
    assert kept.dtype == pred.dtype and kept.shape == pred.shape
    assert int(kept[0].sum()) == 64 and not bool(kept[0, 0, 8:, 8:, 8:].any())
    assert int(kept[1].sum()) == 9
    assert not bool(kept[2].any())  # empty stays empty


def test_mask_postprocess_flag():
    assert seg.mask_postprocess(True) is seg.largest_component and seg.mask_postprocess(False) is None
    with pytest.raises(ConfigError, match="keep_largest_component must be true or false, got 'false'"):
        seg.mask_postprocess("false")


def test_intensity_scaling_by_modality(subjects):
    ct = torch.tensor([[-1000.0, -250.0, 50.0, 350.0, 2000.0]])
    assert seg.scale_intensity(ct, "CT")[0].tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    assert seg.guess_modality(ct) == "CT" and seg.guess_modality(ct.clamp(min=0)) == "MR"
    mr = torch.cat([torch.zeros(1000), torch.linspace(10, 1010, 1001)])  # skull-stripped: zero background
    scaled = seg.scale_intensity(mr, "MR")
    assert float(scaled[:1000].max()) == 0.0 and float(scaled.max()) == 1.0
    assert float(scaled[1000 + 500]) == pytest.approx(0.5, abs=0.01)  # percentiles of the non-zero voxels
