"""Intensity normalisation chosen per item: the HU window for Hounsfield CT only, per-image percentiles for windowed CT
and MR, inferred from the values when an item does not say; body masks; on the real scans of each kind."""

from __future__ import annotations

import pytest
import torch

from monai_metalearn.apps.segmentation import item_intensity
from monai_metalearn.data import load_datalist, scan_reader
from monai_metalearn.transforms import (
    CT_WINDOW,
    ScaleIntensityByKindd,
    body_mask,
    check_intensity_kind,
    infer_intensity,
    scale_intensity,
)


def _load(data_dir, source: str, index: int = 0):
    item = load_datalist(source, data_dir)[index]
    d = scan_reader(["image", "label"], (4.0, 4.0, 4.0))({k: item[k] for k in ("image", "label")})
    return item, d["image"].as_tensor(), d["label"].as_tensor()


def test_hu_ct_is_windowed_and_nothing_else_is(data_dir):
    item, ct, _ = _load(data_dir, "totalseg_ct1")
    assert item["intensity"] == "ct_hu" and infer_intensity(ct) == "ct_hu" and float(ct.min()) < -500
    lo, hi = CT_WINDOW
    assert torch.allclose(scale_intensity(ct, "ct_hu"), ((ct - lo) / (hi - lo)).clamp(0, 1))

    item, btcv, _ = _load(data_dir, "btcv_sabs")
    assert item["intensity"] == "ct_windowed" and float(btcv.min()) >= 0 and float(btcv.max()) <= 255
    # a task that says only "CT" for an 8-bit scan: windowed, never the HU window
    assert infer_intensity(btcv, "CT") == "ct_windowed" == item_intensity({"modality": "CT"}, btcv)
    scaled = scale_intensity(btcv, item_intensity({"modality": "CT"}, btcv))
    hu = scale_intensity(btcv, "ct_hu")
    assert float(scaled.min()) == 0.0 and float(scaled.max()) == 1.0  # its own percentiles span [0, 1]
    assert float(hu.min()) > 0.4  # the HU window would squeeze 0..255 into [0.42, 0.84]
    # the scaling follows the image's own percentiles: doubling the raw values changes nothing
    assert torch.allclose(scale_intensity(2 * btcv, "ct_windowed"), scaled, atol=1e-5)


def test_mr_is_scaled_per_image_and_inferred(data_dir):
    item, mr, _ = _load(data_dir, "chaos_t2")
    assert item["intensity"] == "mr" and infer_intensity(mr) == "mr" == infer_intensity(mr, "MR")
    scaled = scale_intensity(mr, None)
    assert torch.equal(scaled, scale_intensity(mr, "mr"))
    assert torch.allclose(scale_intensity(mr * 7.0 + 3.0, "mr"), scale_intensity(mr + 3.0 / 7.0, "mr"), atol=1e-5)
    assert infer_intensity(torch.tensor([0.0, 1.0, 1.0])) == "binary"
    with pytest.raises(ValueError, match="unknown intensity kind"):
        check_intensity_kind("hounsfield")
    with pytest.raises(ValueError, match="modality"):
        infer_intensity(mr, "PET")


def test_dictionary_transform_reads_the_items_kind(data_dir):
    item, btcv, _ = _load(data_dir, "btcv_sabs")
    out = ScaleIntensityByKindd(keys="image")({"image": btcv, "intensity": "ct_windowed"})
    assert torch.equal(out["image"], scale_intensity(btcv, "ct_windowed"))
    out = ScaleIntensityByKindd(keys="image")({"image": btcv, "modality": "CT"})  # no kind: inferred, not HU
    assert torch.equal(out["image"], scale_intensity(btcv, "ct_windowed"))


@pytest.mark.parametrize("source", ["btcv_sabs", "chaos_t2", "acdc", "totalseg_ct1"])
def test_body_mask_holds_the_labelled_organs(data_dir, source):
    item, image, label = _load(data_dir, source)
    body = body_mask(scale_intensity(image, item["intensity"]))
    organs = label > 0
    assert body.shape == image.shape and body.dtype == torch.bool
    assert float((body & organs).sum() / organs.sum()) > 0.99  # the organs lie inside the body
    assert 0.2 < float(body.float().mean()) < 0.95  # and the air around it is not body
    assert not bool(body_mask(torch.zeros(1, 8, 8, 8)).any())
