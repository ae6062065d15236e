"""The multi-subject sets (BTCV, CHAOS, ACDC, LPBA40): the real shared files, and the upstream layouts.

The real-data tests read every label map of the shared copies in place. The upstream-layout tests write tiny files
of their own in ``tmp_path`` (8x6x4 volumes, a 4-slice DICOM series, PNGs, Analyze pairs, an ``Info.cfg``): they are
fixtures for file layouts, never data.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from monai_metalearn.data import LabelIdError, LoadScan, LoadScand
from monai_metalearn.data.names import (
    ACDC_NAMES,
    BTCV_NAMES,
    CHAOS_NAMES,
    FREESURFER_NAMES,
    LPBA40_NAMES,
    STRUCTURE_NAMES,
    TOTALSEG_NAMES,
    canonical_name,
)
from monai_metalearn.data.sources import get_source, load_datalist
from monai_metalearn.data.upstream import chaos_grey_to_ids, read_acdc_info

MULTI = ("btcv_sabs", "chaos_t2", "acdc", "lpba40")
# the ids whose centres the tests compare (side checks)
CENTRES = {"liver", "spleen", "kidney_left", "kidney_right", "hippocampus_left", "hippocampus_right"}


def _summary(path: str, structures: dict[str, int]) -> dict:
    img = nib.load(path)
    seg = np.asarray(img.dataobj)
    assert np.array_equal(seg, np.round(seg)), f"{path}: non-integer labels"
    seg = seg.astype(np.int64)
    centres = {}
    for name in CENTRES & set(structures):
        voxel = np.argwhere(seg == structures[name]).mean(0)
        centres[name] = nib.affines.apply_affine(img.affine, voxel)  # RAS mm
    return {
        "ids": {int(v) for v in np.unique(seg) if v != 0},
        "counts": np.bincount(seg.ravel()),
        "shape": img.shape,
        "affine": img.affine,
        "zooms": tuple(float(z) for z in img.header.get_zooms()[:3]),
        "codes": "".join(nib.aff2axcodes(img.affine)),
        "centres": centres,
    }


@pytest.fixture(scope="session")  # session: built once even when xdist interleaves modules
def multi(data_dir):
    """Every item of the four sets, with a summary of its label map (each map read once)."""
    out = {}
    for name in MULTI:
        items = load_datalist(name, data_dir)
        out[name] = [(it, _summary(it["label"], it["structures"])) for it in items]
    return out


# ----------------------------------------------------------------------------------------------------------------
# The real shared files


def test_counts_subjects_and_fields(multi):
    assert {n: len(v) for n, v in multi.items()} == {"btcv_sabs": 20, "chaos_t2": 10, "acdc": 60, "lpba40": 6}
    assert [it["subject"] for it, _ in multi["btcv_sabs"]] == [f"btcv_sabs_{i:02d}" for i in range(20)]
    chaos_ids = (1, 2, 3, 5, 8, 10, 13, 15, 19, 20)
    assert [it["subject"] for it, _ in multi["chaos_t2"]] == [f"chaos_{i:02d}" for i in chaos_ids]
    assert len({it["subject"] for it, _ in multi["acdc"]}) == 30
    assert [it["subject"] for it, _ in multi["lpba40"]] == [f"lpba40_S{i:02d}" for i in range(1, 7)]
    contrast = {"btcv_sabs": None, "chaos_t2": "T2SPIR", "acdc": "cine", "lpba40": "T1w"}
    modality = {"btcv_sabs": "CT", "chaos_t2": "MR", "acdc": "MR", "lpba40": "MR"}
    for name, pairs in multi.items():
        for it, _ in pairs:
            assert it["source"] == name and it["synthetic"] is False and it["modality"] == modality[name]
            assert it.get("contrast") == contrast[name]
            assert Path(it["image"]).is_file() and Path(it["label"]).is_file()
            assert ("geometry" in it) is (name == "acdc")


TABLES = {"btcv_sabs": BTCV_NAMES, "chaos_t2": CHAOS_NAMES, "acdc": ACDC_NAMES, "lpba40": LPBA40_NAMES}


@pytest.mark.parametrize("name, table", sorted(TABLES.items()))
def test_structures_match_every_label_map(multi, name, table):
    for it, summary in multi[name]:
        assert set(it["structures"].values()) == summary["ids"], it["label"]
        assert all(table[i] == n for n, i in it["structures"].items())
        assert set(it["structures"]) <= STRUCTURE_NAMES
    without_gallbladder = [it["subject"] for it, _ in multi["btcv_sabs"] if "gallbladder" not in it["structures"]]
    assert without_gallbladder == ["btcv_sabs_12"]


def test_names_tables_match_the_labels_json_files(data_dir):
    for folder, table in TABLES.items():
        labels = json.loads((data_dir / folder / "labels.json").read_text())
        assert {int(k): v for k, v in labels.items()} == dict(table), folder
    assert len(LPBA40_NAMES) == 56 and min(LPBA40_NAMES) == 21 and max(LPBA40_NAMES) == 182


GEOMETRY = {  # source -> orientation codes of image and label
    "btcv_sabs": "LPS",
    "chaos_t2": "LAS",
    "acdc": "RAS",  # a nominal diagonal affine: the codes say nothing about the anatomy
    "lpba40": "LPS",
}


@pytest.mark.parametrize("name", MULTI)
def test_geometry_as_the_data_readme_says(multi, name):
    for it, summary in multi[name]:
        image = nib.load(it["image"])
        assert image.shape == summary["shape"] and np.allclose(image.affine, summary["affine"], atol=1e-3)
        assert summary["codes"] == GEOMETRY[name]
        shape, zooms = summary["shape"], summary["zooms"]
        if name == "btcv_sabs":
            assert shape[:2] == (257, 257) and 85 <= shape[2] <= 199
            assert 1.0 <= zooms[0] == zooms[1] <= 1.75 and zooms[2] in (2.5, 3.0, 5.0)
        elif name == "chaos_t2":
            assert shape[:2] == (256, 256) and 31 <= shape[2] <= 46
            assert np.allclose(zooms, (1.25, 1.25, 7.7), atol=1e-3)
        elif name == "acdc":
            assert np.allclose(zooms, (1.5, 1.5, 8.0)) and it["geometry"] == "nominal"
            assert np.allclose(summary["affine"][:3, :3], np.diag([1.5, 1.5, 8.0]))
        else:
            assert shape == (160, 192, 160) and zooms == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "name, index", [("btcv_sabs", 0), ("btcv_sabs", 12), ("chaos_t2", 9), ("acdc", 0), ("acdc", 59), ("lpba40", 5)]
)
def test_image_and_label_load_as_one_grid(multi, name, index):
    item, summary = multi[name][index]
    out = LoadScand(keys=["image", "label"])(item)  # raises on any grid mismatch
    image, label = out["image"], out["label"]
    assert image.shape == label.shape == (1, *summary["shape"])
    assert set(torch.unique(label).long().tolist()) - {0} == set(item["structures"].values())
    low, high = float(image.min()), float(image.max())
    if name == "btcv_sabs":
        assert nib.load(item["image"]).get_data_dtype() == np.uint8 and (low, high) == (0.0, 255.0)
    elif name == "chaos_t2":
        assert low == 0.0 and 100 < high < 5000
    else:  # ACDC and LPBA40 were scaled to [0, 1] by their republishers
        assert low == 0.0 and high == 1.0


def test_intensity_kinds_follow_the_values(multi, data_dir):
    for it, _ in multi["btcv_sabs"]:  # 8-bit display-windowed CT, never HU
        assert it["intensity"] == "ct_windowed" and nib.load(it["image"]).get_data_dtype() == np.uint8
    hu = [load_datalist(n, data_dir)[0] for n in ("totalseg_ct1", "totalseg_ct1_crop", "ivadomed_spleen")]
    for it in hu:
        assert it["intensity"] == "ct_hu" and np.asarray(nib.load(it["image"]).dataobj).min() < -500
    ct2 = load_datalist("totalseg_ct2", data_dir)[0]
    assert ct2["intensity"] == "ct_hu" and float(LoadScan()(ct2["image"]).min()) < -500
    for name in ("chaos_t2", "acdc", "lpba40"):
        assert {it["intensity"] for it, _ in multi[name]} == {"mr"}


def test_acdc_diagnoses_and_phases(multi, data_dir):
    items = [it for it, _ in multi["acdc"]]
    groups = json.loads((data_dir / "acdc" / "groups.json").read_text())
    per_group: dict[str, set[str]] = {}
    for it in items:
        assert it["diagnosis"] == groups[it["patient"]] and it["subject"] == f"acdc_{it['patient']}"
        assert Path(it["image"]).name == f"{it['patient']}_{it['phase']}.nii.gz"
        per_group.setdefault(it["diagnosis"], set()).add(it["patient"])
    assert {g: len(p) for g, p in per_group.items()} == {g: 6 for g in ("DCM", "HCM", "MINF", "NOR", "RV")}
    assert [it["phase"] for it in items] == ["ED", "ES"] * 30
    # end-diastole: the left ventricle is at its largest, for every patient
    lv = {(it["patient"], it["phase"]): s["counts"][it["structures"]["left_ventricle"]] for it, s in multi["acdc"]}
    assert all(lv[(p, "ED")] > lv[(p, "ES")] for p, _ in lv)
    ed = load_datalist("acdc", data_dir, phases=("ED",))
    assert len(ed) == 30 and {it["phase"] for it in ed} == {"ED"} and len({it["subject"] for it in ed}) == 30
    assert [it["phase"] for it in load_datalist("acdc", data_dir, phases="ES")] == ["ES"] * 30
    for bad in ((), ("ED", "ED"), ("systole",)):
        with pytest.raises(ValueError, match="phases must be"):
            load_datalist("acdc", data_dir, phases=bad)


def test_canonical_names_shared_across_sources(multi, data_dir):
    ct1 = load_datalist("totalseg_ct1", data_dir)[0]
    for it in (ct1, multi["btcv_sabs"][0][0], multi["chaos_t2"][0][0]):
        structures = it["structures"]
        assert {"liver", "spleen", "kidney_left", "kidney_right"} <= set(structures)
    assert (TOTALSEG_NAMES[5], BTCV_NAMES[6], CHAOS_NAMES[1]) == ("liver",) * 3
    for lpba, fs in ((161, 11), (163, 12), (165, 17), (166, 53), (182, 16)):
        assert LPBA40_NAMES[lpba] == FREESURFER_NAMES[fs]
    assert canonical_name("Left Ventricle") == ACDC_NAMES[3] and canonical_name("MYO") == "myocardium"
    assert canonical_name("superior frontal gyrus left") == LPBA40_NAMES[21]
    # the shared names mean the same anatomy: liver right of the spleen (RAS: x grows towards the subject's right)
    for name in ("btcv_sabs", "chaos_t2"):
        for it, summary in multi[name]:
            c = summary["centres"]
            assert c["liver"][0] > c["spleen"][0] + 50, it["subject"]
            assert c["kidney_right"][0] > c["kidney_left"][0] + 50, it["subject"]
    # LPBA40: the sides are consistent and well apart in every subject, but the structures LONI labels left (odd ids)
    # lie where the files' placeholder LPS affine (origin 0, Analyze has no orientation) puts the subject's RIGHT:
    # the description warns that world left/right is not to be trusted for this set
    for it, summary in multi["lpba40"]:
        c = summary["centres"]
        assert c["hippocampus_left"][0] > c["hippocampus_right"][0] + 30, it["subject"]
        assert np.allclose(summary["affine"], np.diag([-1.0, -1.0, 1.0, 1.0])), "the placeholder affine"
    assert "placeholder" in get_source("lpba40").description


# ----------------------------------------------------------------------------------------------------------------
# Layout selection, errors and downloads


def test_download_of_the_registered_sets_says_where_to_obtain_them(tmp_path):
    for name, where in (("btcv_sabs", "syn3193805"), ("chaos_t2", "3431873"), ("acdc", "Creatis"), ("lpba40", "LONI")):
        source = get_source(name)
        assert source.url == "" and where in source.obtain
        with pytest.raises(RuntimeError, match=rf"source '{name}' cannot be downloaded") as info:
            source.download(tmp_path)
        message = str(info.value)
        assert where in message and f"MONAI_DATA_DIRECTORY/{source.folder}" in message
        assert "shared layout" in message and "upstream layout" in message
        assert not (tmp_path / source.folder).exists()


@pytest.mark.parametrize("name", MULTI)
def test_neither_layout_names_the_folder_and_both_layouts(tmp_path, name):
    source = get_source(name)
    with pytest.raises(FileNotFoundError, match="shared layout .* or the upstream layout") as info:
        load_datalist(name, tmp_path)
    assert str(tmp_path / source.folder) in str(info.value) and source.obtain in str(info.value)
    (tmp_path / source.folder).mkdir()
    (tmp_path / source.folder / "stray.txt").write_text("not data")
    with pytest.raises(FileNotFoundError, match=re.escape(source.upstream.description)):
        load_datalist(name, tmp_path, layout="upstream")
    with pytest.raises(FileNotFoundError, match=rf"source '{name}': {len(source.files)} file\(s\) missing"):
        load_datalist(name, tmp_path, layout="shared")


def test_layout_argument(data_dir):
    assert len(load_datalist("lpba40", data_dir, layout="shared")) == 6
    with pytest.raises(FileNotFoundError, match="upstream layout"):
        load_datalist("lpba40", data_dir, layout="upstream")  # the shared copy is not the LONI layout
    with pytest.raises(ValueError, match="layout must be one of"):
        load_datalist("lpba40", data_dir, layout="original")
    with pytest.raises(ValueError, match="has one layout only"):
        load_datalist("totalseg_ct1", data_dir, layout="upstream")
    assert len(load_datalist("totalseg_ct1", data_dir, layout="shared")) == 1


# ----------------------------------------------------------------------------------------------------------------
# Upstream layouts, on tiny files written here

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _labels(ids, shape=(8, 6, 4)) -> np.ndarray:
    seg = np.zeros(shape, dtype=np.uint8)
    for n, i in enumerate(ids):
        seg[n % shape[0], :, n % shape[2]] = i
    return seg


@pytest.mark.parametrize("prefix", ["", "RawData/Training", "Abdomen/RawData/Training"])
def test_btcv_upstream_layout(tmp_path, prefix):
    base = tmp_path / "btcv_sabs" / prefix
    hu = np.full((8, 6, 4), -1000, dtype=np.int16)
    hu[2:6, 1:5] = 60
    for case, ids in (("0001", (1, 6)), ("0002", (6, 13))):
        _nifti(base / "img" / f"img{case}.nii.gz", hu)
        _nifti(base / "label" / f"label{case}.nii.gz", _labels(ids))
    items = load_datalist("btcv_sabs", tmp_path)
    assert items == load_datalist("btcv_sabs", tmp_path, layout="upstream")
    assert [it["subject"] for it in items] == ["btcv_0001", "btcv_0002"]
    assert items[0]["structures"] == {"spleen": 1, "liver": 6}
    assert items[1]["structures"] == {"liver": 6, "adrenal_gland_left": 13}
    assert {it["intensity"] for it in items} == {"ct_hu"} and {it["modality"] for it in items} == {"CT"}
    assert items[0]["image"] == str(base / "img" / "img0001.nii.gz")
    out = LoadScand(keys=["image", "label"])(items[1])
    assert float(out["image"].min()) == -1000.0
    with pytest.raises(FileNotFoundError, match=r"40 file\(s\) missing"):
        load_datalist("btcv_sabs", tmp_path, layout="shared")
    _nifti(base / "label" / "label0002.nii.gz", _labels((6, 14)))  # 14 is no BTCV id
    with pytest.raises(LabelIdError, match=r"label0002.nii.gz holds values 14 "):
        load_datalist("btcv_sabs", tmp_path)
    (base / "label" / "label0002.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="label0002.nii.gz"):
        load_datalist("btcv_sabs", tmp_path)


# --- CHAOS: a 4-slice DICOM series and its PNG ground truth

ROWS, COLUMNS, SLICES = 6, 8, 4
GREYS = (0, 63, 126, 189, 252, 60, 130, 180, 245)  # background, the nominal values, values inside the ranges
GREY_IDS = (0, 1, 2, 3, 4, 1, 2, 3, 4)


def _write_series(folder: Path, orientation, origin_of, stem="IMG-0002-") -> list[np.ndarray]:
    """Write a DICOM MR series; file k holds pixel values k*48 + r*8 + c + 1 (unique); returns the pixel arrays."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    arrays = []
    for k in range(SLICES):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "MR", "layout-fixture"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in origin_of(k)]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing, ds.SliceThickness = [1.5, 1.25], 7.7
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLUMNS, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        pixels = (k * ROWS * COLUMNS + np.arange(ROWS * COLUMNS).reshape(ROWS, COLUMNS) + 1).astype(np.uint16)
        ds.PixelData = pixels.tobytes()
        ds.save_as(str(folder / f"{stem}{k + 1:05d}.dcm"), enforce_file_format=True)
        arrays.append(pixels)
    assert pydicom.dcmread(str(folder / f"{stem}00001.dcm")).Rows == ROWS
    return arrays


