"""Checked loading on the real scans: DICOM/NIfTI/NRRD/npz, geometry, HU values, and every error with its message."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from monai.data import MetaTensor
from monai.transforms import LoadImaged, Orientationd
from monai_metalearn.data.loading import LoadScan, LoadScand, LoadScanD, LoadScanDict, ScanLoadError, validate_datalist
from monai_metalearn.data.readers import LIA_1MM, NpzReader
from monai_metalearn.data.sources import SOURCES, load_datalist


@pytest.fixture(scope="module")
def load():
    return LoadScand(keys=["image", "label"])


@pytest.fixture(scope="module")
def ct2(data_dir):
    """CT-2: the JPEG 2000 DICOM series and its label map, loaded once for the module."""
    item = load_datalist("totalseg_ct2", data_dir)[0]
    return item, LoadScand(keys=["image", "label"])(item)


def _copy_dicom(data_dir, tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    for f in sorted((data_dir / "totalsegmentator" / "example_ct_dicom").iterdir()):
        shutil.copyfile(f, folder / f.name)
    return folder, sorted(folder.iterdir())


def _nifti_copy(src, dst, data=None, affine=None):
    img = nib.load(src)
    array = np.asarray(img.dataobj) if data is None else data
    header = img.header.copy()
    header.set_data_dtype(array.dtype)
    nib.save(nib.Nifti1Image(array, img.affine if affine is None else affine, header), dst)
    return str(dst)


# ---------------------------------------------------------------------------------------------------------- reader


def test_npz_reader_affine_is_lia(data_dir):
    scan = data_dir / "voxelmorph" / "test_scan.npz"
    out = LoadImaged(keys=["image", "label"], reader=NpzReader(), ensure_channel_first=True)(
        {"image": f"{scan}#vol", "label": f"{scan}#seg"}
    )
    for key, array_key in (("image", "vol"), ("label", "seg")):
        img = out[key]
        assert isinstance(img, MetaTensor) and img.shape == (1, 160, 192, 224)
        assert nib.aff2axcodes(img.affine.numpy()) == ("L", "I", "A")
        assert np.allclose(img.affine.numpy()[:3, :3], LIA_1MM[:3, :3])
        assert img.meta["filename_or_obj"] == f"{scan}#{array_key}"
    assert np.allclose(img.affine.numpy() @ [79.5, 95.5, 111.5, 1], [0, 0, 0, 1]), "centre voxel at the origin"
    assert set(torch.unique(out["label"]).tolist()) >= {17.0, 53.0}
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0


def test_npz_reader_suffixes_and_custom_affine(data_dir):
    reader = NpzReader(affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    assert reader.verify_suffix("a/b.npz") and reader.verify_suffix("a/b.npz#vol")
    assert reader.verify_suffix(["a.npz#x", "b.npz"]) and not reader.verify_suffix("a.nii.gz")
    array, meta = reader.get_data(reader.read(f"{data_dir / 'voxelmorph' / 'test_scan.npz'}#seg"))
    assert array.shape == (160, 192, 224) and np.allclose(meta["affine"], np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"holds arrays \['vol', 'seg'\]"):
        NpzReader().read(data_dir / "voxelmorph" / "test_scan.npz")


# ------------------------------------------------------------------------------------------------ real scans load


def test_ct2_dicom_matches_label_grid_in_ras_and_hu_is_plausible(ct2):
    item, out = ct2
    image, label = out["image"], out["label"]
    assert image.shape == label.shape == (1, 512, 512, 20)
    assert nib.aff2axcodes(image.affine.numpy()) == ("L", "P", "S")  # ITK's DICOM reading
    assert nib.aff2axcodes(label.affine.numpy()) == ("L", "A", "S")  # as the data README says
    ras = Orientationd(keys=["image", "label"], axcodes="RAS", labels=None)(out)
    assert ras["image"].shape == ras["label"].shape
    assert np.allclose(ras["image"].affine.numpy(), ras["label"].affine.numpy(), atol=1e-3)
    hu, seg = ras["image"][0], ras["label"][0]
    assert -1100 < float(hu[:16, :16].mean()) < -900, "air/outside the body near -1000 HU"
    liver = hu[seg == item["structures"]["liver"]]
    assert liver.numel() > 100_000 and 30 < float(liver.median()) < 120, "enhanced liver parenchyma in HU"
    assert -50 < float(hu[seg == item["structures"]["spleen"]].median()) < 150


SCANS = ["totalseg_ct1", "totalseg_ct1_crop", "ivadomed_spleen", "pyradiomics", "voxelmorph_t1"]


@pytest.mark.parametrize("name", SCANS)
def test_sources_load_channel_first_with_matching_grids(load, data_dir, name):
    for item in load_datalist(name, data_dir):
        out = load(item)
        assert out["image"].ndim == 4 and out["image"].shape == out["label"].shape
        assert out["image"].shape[0] == 1 and out["image"].dtype == torch.float32
        present = set(torch.unique(out["label"]).long().tolist()) - {0}
        assert present == set(item["structures"].values())


def test_soft_masks_are_thresholded(load, data_dir):
    items = [it for it in load_datalist("sct_spinal_cord", data_dir) if "label_threshold" in it]
    assert [sorted(it["structures"]) for it in items] == [["spinal_cord_gray_matter"], ["spinal_cord_white_matter"]]
    gm = load(items[0])["label"]
    assert set(torch.unique(gm).tolist()) == {0.0, 1.0} and int(gm.sum()) == 99
    soft = LoadScand(keys=["label"], threshold_postfix=None)(items[0])["label"]
    assert len(torch.unique(soft)) > 100  # without the threshold it is the published soft mask


def test_missing_keys_and_in_memory_arrays(data_dir):
    item = load_datalist("synthseg", data_dir)[0]
    out = LoadScand(keys=["image", "label"], allow_missing_keys=True)(item)
    assert "image" not in out and out["label"].shape == (1, 256, 256, 256)
    with pytest.raises(KeyError, match="image"):
        LoadScand(keys=["image", "label"])(item)
    adrenal = load_datalist("adrenalmnist3d", data_dir, split="val")[0]
    img = LoadScanD(keys="image")(adrenal)["image"]
    assert isinstance(img, MetaTensor) and img.shape == (1, 28, 28, 28)
    bad = dict(adrenal, image=np.full((1, 4, 4, 4), np.nan, dtype=np.float32))
    with pytest.raises(ScanLoadError, match=r"^image: <in-memory array>: 64 NaN"):
        LoadScanDict(keys="image")(bad)


# ---------------------------------------------------------------------------------------------------------- errors


def test_missing_file(load, tmp_path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(ScanLoadError, match=f"^image: {missing}: file not found"):
        load({"image": str(missing), "label": str(missing)})
    with pytest.raises(ScanLoadError, match=f"^{missing}: file not found"):
        LoadScan()(missing)


def test_truncated_and_garbage_nifti(load, data_dir, tmp_path):
    src = data_dir / "totalsegmentator" / "example_seg.nii.gz"
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(src.read_bytes()[:20_000])
    item = {"image": str(data_dir / "totalsegmentator" / "example_ct_sm.nii.gz"), "label": str(truncated)}
    with pytest.raises(ScanLoadError, match=f"^label: {truncated}: cannot be read"):
        load(item)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"this is not a NIfTI file" * 100))
    with pytest.raises(ScanLoadError, match=f"^label: {garbage}: cannot be read"):
        load(dict(item, label=str(garbage)))
    with pytest.raises(ScanLoadError, match=f"subject 'x': label: {garbage}"):
        validate_datalist([dict(item, label=str(garbage), subject="x")])


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_dicom_series(data_dir, tmp_path, damage):
    folder, files = _copy_dicom(data_dir, tmp_path)
    victim = files[9]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:20_000])
    else:
        victim.write_bytes(np.random.default_rng(0).bytes(5_000))
    # MONAI/ITK alone would silently load the 19 remaining slices
    message = rf"^image: {folder}: unreadable DICOM series folder: 1 of 20 files .*{victim.name}"
    with pytest.raises(ScanLoadError, match=message):
        LoadScand(keys="image")({"image": str(folder)})
    with pytest.raises(ScanLoadError, match=rf"subject 'totalseg_ct2': image: {folder}: .*{victim.name}"):
        validate_datalist([{"image": str(folder), "subject": "totalseg_ct2"}])


def test_geometry_mismatch(load, data_dir, tmp_path):
    ts = data_dir / "totalsegmentator"
    ct1, crop_seg = str(ts / "example_ct.nii.gz"), str(ts / "example_seg.nii.gz")
    with pytest.raises(ScanLoadError, match=rf"^label: {crop_seg}: grid differs from image .*\(122, 101, 30\) vs"):
        load({"image": ct1, "label": crop_seg})
    img = nib.load(crop_seg)
    for shift, fails in ((0.01, True), (0.0004, False)):
        affine = img.affine.copy()
        affine[2, 3] += shift
        shifted = _nifti_copy(crop_seg, tmp_path / f"shifted_{shift}.nii.gz", affine=affine)
        item = {"image": str(ts / "example_ct_sm.nii.gz"), "label": shifted}
        if fails:
            with pytest.raises(ScanLoadError, match=rf"^label: {shifted}: .*affines differ by up to 0.01 mm"):
                load(item)
        else:
            assert load(item)["label"].shape == (1, 122, 101, 30)
    out = LoadScand(keys=["image", "label"], check_geometry=False)({"image": ct1, "label": crop_seg})
    assert out["label"].shape[-1] == 30


def test_non_finite_intensities(load, data_dir, tmp_path):
    src = data_dir / "totalsegmentator" / "example_ct_sm.nii.gz"
    data = np.asarray(nib.load(src).dataobj).astype(np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, 0] = np.inf
    bad = _nifti_copy(src, tmp_path / "nan.nii.gz", data=data)
    item = {"image": bad, "label": str(data_dir / "totalsegmentator" / "example_seg.nii.gz")}
    with pytest.raises(ScanLoadError, match=f"^image: {bad}: 3 NaN and 1 infinite intensities"):
        load(item)
    assert torch.isnan(LoadScand(keys=["image", "label"], check_finite=False)(item)["image"]).sum() == 3


def test_unknown_npz_key(load, data_dir):
    scan = data_dir / "voxelmorph" / "test_scan.npz"
    with pytest.raises(ScanLoadError, match=rf"^label: {scan}#aseg: cannot be read .*no array 'aseg'"):
        load({"image": f"{scan}#vol", "label": f"{scan}#aseg"})


def test_validate_every_source(data_dir):
    for name in SOURCES:
        if name != "adrenalmnist3d":
            items = load_datalist(name, data_dir)
            assert validate_datalist(items) is items
    item = dict(load_datalist("totalseg_ct1", data_dir)[0], label=str(data_dir / "missing.nii.gz"))
    with pytest.raises(ScanLoadError, match=r"^subject 'totalseg_ct1': label: .*missing.nii.gz: FileNotFoundError"):
        validate_datalist([item])
