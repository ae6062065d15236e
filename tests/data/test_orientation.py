"""Header orientation corrections: ``LoadScand``'s ``orientation`` key, BTCV's shared layout, task-file masks."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from monai.data import MetaTensor
from monai_metalearn.data import LoadScand, ScanLoadError, correct_orientation, file_orientation, scan_reader
from monai_metalearn.data.patches import reader_input
from monai_metalearn.data.sources import load_datalist


def _centre(label: MetaTensor, ids) -> np.ndarray:
    vox = np.argwhere(np.isin(label[0].numpy(), ids)).mean(0)
    return nib.affines.apply_affine(label.affine.numpy(), vox)


def test_correct_orientation_mirrors_only_the_named_axes():
    affine = np.array([[-1.5, 0, 0, 10.0], [0, -1.2, 0, 20.0], [0, 0, 3.0, -5.0], [0, 0, 0, 1]])
    data = torch.arange(24.0).reshape(1, 2, 3, 4)
    img = MetaTensor(data, affine=torch.as_tensor(affine))
    out = correct_orientation(img, "las")
    assert nib.aff2axcodes(out.affine.numpy()) == ("L", "A", "S")
    expected = affine.copy()
    expected[1, :] *= -1  # the world y row only: voxel (i, j, k) -> (x, -y, z)
    np.testing.assert_allclose(out.affine.numpy(), expected)
    np.testing.assert_allclose(out.meta["header_affine"].numpy(), affine)
    assert torch.equal(out.as_tensor(), data)  # the voxels do not move
    assert correct_orientation(img, "LPS").affine.numpy().tolist() == affine.tolist()  # the header's own codes
    with pytest.raises(ScanLoadError, match="permutes the header's axes"):
        correct_orientation(img, "PLS")
    with pytest.raises(ScanLoadError, match="three codes"):
        correct_orientation(img, "LX")


def test_btcv_shared_layout_is_corrected_to_anatomy(data_dir):
    """In the shared BTCV files' own headers the kidneys lie in front of the liver; the items' correction puts them
    behind it, as in CHAOS (whose headers are right) and in anatomy, in every subject, with left and right kept."""
    items = load_datalist("btcv_sabs", data_dir)
    assert {it["orientation"] for it in items} == {"LAS"}
    raw, fixed = LoadScand(keys="label", orientation_key=None), LoadScand(keys="label")
    first = fixed(reader_input(items[0], ["label"]))["label"]  # the datalist item's key reaches LoadScand
    assert nib.aff2axcodes(first.affine.numpy()) == ("L", "A", "S")
    for it in items:
        ids = it["structures"]
        kidneys, liver, spleen = [ids["kidney_left"], ids["kidney_right"]], [ids["liver"]], [ids["spleen"]]
        header = raw({"label": it["label"]})["label"]
        label = correct_orientation(header, it["orientation"])
        assert _centre(header, kidneys)[1] - _centre(header, liver)[1] > 20.0  # the header's faulty AP axis
        assert _centre(label, kidneys)[1] - _centre(label, liver)[1] < -20.0  # posterior (RAS: y towards anterior)
        assert _centre(label, spleen)[0] < _centre(label, liver)[0]  # the spleen on the left (RAS: x towards right)
    for it in load_datalist("chaos_t2", data_dir):
        assert "orientation" not in it
        label = fixed(reader_input(it, ["label"]))["label"]
        ids = it["structures"]
        assert _centre(label, [ids["kidney_left"], ids["kidney_right"]])[1] < _centre(label, [ids["liver"]])[1]


def test_file_orientation_only_for_the_sources_own_files(data_dir):
    root = data_dir / "btcv_sabs"
    assert file_orientation("btcv_sabs", root / "image_3.nii.gz") == "LAS"
    assert file_orientation("btcv_sabs", "/elsewhere/img/img0001.nii.gz") is None  # Synapse's original files
    assert file_orientation("chaos_t2", data_dir / "chaos_t2" / "image_1.nii.gz") is None
    assert file_orientation(None, root / "image_3.nii.gz") is None


def test_task_masks_keep_the_query_files_header(data_dir, tmp_path):
    """A task naming BTCV's source reads its files corrected, yet writes each mask with its query file's own header
    (a viewer overlays it on the file as it is); a CHAOS query, uncorrected, keeps its header too."""
    from monai_metalearn.apps.segmentation import segment_task
    from monai_metalearn.learners import WholeBodyReference

    btcv, chaos = data_dir / "btcv_sabs", data_dir / "chaos_t2"
    task = {"source": "btcv_sabs", "intensity": "ct_windowed",
            "support": [{"image": str(btcv / "image_0.nii.gz"), "label": str(btcv / "label_0.nii.gz"),
                         "label_value": 6}],
            "query": [{"image": str(btcv / "image_5.nii.gz"), "id": "ct"},
                      {"image": str(chaos / "image_1.nii.gz"), "id": "mr", "source": "chaos_t2", "intensity": "mr"}]}
    (tmp_path / "task.json").write_text(json.dumps(task))
    segment_task(WholeBodyReference(), str(tmp_path / "task.json"), str(tmp_path / "out"), pixdim=(6.0, 6.0, 6.0))
    read = scan_reader(["image"], (6.0, 6.0, 6.0))
    for qid, image in (("ct", btcv / "image_5.nii.gz"), ("mr", chaos / "image_1.nii.gz")):
        mask, query = nib.load(str(tmp_path / "out" / f"{qid}_seg.nii.gz")), nib.load(str(image))
        assert mask.shape == query.shape
        np.testing.assert_allclose(mask.affine, query.affine, atol=1e-3)
        assert 0.05 < float(np.asarray(mask.dataobj).mean()) < 0.9  # a body mask, on the file's grid
    # the correction reached the reader: the BTCV query's loaded affine is the mirrored one
    loaded = read({"image": str(btcv / "image_5.nii.gz"), "orientation": file_orientation("btcv_sabs", "image_5.nii.gz")})
    assert nib.aff2axcodes(loaded["image"].meta["header_affine"].numpy()) == ("L", "P", "S")