def _ground(k: int) -> np.ndarray:
    r, c = np.mgrid[:ROWS, :COLUMNS]
    return np.asarray(GREYS, dtype=np.uint8)[(r + 2 * c + 3 * k) % len(GREYS)]


def _write_case(mr: Path, case: int, orientation, origin_of) -> tuple[Path, Path, list[np.ndarray]]:
    t2 = mr / str(case) / "T2SPIR"
    pixels = _write_series(t2 / "DICOM_anon", orientation, origin_of)
    (t2 / "Ground").mkdir()
    for k in range(SLICES):
        Image.fromarray(_ground(k), mode="L").save(t2 / "Ground" / f"IMG-0002-{k + 1:05d}.png")
    return t2 / "DICOM_anon", t2 / "Ground", pixels


SERIES = {  # orientation, position of file k: file order against the slice direction, to catch order mix-ups
    "axial": ((1, 0, 0, 0, 1, 0), lambda k: (-10.0, 20.0, 7.7 * (SLICES - 1 - k))),
    "coronal": ((1, 0, 0, 0, 0, -1), lambda k: (5.0, -7.7 * k, 30.0)),
}


@pytest.mark.parametrize("prefix", ["Train_Sets/MR", "MR"])
@pytest.mark.parametrize("series", sorted(SERIES))
def test_chaos_upstream_ground_truth_lands_on_the_dicom_voxels(tmp_path, prefix, series):
    dicom, ground, pixels = _write_case(tmp_path / "chaos_t2" / prefix, 5, *SERIES[series])
    cache = tmp_path / "cache"
    items = load_datalist("chaos_t2", tmp_path, cache_dir=cache)
    assert len(items) == 1
    item = items[0]
    assert item["subject"] == "chaos_05" and item["image"] == str(dicom) and Path(item["label"]).parent == cache
    assert item["contrast"] == "T2SPIR" and item["intensity"] == "mr" and item["modality"] == "MR"
    assert item["structures"] == {"liver": 1, "kidney_right": 2, "kidney_left": 3, "spleen": 4}
    out = LoadScand(keys=["image", "label"])(item)  # one grid, or it raises
    reference = LoadScan()(str(dicom))
    assert out["label"].shape == reference.shape == (1, COLUMNS, ROWS, SLICES)
    assert np.allclose(out["label"].affine, reference.affine, atol=1e-4)
    # every PNG pixel lands on the voxel of its DICOM pixel: look the voxel up by the slice's unique pixel value
    image, label = out["image"].numpy().ravel(), out["label"].numpy().ravel()
    label_of_value = dict(zip(image.astype(int).tolist(), label.astype(int).tolist()))
    for k in range(SLICES):
        expected = np.asarray(GREY_IDS)[[GREYS.index(g) for g in _ground(k).ravel()]].reshape(ROWS, COLUMNS)
        got = np.vectorize(label_of_value.get)(pixels[k])
        assert np.array_equal(got, expected), f"slice {k}"


