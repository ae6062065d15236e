"""The atlas learners on real BTCV scans: a scan carried onto itself keeps its mask, fusion of identical atlases is
the single atlas, another subject's liver is found, the cross-modal switch, the contract's errors."""

from __future__ import annotations

import pytest
import torch

from monai_metalearn.learners import AtlasSegmenter, MultiAtlasSegmenter, create_segmentation_learner
from monai_metalearn.metrics import binary_dice

#: a short schedule: the tests check behaviour, benchmarks/bench_registration.py measures accuracy
FAST = {"spacing": 5.0, "levels": (2, 1), "iterations": (30, 20), "affine_iterations": (40, 20),
        "initial_refine_iterations": 10}


def _liver(scan):
    return (scan["label"] == 6).float()


def test_a_scan_onto_itself_keeps_its_mask(ct5):
    atlas = AtlasSegmenter(registration=FAST)
    mask = _liver(ct5)
    pred = atlas.adapt([ct5["image"]], [mask])(ct5["image"][None]).argmax(1, keepdim=True)
    assert float(binary_dice(pred, mask[None].long())) > 0.95


@pytest.mark.parametrize("fusion", ["majority", "weighted", "staple", "mean"])
def test_identical_atlases_fuse_to_the_single_atlas(ct5, fusion):
    """Three copies of one atlas: every fusion gives the one-atlas mask (one registration, cached by content)."""
    one = AtlasSegmenter(registration=FAST)
    many = AtlasSegmenter(fusion=fusion, registration=FAST)
    mask = _liver(ct5)
    query = torch.roll(ct5["image"].as_tensor(), shifts=2, dims=1)[None]  # a shifted copy: not the identity
    single = one.adapt([ct5["image"]], [mask])(query).argmax(1)
    fused = many.adapt([ct5["image"]] * 3, [mask] * 3)(query).argmax(1)
    assert int(single.sum()) > 1000
    assert torch.equal(single, fused)
    assert len(many.last_timings) == 1  # the second and third atlas reuse the first registration


def test_another_subjects_liver_is_found(data_dir):
    """BTCV subject 0's liver carried to subject 3 (5 mm): far above the box-aligned reference's ~0.4."""
    from monai_metalearn.data import scan_reader

    read = scan_reader(["image", "label"], (5.0, 5.0, 5.0))
    a = read({"image": str(data_dir / "btcv_sabs/image_0.nii.gz"), "label": str(data_dir / "btcv_sabs/label_0.nii.gz")})
    q = read({"image": str(data_dir / "btcv_sabs/image_3.nii.gz"), "label": str(data_dir / "btcv_sabs/label_3.nii.gz")})
    atlas = create_segmentation_learner("atlas", registration=FAST, spacing=(5.0, 5.0, 5.0))
    pred = atlas.adapt([a["image"].as_tensor()], [_liver(a).as_tensor()])(q["image"].as_tensor()[None]).argmax(1)
    dice = float(binary_dice(pred[:, None], _liver(q).as_tensor()[None].long()))
    assert dice > 0.7, dice


def test_auto_similarity_switches_to_mind_across_modalities():
    atlas = MultiAtlasSegmenter()
    assert atlas.fusion == "weighted" and atlas.config.similarity == "lncc"
    atlas.prepare_protocol(spacing=[1.5, 1.5, 3.0], support_modalities=["CT"], query_modalities=["MR"])
    assert atlas.config.similarity == "mind" and atlas.spacing == (1.5, 1.5, 3.0)
    atlas.prepare_protocol(support_modalities=["MR"], query_modalities=["MR"])
    assert atlas.config.similarity == "lncc"
    fixed = AtlasSegmenter(similarity="ncc")
    fixed.prepare_protocol(support_modalities=["CT"], query_modalities=["MR"])
    assert fixed.config.similarity == "ncc"  # an explicit choice is kept


def test_registration_cache_is_keyed_by_the_settings_too():
    """A protocol that changes the settings (CT -> MR: MIND-SSC) never reuses a registration cached under others; the
    same settings again find it."""
    atlas = AtlasSegmenter()
    a, q = torch.rand(1, 6, 6, 6, generator=torch.Generator().manual_seed(0)), torch.rand(1, 6, 6, 6)
    lncc = atlas.cache_key(a, q)
    atlas.prepare_protocol(support_modalities=["CT"], query_modalities=["MR"])
    assert atlas.cache_key(a, q) != lncc and atlas.cache_key(a, q)[:2] == lncc[:2]
    atlas.prepare_protocol(support_modalities=["CT"], query_modalities=["CT"])
    assert atlas.cache_key(a, q) == lncc
    assert atlas.cache_key(a, q.flip(1)) != lncc  # content, not shape


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="fusion"):
        AtlasSegmenter(fusion="vote")
    with pytest.raises(ValueError, match="similarity"):
        AtlasSegmenter(similarity="ssd")
    with pytest.raises(ValueError, match="unknown registration settings"):
        AtlasSegmenter(registration={"iters": 3})
    atlas = AtlasSegmenter()
    with pytest.raises(ValueError, match="empty"):
        atlas.adapt([torch.rand(1, 8, 8, 8)], [torch.zeros(1, 8, 8, 8)])
    with pytest.raises(ValueError, match="differ in shape"):
        atlas.adapt([torch.rand(1, 8, 8, 8)], [torch.ones(1, 8, 8, 9)])
    assert not atlas.trainable and atlas.whole_volume
