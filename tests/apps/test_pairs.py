"""Fixed (support, query) pairs: the atlas-choice rule, masks by structure name, Dice, and ``segment_pair`` on a real
BTCV pair with the whole-volume references."""

from __future__ import annotations

import pytest
import torch

from monai_metalearn.apps.pairs import next_subjects, pair_dice, segment_pair, subject_mask
from monai_metalearn.learners import create_segmentation_learner


def test_next_subjects_follow_the_query_cyclically_and_never_return_it():
    pool = ["b", "d", "a", "c"]
    assert next_subjects("b", pool, 2) == ["c", "d"]
    assert next_subjects("d", pool, 2) == ["a", "b"]  # wraps around
    assert next_subjects("x", pool, 1) == ["a"]  # after the last one: the first
    assert next_subjects("x", ["a", "y"], 1) == ["y"]  # a query outside the pool: the next in sorted order
    assert next_subjects("a", pool, 10) == ["b", "c", "d"]  # at most every other subject
    with pytest.raises(ValueError, match="no subject besides 'a'"):
        next_subjects("a", ["a"], 1)


def test_pair_dice_values():
    a = torch.zeros(1, 4, 4, 4, dtype=torch.uint8)
    b = torch.zeros_like(a)
    assert pair_dice(a, b) == 1.0  # both empty
    a[0, :2] = 1
    assert pair_dice(a, b) == 0.0
    b[0, 1:3] = 1  # overlap of one slab of 16 voxels; 32 + 32 voxels
    assert pair_dice(a, b) == pytest.approx(2 * 16 / 64)
    assert pair_dice(a, a) == 1.0


@pytest.fixture(scope="module")
def btcv_pair(data_dir):
    from monai_metalearn.apps.segmentation import load_segmentation_subjects

    subjects = load_segmentation_subjects(data_dir, ["btcv_sabs"], ["liver", "spleen"], (6.0, 6.0, 6.0),
                                          progress=False)
    by_id = {s["subject"]: s for s in subjects}
    assert len(by_id) == 20
    ids = sorted(by_id)
    return by_id[ids[0]], by_id[ids[1]]


def test_subject_mask_reads_the_named_structure_and_names_a_missing_one(btcv_pair):
    support, _ = btcv_pair
    liver, spleen = subject_mask(support, "liver"), subject_mask(support, "spleen")
    assert liver.shape == support["label"].shape and liver.dtype == torch.float32
    assert 0 < int(spleen.sum()) < int(liver.sum())  # the liver is the larger organ
    assert not (liver.bool() & spleen.bool()).any()
    with pytest.raises(KeyError, match="no structure 'pancreas'"):
        subject_mask(support, "pancreas")


def test_segment_pair_with_the_references_on_a_real_pair(btcv_pair):
    support, query = btcv_pair
    truth = subject_mask(query, "liver")
    scores = {}
    for name in ("wholebody", "boxaligned"):
        pred = segment_pair(create_segmentation_learner(name), support, query, "liver")
        assert pred.shape == query["image"].shape and pred.dtype == torch.uint8
        scores[name] = pair_dice(pred, truth)
    # the whole-body mask covers the liver but is mostly not liver; a box carried from the support is better
    assert 0.02 < scores["wholebody"] < 0.3
    assert scores["boxaligned"] > scores["wholebody"]
