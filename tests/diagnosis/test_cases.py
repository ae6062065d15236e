"""Diagnosis cases: several images of one patient as channels (ACDC ED + ES), the mixed-grid error, patient-level
episodes and their summary."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_metalearn.data import LoadScand, ScanLoadError
from monai_metalearn.diagnosis.cases import CaseError, acdc_cases, case_transforms, load_cases
from monai_metalearn.diagnosis.episodes import (
    patient_accuracy_summary,
    patient_episodes,
    stratified_patient_folds,
)


def test_acdc_cases_are_patients_with_both_phases(data_dir):
    cases = acdc_cases(data_dir)
    assert len(cases) == 30
    assert sorted({c["class"] for c in cases}) == ["DCM", "HCM", "MINF", "NOR", "RV"]
    assert all(sum(c["class"] == d for c in cases) == 6 for d in ("DCM", "HCM", "MINF", "NOR", "RV"))
    first = cases[0]
    assert first["id"] == "patient001" and first["class"] == "DCM"
    assert [p.rsplit("/", 1)[-1] for p in first["image"]] == ["patient001_ED.nii.gz", "patient001_ES.nii.gz"]
    with pytest.raises(CaseError, match="patient999"):
        acdc_cases(data_dir, patients=["patient999"])


def test_a_list_of_paths_loads_as_channels_in_order(data_dir):
    root = data_dir / "acdc"
    ed, es = str(root / "patient001_ED.nii.gz"), str(root / "patient001_ES.nii.gz")
    d = LoadScand(keys=["image"])({"image": [ed, es]})
    img = d["image"]
    raw_ed = np.asarray(nib.load(ed).dataobj, dtype=np.float32)
    raw_es = np.asarray(nib.load(es).dataobj, dtype=np.float32)
    assert img.shape == (2, *raw_ed.shape)
    np.testing.assert_array_equal(img[0].numpy(), raw_ed)
    np.testing.assert_array_equal(img[1].numpy(), raw_es)
    assert img.meta["channel_files"] == [ed, es]
    swapped = LoadScand(keys=["image"])({"image": [es, ed]})["image"]
    np.testing.assert_array_equal(swapped[0].numpy(), raw_es)


def test_images_of_one_case_on_different_grids_name_both_files(data_dir):
    root = data_dir / "acdc"
    a, b = str(root / "patient001_ED.nii.gz"), str(root / "patient004_ES.nii.gz")  # 256x216x10 vs 256x232x10
    with pytest.raises(ScanLoadError) as err:
        LoadScand(keys=["image"])({"image": [a, b]})
    assert a in str(err.value) and b in str(err.value) and "spatial shape" in str(err.value)


def test_case_transforms_scale_each_channel_and_hold_the_heart(data_dir):
    cases = load_cases(acdc_cases(data_dir, patients=["patient001", "patient061"]),
                       case_transforms(with_label=True))
    for c in cases:
        img, lab = c["image"], c["label"]
        assert img.shape == (2, 64, 64, 16) and lab.shape == (2, 64, 64, 16)
        for ch in range(2):  # each frame scaled on its own to [0, 1]
            assert float(img[ch].min()) == 0.0 and float(img[ch].max()) == 1.0
        # the centre crop keeps the whole LV of both phases (label 3), compared with the full-size resampled mask
        full = case_transforms(spatial_size=(200, 200, 40), with_label=True)(
            acdc_cases(data_dir, patients=[c["id"]])[0])["label"]
        for ch in range(2):
            assert int((lab[ch] == 3).sum()) == int((full[ch] == 3).sum()) > 0


def test_stratified_folds_and_patient_episodes():
    classes = ["a"] * 6 + ["b"] * 6
    folds = stratified_patient_folds(classes, 3)
    assert sorted(i for f in folds for i in f) == list(range(12))
    assert all(sum(classes[i] == "a" for i in f) == 2 for f in folds)
    with pytest.raises(ValueError, match="fewer than the 7 folds"):
        stratified_patient_folds(classes, 7)
    test = folds[0]
    eps = patient_episodes(classes, test, k_shot=5, num_episodes=8, seed=1)
    queried = [q for ep in eps for q in ep["query"]]
    assert set(queried) == set(test) and all(queried.count(q) == 4 for q in test)  # every test patient equally
    for ep in eps:
        assert not set(ep["support"]) & set(ep["query"])
        assert [classes[i] for i in ep["support"]] == ["a"] * 5 + ["b"] * 5
        assert ep["support_labels"] == [0] * 5 + [1] * 5 and ep["query_labels"] == [0, 1]
    assert eps == patient_episodes(classes, test, k_shot=5, num_episodes=8, seed=1)  # a function of the seed
    with pytest.raises(ValueError, match="6-shot needs 7 cases"):
        patient_episodes(classes, test, k_shot=6, num_episodes=1)


def test_patient_accuracy_summary_averages_patients_first():
    records = [{"patient": "p1", "truth": "a", "prediction": "a"}, {"patient": "p1", "truth": "a", "prediction": "b"},
               {"patient": "p2", "truth": "b", "prediction": "b"}]
    s = patient_accuracy_summary(records, ["a", "b"])
    assert s["mean"] == pytest.approx(0.75)  # (0.5 + 1) / 2, not 2 / 3
    assert s["n_subjects"] == 2 and s["confusion"] == [[1, 1], [0, 1]]
    assert s["per_class"] == {"a": 0.5, "b": 1.0}


@pytest.fixture(scope="module")
def two_phase_cases(data_dir):
    """Five real ACDC patients, one per diagnosis, and one more of each for queries: ED + ES as two channels."""
    ids = ["patient001", "patient002", "patient021", "patient022", "patient041", "patient042", "patient061",
           "patient062", "patient081", "patient082"]
    return load_cases(acdc_cases(data_dir, patients=ids), case_transforms(spatial_size=(32, 32, 8)))


@pytest.mark.parametrize("name", ["protonet", "matching", "maml", "fomaml", "anil", "metasgd", "reptile", "finetune"])
def test_every_classification_learner_takes_two_phase_cases(two_phase_cases, name):
    """ED + ES as two channels through every classification learner: one meta-update on a 5-way 1-shot patient
    episode changes the weights, and the adapted predictor gives one probability row per query patient."""
    from monai_metalearn.learners import create_learner
    from monai_metalearn.networks import ConvEncoder3D

    names = sorted({c["class"] for c in two_phase_cases})
    by_class = {d: [c for c in two_phase_cases if c["class"] == d] for d in names}
    sx = torch.stack([by_class[d][0]["image"] for d in names]).float()
    qx = torch.stack([by_class[d][1]["image"] for d in names]).float()
    sy = qy = torch.arange(len(names))
    assert sx.shape == (5, 2, 32, 32, 8)
    torch.manual_seed(0)
    encoder = ConvEncoder3D(2, (4, 8), pooled_size=1)
    learner = create_learner(name, encoder, 8, n_way=5, n_base_classes=5,
                             **({"inner_steps": 1} if name in ("maml", "fomaml", "anil", "metasgd") else
                                {"inner_steps": 2} if name == "reptile" else {}))  # Reptile: the zero head first
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    optimizer = torch.optim.Adam(learner.parameters(), 1e-2)
    metrics = learner.outer_step(sx, sy, qx, qy, optimizer)
    assert np.isfinite(metrics["loss"])
    moved = [n for n, p in learner.named_parameters() if not torch.equal(before[n], p.detach())]
    assert any(n.startswith(("encoder", "model.encoder")) for n in moved), moved
    with torch.no_grad():
        probabilities = learner.adapt(sx, sy)(qx).softmax(1)
    assert probabilities.shape == (5, 5)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(5))