def test_chaos_label_cache_is_reused_until_the_pngs_change(tmp_path):
    _, ground, _ = _write_case(tmp_path / "chaos_t2" / "Train_Sets" / "MR", 13, *SERIES["axial"])
    cache = tmp_path / "cache"
    label = Path(load_datalist("chaos_t2", tmp_path, cache_dir=cache)[0]["label"])
    assert label.name.startswith("chaos_13_") and label.name.endswith("_label.nii.gz")
    stamp = label.stat().st_mtime_ns
    assert load_datalist("chaos_t2", tmp_path, cache_dir=cache)[0]["label"] == str(label)
    assert label.stat().st_mtime_ns == stamp  # re-used, not converted again
    png = ground / "IMG-0002-00001.png"
    Image.fromarray(np.full((ROWS, COLUMNS), 252, dtype=np.uint8), mode="L").save(png)
    os.utime(png, ns=(stamp + 10**9, stamp + 10**9))
    item = load_datalist("chaos_t2", tmp_path, cache_dir=cache)[0]
    assert item["label"] == str(label) and label.stat().st_mtime_ns > stamp
    converted = np.asarray(nib.load(label).dataobj)
    assert (converted == 4).sum() >= ROWS * COLUMNS  # the first file's slice is all spleen now
    # grey values outside every CHAOS range are an error naming the PNG
    Image.fromarray(np.full((ROWS, COLUMNS), 100, dtype=np.uint8), mode="L").save(png)
    with pytest.raises(LabelIdError, match=r"IMG-0002-00001.png: grey values 100 "):
        load_datalist("chaos_t2", tmp_path, cache_dir=cache)
    (ground / "IMG-0002-00004.png").unlink()
    with pytest.raises(ValueError, match="4 DICOM files .* but 3 ground-truth PNGs"):
        load_datalist("chaos_t2", tmp_path, cache_dir=cache)


