"""Dictionary transforms: equal to the array versions on the real scans, per-item structures, seeding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from monai_metalearn import transforms as mt
from monai_metalearn.transforms import (
    CropStructure,
    CropStructured,
    RandCropStructure,
    RandCropStructured,
    RandSynthesizeImage,
    RandSynthesizeImaged,
    RemapLabels,
    RemapLabelsd,
    SelectStructure,
    SelectStructured,
)

LIVER, SPLEEN = 5, 1


@pytest.fixture(scope="module")
def ct(data_dir):
    folder = data_dir / "totalsegmentator"
    keys = ["image", "label"]
    d = Compose([LoadImaged(keys, image_only=False), EnsureChannelFirstd(keys)])(
        {"image": str(folder / "example_ct.nii.gz"), "label": str(folder / "example_seg_fast_force_split.nii.gz")}
    )
    names = json.loads((folder / "class_map.json").read_text())["total"]
    structures = {"liver": LIVER, "spleen": SPLEEN}
    item = {"image": d["image"], "label": d["label"], "class": "liver", "structures": structures}
    return item, names


@pytest.fixture(scope="module")
def brain(data_dir):
    d = Compose([LoadImaged("label", image_only=False), EnsureChannelFirstd("label")])(
        {"label": str(data_dir / "synthseg" / "training_seg_01.nii.gz")}
    )
    return d["label"][:, 96:160, 80:144, 96:160]


def test_aliases_and_exports():
    for name in ("SelectStructure", "CropStructure", "RandCropStructure", "RemapLabels", "RandSynthesizeImage"):
        base = getattr(mt, f"{name}d")
        assert getattr(mt, f"{name}D") is base and getattr(mt, f"{name}Dict") is base
    assert all(hasattr(mt, n) for n in mt.__all__)


def test_select_per_item_structure(ct):
    item, names = ct
    select = SelectStructured("label", structure_key="class", label_names_key="structures", output_key="mask")
    out = select(item)
    assert torch.equal(out["mask"], SelectStructure(LIVER)(item["label"]))
    assert out["label"] is item["label"]  # the label map is kept when output_key is given
    spleen = select({**item, "class": "spleen"})["mask"]
    assert int(spleen.sum()) == int((item["label"] == SPLEEN).sum()) > 1000
    fixed = SelectStructured("label", structure="liver", label_names=names)(item)
    assert torch.equal(fixed["label"], out["mask"])  # replaces the label map without output_key
    assert SelectStructured(["label", "other"], structure=5, allow_missing_keys=True)(item)["label"].sum() == 41692


def test_select_errors(ct):
    item, names = ct
    select = SelectStructured("label", structure_key="class", label_names_key="structures")
    with pytest.raises(KeyError, match=r"unknown structure 'brain'.*'liver', 'spleen'"):
        select({**item, "class": "brain"})
    with pytest.raises(ValueError, match=r"structure 'gone' \(id 200\) is absent from .*example_seg"):
        select({**item, "class": "gone", "structures": {"gone": 200}})
    with pytest.raises(KeyError, match="structure_key 'class'"):
        select({"label": item["label"]})
    with pytest.raises(ValueError, match="exactly one"):
        SelectStructured("label")


def test_crop_matches_array(ct):
    item, names = ct
    crop = CropStructured("image", "label", structure_key="class", label_names_key="structures", spatial_size=24)
    out = crop(item)
    ref_img, ref_lab = CropStructure(LIVER, spatial_size=24)(item["image"], item["label"])
    assert torch.equal(out["image"], ref_img) and torch.equal(out["label"], ref_lab)
    assert torch.equal(out["image"].affine, ref_img.affine)
    no_label = CropStructured("image", "label", structure="liver", label_names=names, crop_label=False)(item)
    assert no_label["label"] is item["label"] and no_label["image"].shape[1:] == (82, 76, 53)
    both = CropStructured(["image", "label"], "label", structure=LIVER, margin=2, mode=["trilinear", "nearest"])(item)
    assert int((both["label"] == LIVER).sum()) == int((item["label"] == LIVER).sum())
    assert float(both["label"].max()) <= float(item["label"].max())


def test_rand_crop_matches_array_and_seeds(ct):
    item, _ = ct
    kw = dict(spatial_size=(20, 20, 20), jitter=0.15, scale_range=(0.8, 1.3))
    d = RandCropStructured("image", "label", structure=LIVER, **kw).set_random_state(5)
    a = RandCropStructure(LIVER, **kw).set_random_state(5)
    for _ in range(2):
        out, (img, lab) = d(item), a(item["image"], item["label"])
        assert torch.equal(out["image"], img) and torch.equal(out["label"], lab)
    again = RandCropStructured("image", "label", structure=LIVER, **kw).set_random_state(5)(item)
    other = RandCropStructured("image", "label", structure=LIVER, **kw).set_random_state(6)(item)
    first = RandCropStructured("image", "label", structure=LIVER, **kw).set_random_state(5)(item)
    assert torch.equal(first["image"], again["image"]) and not torch.equal(first["image"], other["image"])
    det = RandCropStructured("image", "label", structure=LIVER, prob=0.0, spatial_size=20)(item)
    assert torch.equal(det["image"], CropStructure(LIVER, spatial_size=20)(item["image"], item["label"])[0])


def test_remapd(ct):
    item, _ = ct
    out = RemapLabelsd("class", classes=["spleen", "liver"])(item)
    assert out["class"] == 1
    per_item = RemapLabelsd(["class", "label"], classes_key="classes", background=-1)
    got = per_item({"class": "liver", "label": item["label"], "classes": [LIVER, "liver"]})
    assert got["class"] == 1 and int((got["label"] == 0).sum()) == int((item["label"] == LIVER).sum())
    assert torch.equal(got["label"], RemapLabels([LIVER, "liver"], background=-1)(item["label"]))
    with pytest.raises(KeyError, match="unknown class"):
        RemapLabelsd("class", classes=["spleen"])(item)


def test_synth_matches_array(brain):
    d = RandSynthesizeImaged("label", image_key="image", gamma_prob=1.0).set_random_state(3)
    a = RandSynthesizeImage(gamma_prob=1.0).set_random_state(3)
    out = d({"label": brain})
    img, lab = a(brain)
    assert torch.equal(out["image"], img) and torch.equal(out["label"], lab)
    assert out["image"].meta["synthetic"] is True
    assert not torch.equal(out["label"], brain)  # the deformed map replaced the label
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    skip = RandSynthesizeImaged("label", prob=0.0)({"label": brain})
    assert "image" not in skip and skip["label"] is brain
    with pytest.raises(ValueError, match="one key per label key"):
        RandSynthesizeImaged("label", image_key=["a", "b"])
    two = RandSynthesizeImaged(["l1", "l2"], image_key=["i1", "i2"]).set_random_state(0)({"l1": brain, "l2": brain})
    assert two["i1"].shape == two["i2"].shape == brain.shape and not torch.equal(two["i1"], two["i2"])
    assert np.isclose(float(two["i2"].max()), 1.0)


def test_synth_only_if_missing(brain, ct):
    synth = RandSynthesizeImaged("label", image_key="image", only_if_missing=True)
    # a real image is kept, and so is its label map (no deformation)
    real = {"label": brain, "image": ct[0]["image"]}
    kept = synth.set_random_state(0)(real)
    assert kept["image"] is real["image"] and kept["label"] is brain
    # no image, or image None: synthesised exactly as without only_if_missing
    ref = RandSynthesizeImaged("label", image_key="image").set_random_state(1)({"label": brain})
    for item in ({"label": brain}, {"label": brain, "image": None}):
        out = synth.set_random_state(1)(item)
        assert out["image"].meta["synthetic"] is True and out["image"].shape == brain.shape
        assert torch.equal(out["image"], ref["image"]) and torch.equal(out["label"], ref["label"])
        assert not torch.equal(out["label"], brain)
    assert "image" not in RandSynthesizeImaged("label", only_if_missing=True, prob=0.0)({"label": brain})


def test_crops_leave_the_input_metadata_alone(ct):
    """Resizing a patch must not write the patch spacing into the source's ``meta["pixdim"]`` (shared array)."""
    item, _ = ct
    before = {k: np.array(item[k].meta["pixdim"], copy=True) for k in ("image", "label")}
    out = RandCropStructured(["image", "label"], "label", structure=LIVER, spatial_size=16).set_random_state(0)(item)
    assert not np.allclose(out["image"].meta["pixdim"][1:4], before["image"][1:4])  # the patch has its own spacing
    for k in ("image", "label"):
        assert np.array_equal(item[k].meta["pixdim"], before[k]), k
