"""Array transforms on the real scans of ``MONAI_DATA_DIRECTORY`` (TotalSegmentator CT-1, SynthSeg label maps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from monai_metalearn.transforms import (
    CropStructure,
    RandCropStructure,
    RandSynthesizeImage,
    RemapLabels,
    SelectStructure,
    resolve_structure,
)

LIVER, KIDNEY_R, KIDNEY_L = 5, 2, 3
L_HIPPO, R_HIPPO = 17, 53


def _load(keys, **files):
    return Compose([LoadImaged(keys, image_only=False), EnsureChannelFirstd(keys)])(files)


@pytest.fixture(scope="module")
def ct(data_dir):
    """CT-1 (122x101x112, 3 mm, RAS) and its TotalSegmentator label map, plus the ``{id: name}`` class map."""
    folder = data_dir / "totalsegmentator"
    d = _load(
        ["image", "label"],
        image=str(folder / "example_ct.nii.gz"),
        label=str(folder / "example_seg_fast_force_split.nii.gz"),
    )
    d["names"] = json.loads((folder / "class_map.json").read_text())["total"]
    return d


@pytest.fixture(scope="module")
def brain(data_dir):
    """SynthSeg subject 01 label map (256^3, 1 mm, LIA), cropped early to the central 112x112x112 block."""
    d = _load(["label"], label=str(data_dir / "synthseg" / "training_seg_01.nii.gz"))
    return d["label"][:, 72:184, 60:172, 60:172]


def _bbox(arr: np.ndarray):
    idx = np.argwhere(arr)
    return idx.min(0), idx.max(0) + 1


def _world(affine, index) -> np.ndarray:
    return (np.asarray(affine, dtype=np.float64) @ np.r_[np.asarray(index, dtype=np.float64), 1.0])[:3]


# ---------------------------------------------------------------- SelectStructure


def test_select_liver_count_and_volume(ct):
    seg = ct["label"]
    mask = SelectStructure(LIVER)(seg)
    assert isinstance(mask, MetaTensor) and mask.dtype == torch.float32 and mask.shape == seg.shape
    assert set(torch.unique(mask).tolist()) == {0.0, 1.0}
    expected = int((seg == LIVER).sum())
    assert expected == 41692  # TotalSegmentator reference liver of CT-1
    assert int(mask.sum()) == expected
    assert torch.equal(mask.affine, seg.affine)
    voxel_ml = float(np.prod(np.abs(np.diag(seg.affine.numpy())[:3]))) / 1000.0
    assert voxel_ml == pytest.approx(0.027)  # 3 mm isotropic
    assert 800.0 < int(mask.sum()) * voxel_ml < 3000.0  # a plausible adult liver, in ml


def test_select_by_name_equals_by_id(ct):
    seg, names = ct["label"], ct["names"]
    by_id = SelectStructure(LIVER)(seg)
    by_class_map = SelectStructure("liver", label_names=names)(seg)  # {"5": "liver"} form
    by_name_map = SelectStructure("liver", label_names={"liver": LIVER, "spleen": 1})(seg)
    assert torch.equal(by_id, by_class_map) and torch.equal(by_id, by_name_map)
    assert SelectStructure("liver", dtype=torch.bool, label_names=names)(seg).dtype == torch.bool


def test_select_union_of_ids(ct):
    seg = ct["label"]
    n_r, n_l = int((seg == KIDNEY_R).sum()), int((seg == KIDNEY_L).sum())
    assert n_r > 1000 and n_l > 1000
    kidneys = SelectStructure([KIDNEY_R, KIDNEY_L])(seg)
    assert int(kidneys.sum()) == n_r + n_l
    by_name = SelectStructure("kidneys", label_names={"kidneys": [KIDNEY_R, KIDNEY_L]})(seg)
    assert torch.equal(kidneys, by_name)
    assert resolve_structure("kidneys", {"kidneys": [2, 3]}) == ("structure 'kidneys' (ids [2, 3])", (2, 3))


def test_select_errors(ct):
    seg, names = ct["label"], ct["names"]
    present = set(torch.unique(seg).long().tolist())
    absent_id = next(int(k) for k in names if int(k) not in present)
    absent_name = names[str(absent_id)]
    with pytest.raises(ValueError, match=rf"structure '{absent_name}' \(id {absent_id}\) is absent from .*example_seg"):
        SelectStructure(absent_name, label_names=names)(seg)
    with pytest.raises(ValueError, match=r"structure 250 is absent from"):
        SelectStructure(250)(seg)
    with pytest.raises(KeyError, match=r"unknown structure 'livr'.*available: .*'liver'"):
        SelectStructure("livr", label_names=names)(seg)
    with pytest.raises(KeyError, match=r"no label_names given"):
        SelectStructure("liver")(seg)


# ---------------------------------------------------------------- CropStructure


@pytest.mark.parametrize("margin", [0, 0.0, 0.1, 3])
def test_crop_contains_the_whole_liver(ct, margin):
    img, seg = ct["image"], ct["label"]
    lo, hi = _bbox(seg[0].numpy() == LIVER)
    size = hi - lo
    crop = CropStructure(LIVER, margin=margin)
    start, end = crop.compute_box(seg)
    m = np.full(3, margin) if isinstance(margin, int) else np.ceil(margin * size - 1e-9).astype(int)
    np.testing.assert_array_equal(start, lo - m)
    np.testing.assert_array_equal(end, hi + m)
    patch, patch_label = crop(img, seg)
    assert patch.shape[1:] == tuple(end - start) == patch_label.shape[1:]
    assert int((patch_label == LIVER).sum()) == int((seg == LIVER).sum())  # every liver voxel is inside
    # the scan cuts the liver at its top slice (axis 2): with a margin the box reaches past the volume there
    assert hi[2] == seg.shape[3]
    e = np.minimum(end, seg.shape[1:])
    n = e - start
    np.testing.assert_array_equal(
        patch[:, : n[0], : n[1], : n[2]].numpy(), img[:, start[0] : e[0], start[1] : e[1], start[2] : e[2]].numpy()
    )
    assert (patch[:, :, :, n[2] :] == img.min()).all() and (patch_label[:, :, :, n[2] :] == 0).all()


def test_crop_affine_maps_to_box_start(ct):
    img, seg = ct["image"], ct["label"]
    crop = CropStructure("liver", margin=0.1, label_names=ct["names"])
    start, _ = crop.compute_box(seg)
    patch, patch_label = crop(img, seg)
    np.testing.assert_allclose(_world(patch.affine, [0, 0, 0]), _world(img.affine, start), atol=1e-4)
    np.testing.assert_allclose(patch_label.affine.numpy(), patch.affine.numpy())
    # a voxel of the patch and the voxel it came from hold the same value and lie at the same world point
    i, j, k = 7, 11, 13
    assert float(patch[0, i, j, k]) == float(img[0, start[0] + i, start[1] + j, start[2] + k])


def test_crop_pads_outside_the_volume(ct):
    img, seg = ct["image"], ct["label"]
    lo, hi = _bbox(seg[0].numpy() == LIVER)
    crop = CropStructure(LIVER, margin=80)  # voxels: far beyond the 122x101x112 volume
    start, end = crop.compute_box(seg)
    assert (start < 0).all() and (end > np.asarray(seg.shape[1:])).all()  # padded on every side
    patch, patch_label = crop(img, seg)
    assert patch.shape[1:] == tuple(hi - lo + 160)
    np.testing.assert_allclose(_world(patch.affine, [0, 0, 0]), _world(img.affine, start), atol=1e-4)
    assert float(patch[0, 0, 0, 0]) == float(img.min())  # image padded with its minimum
    assert float(patch_label[0, 0, 0, 0]) == 0.0  # label padded with background
    assert int((patch_label == LIVER).sum()) == int((seg == LIVER).sum())
    o = -start
    inner = patch[:, o[0] : o[0] + seg.shape[1], o[1] : o[1] + seg.shape[2], o[2] : o[2] + seg.shape[3]]
    assert torch.equal(inner.as_tensor(), img.as_tensor())  # the whole volume sits unchanged inside the padding


def test_crop_resize_exact_size(ct):
    crop = CropStructure("liver", margin=0.1, spatial_size=(32, 32, 32), label_names=ct["names"])
    patch, patch_label = crop(ct["image"], ct["label"])
    assert patch.shape == (1, 32, 32, 32) == patch_label.shape
    assert patch.dtype == torch.float32
    assert set(torch.unique(patch_label).tolist()) <= set(torch.unique(ct["label"]).tolist())  # nearest: no new ids
    frac = float((patch_label == LIVER).float().mean())
    full_frac = float((CropStructure(LIVER, margin=0.1)(ct["image"], ct["label"])[1] == LIVER).float().mean())
    assert full_frac > 0.1 and frac == pytest.approx(full_frac, abs=0.02)  # nearest resizing keeps the liver share
    # the resized patch spans the same world box: first voxel centre shifts by half the zoom minus half a voxel
    start, end = crop.compute_box(ct["label"])
    zoom = (end - start) / 32.0
    expected = _world(ct["image"].affine, start + (zoom - 1) / 2.0)
    np.testing.assert_allclose(_world(patch.affine, [0, 0, 0]), expected, atol=1e-3)
    assert CropStructure(LIVER, spatial_size=24)(ct["image"], ct["label"])[0].shape == (1, 24, 24, 24)


def test_crop_min_size_and_errors(ct):
    crop = CropStructure(LIVER, margin=0, min_size=(100, 100, 100))
    start, end = crop.compute_box(ct["label"])
    assert (end - start >= 100).all()
    with pytest.raises(ValueError, match=r"structure 250 is absent"):
        CropStructure(250)(ct["image"], ct["label"])
    with pytest.raises(ValueError, match="margin must be >= 0"):
        CropStructure(LIVER, margin=-1)
    with pytest.raises(TypeError, match="margin"):
        CropStructure(LIVER, margin="big")


def test_hippocampus_crop_size(brain):
    spacing = np.linalg.norm(brain.affine.numpy()[:3, :3], axis=0)
    assert np.allclose(spacing, 1.0)
    crop = CropStructure(L_HIPPO, margin=0)
    patch, patch_label = crop(brain.float(), brain)
    extent_mm = np.asarray(patch.shape[1:]) * spacing
    assert 30.0 <= extent_mm.max() <= 55.0  # the hippocampus is ~ 40-45 mm long
    assert extent_mm.min() >= 8.0
    assert int((patch_label == L_HIPPO).sum()) == int((brain == L_HIPPO).sum())
    # LIA orientation: the left hippocampus lies at higher axis-0 indices than the right one
    assert crop.compute_box(brain)[0][0] > CropStructure(R_HIPPO, margin=0).compute_box(brain)[1][0]


# ---------------------------------------------------------------- RandCropStructure


def test_rand_crop_seeded(ct):
    img, seg = ct["image"], ct["label"]

    def view(seed, size=(32, 32, 32)):
        return RandCropStructure(LIVER, spatial_size=size).set_random_state(seed)(img, seg)

    a, a_lab = view(3)
    b, b_lab = view(3)
    c, _ = view(4)
    assert torch.equal(a, b) and torch.equal(a_lab, b_lab)
    assert not torch.equal(a, c)
    assert a.shape == (1, 32, 32, 32) == a_lab.shape
    t = RandCropStructure(LIVER, spatial_size=16).set_random_state(0)
    first, second = t(img, seg)[0], t(img, seg)[0]
    assert not torch.equal(first, second)  # a new box per call


def test_rand_crop_keeps_most_of_the_structure(ct):
    img, seg = ct["image"], ct["label"]
    total = int((seg == LIVER).sum())
    base_start, base_end = CropStructure(LIVER, margin=0.1).compute_box(seg)
    base_size = base_end - base_start
    t = RandCropStructure(LIVER, margin=0.1, jitter=0.1, scale_range=(0.9, 1.2)).set_random_state(0)
    sizes = set()
    for _ in range(8):
        patch, patch_label = t(img, seg)
        size = np.asarray(patch.shape[1:])
        sizes.add(tuple(size))
        assert (size >= np.floor(base_size * 0.9) - 1).all() and (size <= np.ceil(base_size * 1.2) + 1).all()
        # worst case: scale 0.9 and a 10 % shift lose ~8 % of the box per axis; the liver keeps > 80 % of voxels
        assert int((patch_label == LIVER).sum()) / total > 0.8
    assert len(sizes) > 1


def test_rand_crop_prob_zero_is_deterministic(ct):
    det = CropStructure(LIVER, margin=0.1, spatial_size=20)(ct["image"], ct["label"])
    rnd = RandCropStructure(LIVER, margin=0.1, spatial_size=20, prob=0.0)(ct["image"], ct["label"])
    assert torch.equal(det[0], rnd[0]) and torch.equal(det[1], rnd[1])
    with pytest.raises(ValueError, match="scale_range"):
        RandCropStructure(LIVER, scale_range=(1.2, 0.9))


# ---------------------------------------------------------------- RemapLabels


def test_remap_classification_round_trip():
    classes = ["liver", "spleen", "kidney_left"]
    remap = RemapLabels(classes)
    assert remap("spleen") == 1
    assert remap(["kidney_left", "liver", "spleen"]) == [2, 0, 1]
    assert remap.invert([2, 0, 1]) == ["kidney_left", "liver", "spleen"]
    assert remap.inverse_classes == {0: "liver", 1: "spleen", 2: "kidney_left"}
    np.testing.assert_array_equal(remap(np.array(["spleen", "liver"])), np.array([1, 0]))
    ids = RemapLabels([17, 53, 5])
    out = ids(torch.tensor([53, 5, 17, 17]))
    assert out.dtype == torch.int64 and out.tolist() == [1, 2, 0, 0]
    assert ids.invert(out).tolist() == [53, 5, 17, 17]
    np.testing.assert_array_equal(ids(np.array([5.0, 17.0])), np.array([2, 0]))
    assert ids(np.int64(53)) == 1 and ids.invert(np.array([2, 1])).tolist() == [5, 53]


def test_remap_errors():
    remap = RemapLabels(["liver", "spleen"])
    with pytest.raises(KeyError, match=r"unknown class\(es\) 'lung'; classes are \['liver', 'spleen'\]"):
        remap(["liver", "lung"])
    with pytest.raises(KeyError, match=r"unknown class\(es\) 7"):
        RemapLabels([1, 2])(torch.tensor([1, 7, 2]))
    with pytest.raises(KeyError, match="unknown local label"):
        remap.invert(5)
    with pytest.raises(ValueError, match="duplicate classes"):
        RemapLabels(["liver", "liver"])
    with pytest.raises(ValueError, match="collides"):
        RemapLabels([5, 2], start=0, background=1)


def test_remap_label_map(ct):
    seg = ct["label"]
    remap = RemapLabels([LIVER, KIDNEY_R], start=1, background=0)
    local = remap(seg)
    assert isinstance(local, MetaTensor) and local.dtype == torch.int64 and torch.equal(local.affine, seg.affine)
    assert sorted(torch.unique(local).tolist()) == [0, 1, 2]
    assert int((local == 1).sum()) == int((seg == LIVER).sum())
    assert int((local == 2).sum()) == int((seg == KIDNEY_R).sum())
    back = remap.invert(local)
    kept = (seg == LIVER) | (seg == KIDNEY_R)
    assert torch.equal(back.as_tensor()[kept], seg.as_tensor()[kept].long())
    assert int(back.as_tensor()[~kept].abs().sum()) == 0  # background -> inverse_background 0
    with pytest.raises(KeyError, match="unknown class"):
        RemapLabels([LIVER, KIDNEY_R])(seg)  # label map without background=


# ---------------------------------------------------------------- RandSynthesizeImage

_OFF = dict(std_range=(0.0, 0.0), blur_prob=0.0, bias_prob=0.0, noise_prob=0.0, gamma_prob=0.0)


def _eta2(img: torch.Tensor, lab: torch.Tensor) -> float:
    """Fraction of the image variance explained by the label regions (1.0: piecewise constant on ``lab``)."""
    x, lab = img.reshape(-1).double(), lab.reshape(-1)
    _, inv = torch.unique(lab, return_inverse=True)
    cnt, sums = torch.bincount(inv).double(), torch.bincount(inv, weights=x)
    between = (cnt * (sums / cnt - x.mean()) ** 2).sum() / x.numel()
    return float(between / x.var(unbiased=False))


@pytest.fixture(scope="module")
def brain64(brain):
    return brain[:, 24:88, 20:84, 24:88]


def test_synth_piecewise_constant_equals_sampled_means(brain64):
    synth = RandSynthesizeImage(deform=False, **_OFF).set_random_state(0)
    image, label = synth(brain64)
    assert torch.equal(label, brain64)
    table = synth.intensity_table
    assert set(table) == set(torch.unique(brain64).tolist()) and len(table) > 20
    means = np.asarray([m for m, _ in table.values()])
    lo, hi = means.min(), means.max()
    for value, (mean, std) in table.items():
        region = image[brain64 == value]
        assert std == pytest.approx(synth.std_range[0])
        np.testing.assert_allclose(region.numpy(), (mean - lo) / (hi - lo), atol=1e-5)


def test_synth_deformed_label_stays_aligned(brain64):
    synth = RandSynthesizeImage(**_OFF).set_random_state(1)
    image, label = synth(brain64)
    changed = float((label != brain64).float().mean())
    assert 0.02 < changed < 0.8  # the label map was deformed ...
    assert set(torch.unique(label).tolist()) <= set(torch.unique(brain64).tolist())  # ... by nearest neighbour
    assert _eta2(image, label) == pytest.approx(1.0)  # ... and the image is constant on each deformed region
    assert _eta2(image, brain64) < 0.9


def test_synth_full_recipe(brain64):
    for seed in range(3):
        image, label = RandSynthesizeImage().set_random_state(seed)(brain64)
        assert isinstance(image, MetaTensor) and image.meta["synthetic"] is True
        assert "synthetic" not in label.meta
        assert torch.equal(image.affine, brain64.affine) and torch.equal(label.affine, brain64.affine)
        assert image.shape == brain64.shape and image.dtype == torch.float32 and label.dtype == brain64.dtype
        assert float(image.min()) == 0.0 and float(image.max()) == pytest.approx(1.0)
        # blur, bias and noise on top: the deformed label still explains most of the image, the original much less
        aligned, original = _eta2(image, label), _eta2(image, brain64)
        assert aligned > 0.7 and aligned > original + 0.15


def test_synth_seeded(brain64):
    a = RandSynthesizeImage().set_random_state(7)(brain64)
    b = RandSynthesizeImage().set_random_state(7)(brain64)
    c = RandSynthesizeImage().set_random_state(8)(brain64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    synth = RandSynthesizeImage().set_random_state(7)
    assert not torch.equal(synth(brain64)[0], synth(brain64)[0])  # fresh parameters per call


def test_synth_plain_tensor_input(brain64):
    image, label = RandSynthesizeImage(deform=False, **_OFF).set_random_state(0)(brain64.as_tensor().long())
    assert image.meta["synthetic"] is True and label.dtype == torch.int64
    assert _eta2(image, label) == pytest.approx(1.0)