def test_chaos_grey_ranges():
    grey = np.array([[0, 55, 70, 110, 135], [175, 200, 240, 255, 63]])
    assert chaos_grey_to_ids(grey).tolist() == [[0, 1, 1, 2, 2], [3, 3, 4, 4, 1]]
    for bad in (54, 71, 140, 201):
        with pytest.raises(LabelIdError, match=f"grey values {bad} "):
            chaos_grey_to_ids(np.array([[0, bad]]), "g.png")


# --- ACDC


def _acdc_patient(folder: Path, info: str, frames: dict[int, tuple | None]) -> Path:
    folder.mkdir(parents=True)
    (folder / "Info.cfg").write_text(info)
    for frame, ids in frames.items():
        _nifti(folder / f"{folder.name}_frame{frame:02d}.nii.gz", np.full((8, 6, 4), frame, dtype=np.float32))
        if ids is not None:
            _nifti(folder / f"{folder.name}_frame{frame:02d}_gt.nii.gz", _labels(ids))
    return folder


INFO_001 = "ED: 1\nES: 3\nGroup: HCM\nHeight: 184.0\nNbFrame: 4\nWeight: 95.0\n"


@pytest.mark.parametrize("prefix", ["training", "database/training", ""])
def test_acdc_upstream_frames_and_diagnosis_from_info_cfg(tmp_path, prefix):
    root = tmp_path / "acdc" / prefix
    _acdc_patient(root / "patient001", INFO_001, {1: (1, 2, 3), 2: None, 3: (2, 3)})
    testing = tmp_path / "acdc" / ("database/testing" if prefix.startswith("database") else "testing")
    _acdc_patient(testing / "patient101", "ED: 2\nES: 1\nGroup: NOR\nNbFrame: 2\n", {1: (1, 3), 2: (1, 2, 3)})
    _acdc_patient(testing / "patient102", "ED: 1\nES: 2\nGroup: RV\n", {1: None, 2: None})  # no ground truth
    items = load_datalist("acdc", tmp_path)
    assert [(it["patient"], it["phase"], it["frame"]) for it in items] == [
        ("patient001", "ED", 1),
        ("patient001", "ES", 3),
        ("patient101", "ED", 2),
        ("patient101", "ES", 1),
    ]
    assert [it["diagnosis"] for it in items] == ["HCM", "HCM", "NOR", "NOR"]
    assert [it["subject"] for it in items] == ["acdc_patient001"] * 2 + ["acdc_patient101"] * 2
    assert items[1]["image"].endswith("patient001_frame03.nii.gz") and items[1]["label"].endswith("frame03_gt.nii.gz")
    assert items[0]["structures"] == {"right_ventricle": 1, "myocardium": 2, "left_ventricle": 3}
    assert items[1]["structures"] == {"myocardium": 2, "left_ventricle": 3}
    assert all("geometry" not in it and it["contrast"] == "cine" for it in items)  # upstream geometry is real
    out = LoadScand(keys=["image", "label"])(items[1])
    assert float(out["image"].max()) == 3.0  # frame 3's image, written with value 3
    es = load_datalist("acdc", tmp_path, layout="upstream", phases=("ES",))
    assert [it["frame"] for it in es] == [3, 1]


