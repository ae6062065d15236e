"""Real-data datalists: subjects, counts, structure ids checked against the files, names, download via file://."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai.apps.utils import HashCheckError
from monai_metalearn.data.names import (
    FREESURFER_NAMES,
    STRUCTURE_NAMES,
    TOTALSEG_NAMES,
    canonical_name,
)
from monai_metalearn.data.readers import split_npz_path
from monai_metalearn.data.sources import SOURCES, get_source, load_datalist
from monai_metalearn.data.sources import data_dir as resolve_data_dir

# source -> (number of items, subjects, structures per item)
EXPECTED = {
    "totalseg_ct1": (1, {"totalseg_ct1"}, [61]),
    "totalseg_ct1_crop": (1, {"totalseg_ct1"}, [41]),
    "totalseg_ct2": (1, {"totalseg_ct2"}, [31]),
    "voxelmorph_t1": (1, {"voxelmorph_test_scan"}, [45]),
    "synthseg": (20, {f"synthseg_{i:02d}" for i in range(1, 21)}, None),
    "ivadomed_spleen": (1, {"msd_spleen_2"}, [1]),
    "ivadomed_spinal_cord": (3, {"ivadomed_sub-unf01"}, [1, 1, 1]),
    "sct_spinal_cord": (7, {"sct_errsm_30"}, [1] * 7),
    "pyradiomics": (
        4,
        {"pyradiomics_brain1", "pyradiomics_brain2", "pyradiomics_breast1", "pyradiomics_prostate_phantom"},
        [1, 1, 1, 4],
    ),
    # multi-subject sets (shared layout): BTCV subject 12 has no gallbladder; ED and ES of a patient share a subject
    "btcv_sabs": (20, {f"btcv_sabs_{i:02d}" for i in range(20)}, [13] * 12 + [12] + [13] * 7),
    "chaos_t2": (10, {f"chaos_{i:02d}" for i in (1, 2, 3, 5, 8, 10, 13, 15, 19, 20)}, [4] * 10),
    "acdc": (60, {f"acdc_patient{g + i:03d}" for g in (0, 20, 40, 60, 80) for i in range(1, 7)}, [3] * 60),
    "lpba40": (6, {f"lpba40_S{i:02d}" for i in range(1, 7)}, [56] * 6),
}
# source -> the intensity kind of its items (consumers pick the normalisation from it)
INTENSITY = {
    "totalseg_ct1": "ct_hu",
    "totalseg_ct1_crop": "ct_hu",
    "totalseg_ct2": "ct_hu",
    "ivadomed_spleen": "ct_hu",
    "btcv_sabs": "ct_windowed",
    "adrenalmnist3d": "binary",
    **{name: "mr" for name in ("voxelmorph_t1", "synthseg", "ivadomed_spinal_cord", "sct_spinal_cord")},
    **{name: "mr" for name in ("pyradiomics", "chaos_t2", "acdc", "lpba40")},
}
SCAN_SOURCES = sorted(EXPECTED)


def _load_ids(path: str, threshold: float | None = None) -> set[int]:
    file, key = split_npz_path(path)
    if key is not None:
        array = np.load(file)[key]
    elif file.endswith(".nrrd"):
        import itk

        array = itk.array_from_image(itk.imread(file))
    else:
        array = np.asarray(nib.load(file).dataobj)
    if threshold is not None:
        array = array > threshold
    return {int(v) for v in np.unique(array) if v != 0}


@pytest.fixture(scope="module")
def lists(data_dir):
    return {name: load_datalist(name, data_dir) for name in SCAN_SOURCES}


def test_data_dir_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("MONAI_DATA_DIRECTORY", raising=False)
    with pytest.raises(FileNotFoundError, match="MONAI_DATA_DIRECTORY is not set"):
        resolve_data_dir()
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("MONAI_DATA_DIRECTORY", str(missing))
    with pytest.raises(FileNotFoundError, match=f"MONAI_DATA_DIRECTORY={missing}"):
        resolve_data_dir()
    assert resolve_data_dir(tmp_path) == tmp_path


def test_get_source_lists_valid_names():
    with pytest.raises(KeyError, match="valid names: totalseg_ct1, totalseg_ct1_crop"):
        get_source("totalseg")
    assert set(SOURCES) == set(EXPECTED) | {"adrenalmnist3d"}
    assert {"btcv_sabs", "chaos_t2", "acdc", "lpba40"} <= set(SOURCES)


def test_every_item_of_every_source_declares_its_intensity(lists, data_dir):
    from monai_metalearn.transforms.intensity import INTENSITY_KINDS

    assert set(INTENSITY) == set(SOURCES)
    everything = dict(lists, adrenalmnist3d=load_datalist("adrenalmnist3d", data_dir, split="val"))
    for name, items in everything.items():
        assert get_source(name).intensity == INTENSITY[name]
        assert {it["intensity"] for it in items} == {INTENSITY[name]}, name
        assert INTENSITY[name] in INTENSITY_KINDS
        # an HU window is for CT in Hounsfield units only: never for MR, windowed CT or masks
        assert (INTENSITY[name] == "mr") is (get_source(name).modality == "MR"), name


@pytest.mark.parametrize("name", SCAN_SOURCES)
def test_datalist_subjects_counts_and_fields(lists, name):
    items = lists[name]
    count, subjects, n_structures = EXPECTED[name]
    source = get_source(name)
    assert len(items) == count
    assert {it["subject"] for it in items} == subjects
    if n_structures is not None:
        assert [len(it["structures"]) for it in items] == n_structures
    for it in items:
        assert it["source"] == name and it["modality"] == source.modality in ("CT", "MR")
        assert it["synthetic"] is source.synthetic_images
        assert set(it["structures"]) <= STRUCTURE_NAMES
        assert ("image" in it) is (name != "synthseg")
        assert resolve_data_dir() in Path(split_npz_path(it["label"])[0]).parents


def test_subjects_unique_across_sources_except_the_ct1_crop(lists):
    owners: dict[str, set[str]] = {}
    for name, items in lists.items():
        for it in items:
            owners.setdefault(it["subject"], set()).add(name)
    shared = {s: o for s, o in owners.items() if len(o) > 1}
    assert shared == {"totalseg_ct1": {"totalseg_ct1", "totalseg_ct1_crop"}}


def test_synthseg_is_label_only_and_flagged_synthetic(lists):
    items = lists["synthseg"]
    assert all(it["synthetic"] is True and "image" not in it for it in items)
    with_72 = sorted(it["subject"] for it in items if "fifth_ventricle" in it["structures"])
    assert with_72 == [f"synthseg_{i:02d}" for i in (1, 5, 6, 8, 9, 11, 12, 15, 19)]
    assert {len(it["structures"]) for it in items} == {52, 53}


@pytest.mark.parametrize(
    "name, index",
    [("totalseg_ct1", 0), ("totalseg_ct1_crop", 0), ("totalseg_ct2", 0), ("voxelmorph_t1", 0), ("synthseg", 0)]
    + [("synthseg", 1), ("ivadomed_spleen", 0), ("pyradiomics", 3), ("pyradiomics", 2)]
    + [("sct_spinal_cord", i) for i in range(7)]
    + [("ivadomed_spinal_cord", i) for i in range(3)],
)
def test_hard_coded_structure_ids_match_the_label_maps(lists, name, index):
    item = lists[name][index]
    present = _load_ids(item["label"], item.get("label_threshold"))
    assert present == set(item["structures"].values())


def test_liver_id_agrees_between_ct1_and_ct2(lists):
    for name in ("totalseg_ct1", "totalseg_ct2"):
        item = lists[name][0]
        img = nib.load(item["label"])
        seg = np.asarray(img.dataobj).astype(np.int64)
        ml = np.bincount(seg.ravel()) * float(np.prod(img.header.get_zooms()[:3])) / 1000.0
        liver, spleen = item["structures"]["liver"], item["structures"]["spleen"]
        assert liver == 5 and spleen == 1
        assert ml[liver] > 500, f"{name}: liver of {ml[liver]:.0f} ml"  # 1126 ml (CT-1), 699 ml in CT-2's 40 mm slab
        solid = ("spleen", "stomach", "pancreas", "kidney_left")
        organs = [item["structures"][o] for o in solid if o in item["structures"]]
        assert ml[liver] > 2 * max(ml[organs]), "the liver is by far the largest solid abdominal organ"

        def world_x(label_id, seg=seg, affine=img.affine):
            return (affine[:3, :3] @ np.argwhere(seg == label_id).mean(0) + affine[:3, 3])[0]

        assert world_x(liver) > 0 > world_x(spleen), "RAS x: liver on the subject's right, spleen on the left"


def test_hippocampus_sides_agree_between_voxelmorph_and_synthseg(lists):
    vxm = lists["voxelmorph_t1"][0]
    file, key = split_npz_path(vxm["label"])
    seg = np.load(file)[key]
    syn = np.asarray(nib.load(lists["synthseg"][6]["label"]).dataobj)
    for array, structures in ((seg, vxm["structures"]), (syn, lists["synthseg"][6]["structures"])):

        def centre(name, array=array, structures=structures):
            return np.argwhere(array == structures[name]).mean(0)

        # LIA: axis 0 towards the subject's left, axis 1 towards inferior
        assert centre("hippocampus_left")[0] > centre("hippocampus_right")[0] + 30
        assert centre("lateral_ventricle_left")[0] > centre("lateral_ventricle_right")[0]
        assert centre("brainstem")[1] > centre("lateral_ventricle_left")[1] + 20
    assert vxm["structures"]["hippocampus_left"] == 17 and vxm["structures"]["hippocampus_right"] == 53


def test_spinal_cord_shared_name_across_ct_and_mr(lists):
    for name in ("totalseg_ct1", "totalseg_ct2", "ivadomed_spinal_cord", "sct_spinal_cord", "synthseg"):
        assert any("spinal_cord" in it["structures"] for it in lists[name]), name
    assert lists["synthseg"][0]["structures"]["spinal_cord"] == 512


def test_totalseg_names_match_class_map(data_dir):
    class_map = json.loads((data_dir / "totalsegmentator" / "class_map.json").read_text())["total"]
    assert {int(k): v for k, v in class_map.items()} == dict(TOTALSEG_NAMES)


def test_freesurfer_names_cover_synthseg_table(data_dir):
    lines = (data_dir / "synthseg" / "labels_table.txt").read_text().splitlines()
    rows = [line.split(None, 1) for line in lines if line[:1].isdigit()]
    assert len(rows) == 33
    for label, text in rows:
        if int(label):
            assert canonical_name(text) == FREESURFER_NAMES[int(label)], text


@pytest.mark.parametrize(
    "spelling, canonical",
    [
        ("Left-Hippocampus", "hippocampus_left"),
        ("left hippocampus", "hippocampus_left"),
        ("Right-Inf-Lat-Vent", "inferior_lateral_ventricle_right"),
        ("Brain-Stem", "brainstem"),
        ("3rd-Ventricle", "third_ventricle"),
        ("Liver", "liver"),
        ("left kidney", "kidney_left"),
        ("vertebrae l1", "vertebrae_L1"),
        ("spinal cord grey matter", "spinal_cord_gray_matter"),
        ("Other-Tissues", "extracerebral_soft_tissue"),
        ("Left Ventricle", "left_ventricle"),
        ("RV", "right_ventricle"),
        ("Myocardium", "myocardium"),
        ("superior frontal gyrus left", "superior_frontal_gyrus_left"),
        ("L superior frontal gyrus", "superior_frontal_gyrus_left"),
        ("R caudate", "caudate_right"),
        ("Cerebellum", "cerebellum"),
        ("right adrenal gland", "adrenal_gland_right"),
        ("portal vein and splenic vein", "portal_vein_and_splenic_vein"),
    ],
)
def test_canonical_name(spelling, canonical):
    assert canonical_name(spelling) == canonical


def test_canonical_name_unknown_lists_close_matches():
    with pytest.raises(KeyError, match="closest known names: hippocampus_left"):
        canonical_name("hipocampus left")
    with pytest.raises(KeyError, match="unknown structure name 'zzz'"):
        canonical_name("zzz")


def test_adrenalmnist3d_splits_and_arrays(data_dir):
    everything = load_datalist("adrenalmnist3d", data_dir)
    assert len(everything) == 1584 and len({it["subject"] for it in everything}) == 1584
    train = [it for it in everything if it["split"] == "train"]
    assert len(train) == 1188 and sum(it["class"] == "adrenal_mass" for it in train) == 259
    val = load_datalist("adrenalmnist3d", data_dir, split="val", size=64)
    assert len(val) == 98 and val[0]["subject"] == "adrenal_val_0"
    image = val[0]["image"]
    assert image.shape == (1, 64, 64, 64) and image.dtype == np.float32
    assert set(np.unique(image)) == {0.0, 1.0}
    assert {it["class"] for it in val} == {"normal", "adrenal_mass"}
    with pytest.raises(ValueError, match="split must be"):
        load_datalist("adrenalmnist3d", data_dir, split="training")


def test_download_from_file_url(data_dir, tmp_path):
    source = get_source("totalseg_ct1_crop")
    base = (data_dir / "totalsegmentator").as_uri()
    folder = source.download(tmp_path, progress=False, base_url=base)
    assert folder == tmp_path / "totalsegmentator"
    for rel in source.files:
        assert (folder / rel).read_bytes() == (data_dir / "totalsegmentator" / rel).read_bytes()
    # files with the right hash are not fetched again: a dead mirror does not matter
    source.download(tmp_path, progress=False, base_url=(tmp_path / "no-mirror").as_uri())
    items = source.datalist(tmp_path)
    assert items[0]["label"] == str(folder / "example_seg.nii.gz")


def test_download_rejects_corrupted_files(data_dir, tmp_path):
    source = get_source("totalseg_ct1_crop")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copyfile(data_dir / "totalsegmentator" / "example_ct_sm.nii.gz", mirror / "example_ct_sm.nii.gz")
    (mirror / "example_seg.nii.gz").write_bytes(b"not the published file")
    with pytest.raises(HashCheckError, match="file example_seg.nii.gz .* does not match its sha256"):
        source.download(tmp_path / "root", progress=False, base_url=mirror.as_uri())
    # an existing local copy that was damaged is reported too, naming the file
    good = tmp_path / "good"
    source.download(good, progress=False, base_url=(data_dir / "totalsegmentator").as_uri())
    (good / "totalsegmentator" / "example_ct_sm.nii.gz").write_bytes(b"truncated")
    with pytest.raises(HashCheckError, match="example_ct_sm.nii.gz"):
        source.download(good, progress=False, base_url=(data_dir / "totalsegmentator").as_uri())


def test_datalist_names_missing_files(tmp_path):
    (tmp_path / "voxelmorph").mkdir()
    with pytest.raises(FileNotFoundError, match=r"source 'voxelmorph_t1'.*test_scan.npz.*download"):
        load_datalist("voxelmorph_t1", tmp_path)