def test_acdc_info_cfg_and_missing_frames(tmp_path):
    info = tmp_path / "Info.cfg"
    info.write_text(INFO_001)
    assert read_acdc_info(info) == {"ED": 1, "ES": 3, "Group": "HCM", "Height": 184.0, "NbFrame": 4, "Weight": 95.0}
    info.write_text("ED: 1\nGroup: DCM\n")
    with pytest.raises(ValueError, match="Info.cfg: no readable ES"):
        read_acdc_info(info)
    _acdc_patient(tmp_path / "acdc" / "training" / "patient007", INFO_001, {1: (1,), 3: None})
    with pytest.raises(FileNotFoundError, match=r"patient007_frame03_gt.nii.gz \(ES\)"):
        load_datalist("acdc", tmp_path)


# --- LPBA40


def _analyze(path: Path, array: np.ndarray, form: str) -> None:
    """Write ``array`` as ``path`` (``name.hdr``) in the given form: .hdr + .img, .hdr + .img.gz, or .nii.gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if form == "nii.gz":
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(path.with_suffix(".nii.gz")))
        return
    nib.save(nib.AnalyzeImage(array, np.eye(4)), str(path))
    if form == "img.gz":
        img = path.with_suffix(".img")
        with open(img, "rb") as raw, gzip.open(path.with_suffix(".img.gz"), "wb") as packed:
            packed.write(raw.read())
        img.unlink()


@pytest.mark.parametrize("prefix", ["", "LPBA40"])
@pytest.mark.parametrize("form", ["img", "img.gz", "nii.gz"])
def test_lpba40_upstream_layout(tmp_path, prefix, form):
    space = tmp_path / "lpba40" / prefix / "delineation_space"
    t1 = np.arange(8 * 6 * 4, dtype=np.int16).reshape(8, 6, 4)
    for subject, ids in (("S01", (21, 182)), ("S02", (161, 165, 166))):
        _analyze(space / subject / f"{subject}.delineation.skullstripped.hdr", t1, form)
        _analyze(space / subject / f"{subject}.delineation.structure.label.hdr", _labels(ids).astype(np.int16), form)
    items = load_datalist("lpba40", tmp_path)
    assert [it["subject"] for it in items] == ["lpba40_S01", "lpba40_S02"]
    assert items[0]["structures"] == {"superior_frontal_gyrus_left": 21, "brainstem": 182}
    assert items[1]["structures"] == {"caudate_left": 161, "hippocampus_left": 165, "hippocampus_right": 166}
    assert items[0]["contrast"] == "T1w" and items[0]["intensity"] == "mr"
    assert items[0]["image"].endswith(".hdr" if form != "nii.gz" else ".nii.gz")
    out = LoadScand(keys=["image", "label"], dtype=None)(items[1])
    assert np.array_equal(out["image"][0].numpy(), t1)
    assert np.array_equal(out["label"][0].numpy(), _labels((161, 165, 166)))


def test_lpba40_upstream_errors(tmp_path):
    subject = tmp_path / "lpba40" / "delineation_space" / "S03"
    t1 = np.ones((8, 6, 4), dtype=np.int16)
    _analyze(subject / "S03.delineation.skullstripped.hdr", t1, "img")
    with pytest.raises(FileNotFoundError, match="S03: no .*S03.delineation.structure.label"):
        load_datalist("lpba40", tmp_path)
    _analyze(subject / "S03.delineation.structure.label.hdr", _labels((21, 19)).astype(np.int16), "img")
    with pytest.raises(LabelIdError, match=r"S03.delineation.structure.label.hdr holds values 19 "):
        load_datalist("lpba40", tmp_path)
    (subject / "S03.delineation.structure.label.img").unlink()
    with pytest.raises(FileNotFoundError, match=r"S03.delineation.structure.label.hdr has no image data"):
        load_datalist("lpba40", tmp_path)


def test_sources_validate_their_intensity_and_where_to_obtain_them():
    from dataclasses import replace

    with pytest.raises(ValueError, match="intensity must be one of"):
        replace(get_source("lpba40"), intensity="hu")
    with pytest.raises(ValueError, match="must say where to obtain it"):
        replace(get_source("acdc"), obtain="")
