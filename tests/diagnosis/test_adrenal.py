"""AdrenalMNIST3D diagnosis: official splits, disjoint train-support / test-query episodes, shape biomarkers against
values computed by hand (real masks and rasterised boxes, cubes and balls), and a hand-checked episode evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from monai_metalearn.diagnosis import (
    ADRENAL_SPLIT_SIZES,
    SHAPE_BIOMARKER_NAMES,
    adrenal_cases,
    adrenal_episodes,
    adrenal_summary,
    evaluate_episodes,
    learner_predictor,
    shape_biomarker_matrix,
    shape_biomarkers,
    shape_predictor,
)
from monai_metalearn.diagnosis.cases import CaseError
from monai_metalearn.errors import ConfigError
from monai_metalearn.learners import PatchCentroidReference


@pytest.fixture(scope="module")
def cases(data_dir):
    return adrenal_cases(data_dir)


def _ball(radius: float, pad: int = 3) -> np.ndarray:
    n = int(2 * radius) + 1 + 2 * pad
    g = np.indices((n, n, n)) - n // 2
    return (g**2).sum(0) <= radius**2


# --------------------------------------------------------------------------------------------------------------------
# cases and episodes


def test_official_split_counts(cases):
    # MedMNIST v2: AdrenalMNIST3D has 1,584 volumes, 1,188 / 98 / 298 in train / val / test
    assert dict(ADRENAL_SPLIT_SIZES) == {"train": 1188, "val": 98, "test": 298}
    counts = {s: sum(c["split"] == s for c in cases) for s in ("train", "val", "test")}
    assert counts == {"train": 1188, "val": 98, "test": 298}
    assert len(cases) == 1584
    masses = {s: sum(c["split"] == s and c["class"] == "adrenal_mass" for c in cases) for s in counts}
    assert masses == {"train": 259, "val": 22, "test": 69}  # the rest are normal glands
    assert len({c["id"] for c in cases}) == 1584
    assert cases[0]["id"] == "adrenalmnist3d_train_0" and cases[-1]["id"] == "adrenalmnist3d_test_297"
    img = cases[1200]["image"]
    assert img.shape == (1, 28, 28, 28) and img.dtype == np.float32 and set(np.unique(img)) == {0.0, 1.0}
    only_test = adrenal_cases(data_dir=None, splits=["test"])
    assert [c["id"] for c in only_test] == [c["id"] for c in cases if c["split"] == "test"]
    with pytest.raises(ConfigError, match="splits"):
        adrenal_cases(splits=["validation"])


@pytest.mark.parametrize("k_shot", [1, 10])
def test_support_from_train_queries_from_test_never_shared(cases, k_shot):
    eps = adrenal_episodes(cases, k_shot=k_shot, repeats=3, query_size=40, seed=5)
    test_ids = [i for i, c in enumerate(cases) if c["split"] == "test"]
    assert len(eps) == 3 * math.ceil(298 / 40)
    queried = [q for e in eps for q in e["query"]]
    # every test case queried exactly `repeats` times, and nothing else is queried
    assert sorted(queried) == sorted(test_ids * 3)
    for e in eps:
        assert not set(e["support"]) & set(e["query"])
        assert all(cases[i]["split"] == "train" for i in e["support"])
        assert e["classes_in_episode"] == ["normal", "adrenal_mass"]
        assert e["support_labels"] == [0] * k_shot + [1] * k_shot
        assert [cases[i]["class"] for i in e["support"]] == ["normal"] * k_shot + ["adrenal_mass"] * k_shot
        assert [e["classes_in_episode"][t] for t in e["query_labels"]] == [cases[q]["class"] for q in e["query"]]
        assert len(set(e["support"])) == 2 * k_shot
    assert eps == adrenal_episodes(cases, k_shot=k_shot, repeats=3, query_size=40, seed=5)
    assert eps != adrenal_episodes(cases, k_shot=k_shot, repeats=3, query_size=40, seed=6)


def test_episode_errors(cases):
    with pytest.raises(ConfigError, match="different splits"):
        adrenal_episodes(cases, 1, support_split="test", query_split="test")
    with pytest.raises(CaseError, match="adrenal_mass.*259 cases.*260"):
        adrenal_episodes(cases, 260)
    with pytest.raises(ConfigError, match="k_shot"):
        adrenal_episodes(cases, 0)


# --------------------------------------------------------------------------------------------------------------------
# shape biomarkers


def test_shape_biomarkers_of_a_real_mask_by_hand(cases):
    mask = cases[0]["image"][0] > 0.5
    spacing = (2.0, 1.0, 0.5)
    b = shape_biomarkers(cases[0]["image"], spacing=spacing)
    assert set(b) == set(SHAPE_BIOMARKER_NAMES)
    n = int(mask.sum())
    assert b["voxel_volume"] == n * 1.0  # voxel count x (2 x 1 x 0.5)
    idx = np.argwhere(mask)
    assert [b["extent_0"], b["extent_1"], b["extent_2"]] == [
        (idx[:, a].max() - idx[:, a].min() + 1) * spacing[a] for a in range(3)]
    assert b["bbox_fill"] == n / np.prod(idx.max(0) - idx.min(0) + 1)
    # voxel faces counted one voxel at a time: a face is exposed where the 6-neighbour is outside the mask
    padded = np.pad(mask, 1)
    face_area = 0.0
    for z, y, x in idx + 1:
        for axis, step in [(0, 1), (0, -1), (1, 1), (1, -1), (2, 1), (2, -1)]:
            nb = [z, y, x]
            nb[axis] += step
            if not padded[tuple(nb)]:
                face_area += np.prod([s for a, s in enumerate(spacing) if a != axis])
    faces = shape_biomarkers(mask, spacing=spacing, surface="faces")
    assert faces["surface_area"] == pytest.approx(face_area)
    assert faces["mesh_volume"] == faces["voxel_volume"]
    # the marching-cubes surface cuts the voxel corners: smaller area than the faces, about the same volume
    assert b["surface_area"] < face_area
    assert b["mesh_volume"] == pytest.approx(b["voxel_volume"], rel=0.15)
    # the principal axes of the voxel centres, eigenvalues of their covariance (ddof=0)
    lam = np.sort(np.linalg.eigvalsh(np.cov((idx * spacing).T, bias=True)))[::-1]
    assert b["major_axis_length"] == pytest.approx(4 * math.sqrt(lam[0]))
    assert b["least_axis_length"] == pytest.approx(4 * math.sqrt(lam[2]))
    assert b["flatness"] == pytest.approx(math.sqrt(lam[2] / lam[0]))


def test_shape_biomarkers_of_boxes_by_hand():
    box = np.zeros((14, 10, 8), dtype=bool)
    box[2:11, 3:8, 2:5] = True  # 9 x 5 x 3 voxels
    b = shape_biomarkers(box, surface="faces")
    assert b["voxel_volume"] == 135
    assert b["surface_area"] == 2 * (9 * 5 + 5 * 3 + 9 * 3)
    assert (b["extent_0"], b["extent_1"], b["extent_2"]) == (9, 5, 3)
    assert b["bbox_fill"] == 1.0 and b["components"] == 1
    # n voxels along an axis have variance (n^2 - 1) / 12 about their centre
    assert b["major_axis_length"] == pytest.approx(4 * math.sqrt(80 / 12))
    assert b["minor_axis_length"] == pytest.approx(4 * math.sqrt(24 / 12))
    assert b["least_axis_length"] == pytest.approx(4 * math.sqrt(8 / 12))
    assert b["elongation"] == pytest.approx(math.sqrt(24 / 80))
    assert b["flatness"] == pytest.approx(math.sqrt(8 / 80))
    # anisotropic voxels: axis 1 of 2 mm makes 5 voxels 10 mm, its variance 4 x 24 / 12 = 8 the largest
    a = shape_biomarkers(box, spacing=(1.0, 2.0, 3.0), surface="faces")
    assert a["voxel_volume"] == 135 * 6
    assert (a["extent_0"], a["extent_1"], a["extent_2"]) == (9, 10, 9)
    assert a["major_axis_length"] == pytest.approx(4 * math.sqrt(8.0))
    assert a["surface_area"] == 2 * (9 * 5 * 2 + 5 * 3 * 6 + 9 * 3 * 3)
    # two boxes apart: two pieces; the bounding box now holds background
    two = box.copy()
    two[12:14, 0:2, 6:8] = True
    t = shape_biomarkers(two)
    assert t["components"] == 2
    assert t["bbox_fill"] == pytest.approx(143 / (12 * 8 * 6))  # rows 2-13, 0-7, 2-7


def test_sphericity_of_ball_and_cube():
    # a cube of voxel faces: (36 pi n^6)^(1/3) / (6 n^2) = (36 pi)^(1/3) / 6 = 0.806
    cube = np.zeros((9, 9, 9), dtype=bool)
    cube[2:7, 2:7, 2:7] = True
    assert shape_biomarkers(cube, surface="faces")["sphericity"] == pytest.approx((36 * math.pi) ** (1 / 3) / 6)
    ball = shape_biomarkers(_ball(10.0))
    assert ball["mesh_volume"] == pytest.approx(4 / 3 * math.pi * 10**3, rel=0.02)
    assert 0.88 < ball["sphericity"] < 1.0  # a marching-cubes ball of radius 10 voxels: about 0.91
    # marching cubes cuts the cube's edges (about 0.88), still less round than the ball
    assert shape_biomarkers(cube, surface="faces")["sphericity"] < shape_biomarkers(cube)["sphericity"]
    assert shape_biomarkers(cube)["sphericity"] < ball["sphericity"]
    assert ball["elongation"] == pytest.approx(1.0) and ball["flatness"] == pytest.approx(1.0)
    assert ball["major_axis_length"] == pytest.approx(4 * math.sqrt(10**2 / 5), rel=0.02)  # ball: var = r^2 / 5
    plate = np.zeros((24, 24, 6), dtype=bool)
    plate[2:22, 2:22, 2:4] = True
    p = shape_biomarkers(plate)
    assert p["flatness"] < 0.15 and p["sphericity"] < 0.6 * ball["sphericity"]
    with pytest.raises(CaseError, match="empty"):
        shape_biomarkers(np.zeros((5, 5, 5)))
    with pytest.raises(ConfigError, match="surface"):
        shape_biomarkers(cube, surface="voxels")
    with pytest.raises(ConfigError, match="spacing"):
        shape_biomarkers(cube, spacing=(1.0, 0.0, 1.0))


def test_shape_biomarker_matrix_names_the_case():
    good = {"id": "a", "image": _ball(3.0)[None].astype(np.float32)}
    m = shape_biomarker_matrix([good, good], names=("voxel_volume", "components"))
    assert m.shape == (2, 2) and m[0, 0] == _ball(3.0).sum() and m[1, 1] == 1
    with pytest.raises(CaseError, match="bad: .*empty"):
        shape_biomarker_matrix([good, {"id": "bad", "image": np.zeros((1, 4, 4, 4))}])
    with pytest.raises(ConfigError, match="unknown shape biomarkers"):
        shape_biomarker_matrix([good], names=("volume",))


# --------------------------------------------------------------------------------------------------------------------
# episode evaluation


def _tiny():
    """Four confirmed train cases and three test cases with one feature each."""
    cases = [{"id": f"tr{i}", "split": "train", "class": c} for i, c in
             enumerate(["normal", "normal", "adrenal_mass", "adrenal_mass"])]
    cases += [{"id": f"te{i}", "split": "test", "class": c} for i, c in
              enumerate(["normal", "adrenal_mass", "normal"])]
    features = np.array([[1.0], [3.0], [9.0], [11.0], [4.0], [6.5], [8.0]])
    names = ["normal", "adrenal_mass"]
    episodes = [  # support: normal then mass; prototypes 2 / 10 in the first, 1 / 9 in the second
        {"support": [0, 1, 2, 3], "support_labels": [0, 0, 1, 1], "query": [4, 5, 6], "query_labels": [0, 1, 0],
         "classes_in_episode": names},
        {"support": [0, 2], "support_labels": [0, 1], "query": [4, 5, 6], "query_labels": [0, 1, 0],
         "classes_in_episode": names},
    ]
    return cases, features, episodes


def test_episode_evaluation_by_hand():
    cases, features, episodes = _tiny()
    records = evaluate_episodes(shape_predictor(features, "centroid"), cases, episodes)
    # 1-D nearest centroid (standardising is the same affine map for both centroids):
    # episode 0, centroids 2 | 10: 4 -> normal, 6.5 -> mass (4.5 vs 3.5), 8 -> mass;
    # episode 1, centroids 1 | 9:  4 -> normal, 6.5 -> mass (5.5 vs 2.5), 8 -> mass
    assert [r["prediction"] for r in records] == ["normal", "adrenal_mass", "adrenal_mass"] * 2
    assert [r["patient"] for r in records] == ["te0", "te1", "te2"] * 2
    s = adrenal_summary(records)
    assert s["per_patient"] == {"te0": 1.0, "te1": 1.0, "te2": 0.0}
    assert s["mean"] == pytest.approx(2 / 3)
    sd = np.std([1.0, 1.0, 0.0], ddof=1)
    assert s["ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * sd / math.sqrt(3))
    assert s["n_subjects"] == 3 and s["n_queries"] == 6
    assert s["confusion"] == [[2, 2], [0, 2]]  # rows truth (normal, mass), columns prediction
    assert s["per_class"] == {"normal": 0.5, "adrenal_mass": 1.0}
    assert s["balanced_accuracy"] == pytest.approx(0.75)
    assert s["majority_class"] == "normal" and s["majority_accuracy"] == pytest.approx(2 / 3)
    # the mass case te1 (6.5) scores above te0 (4.0) but below te2 (8.0): AUC 1/2
    assert s["auc"] == pytest.approx(0.5)
    # probabilities: softmax(-d^2 / 2) in standardised units; pooled support sd of episode 0 is sqrt(2)
    z = (features[[4, 5, 6], 0] - 6.0) / math.sqrt(2.0)
    mu = (np.array([2.0, 10.0]) - 6.0) / math.sqrt(2.0)
    logit = -0.5 * (z[:, None] - mu[None]) ** 2
    p_mass = np.exp(logit[:, 1]) / np.exp(logit).sum(1)
    assert [r["score"] for r in records[:3]] == pytest.approx(p_mass.tolist())
    lo, hi = s["auc_ci95"]  # bootstrap over 3 cases: resamples with both classes give AUC 0, 1/2 or 1
    assert lo == 0.0 and hi == 1.0
    # a perfect ranking has a degenerate interval
    perfect = [{"patient": f"c{i}", "truth": t, "prediction": t, "score": v} for i, (t, v) in
               enumerate([("normal", 0.1), ("normal", 0.3), ("adrenal_mass", 0.6), ("adrenal_mass", 0.9)])]
    p = adrenal_summary(perfect)
    assert p["auc"] == 1.0 and p["auc_ci95"] == [1.0, 1.0] and p["mean"] == 1.0 and p["ci95"] == 0.0
    assert adrenal_summary(perfect, auc_resamples=0)["auc_ci95"] is None
    with pytest.raises(CaseError, match="no query records"):
        adrenal_summary([])


def test_raw_voxel_reference_on_a_real_episode_by_hand(cases):
    ep = adrenal_episodes(cases, k_shot=2, repeats=1, query_size=12, seed=3)[0]
    ref = PatchCentroidReference(pool=1)
    records = evaluate_episodes(learner_predictor(ref, cases), cases, [ep])
    x = np.stack([cases[i]["image"].reshape(-1) for i in ep["support"]]).astype(np.float64)
    centroids = np.stack([x[:2].mean(0), x[2:].mean(0)])  # support: 2 normal, then 2 masses
    q = np.stack([cases[i]["image"].reshape(-1) for i in ep["query"]]).astype(np.float64)
    d2 = ((q[:, None] - centroids[None]) ** 2).sum(-1)
    expected = [["normal", "adrenal_mass"][j] for j in d2.argmin(1)]
    assert [r["prediction"] for r in records] == expected
    assert [r["truth"] for r in records] == [cases[i]["class"] for i in ep["query"]]


def test_cached_embeddings_give_the_learner_s_own_predictions(cases):
    from monai_metalearn.learners import create_learner
    from monai_metalearn.networks import ConvEncoder3D

    torch.manual_seed(0)
    subset = [c for c in cases if c["split"] == "train"][:40] + [c for c in cases if c["split"] == "test"][:10]
    eps = adrenal_episodes(subset, k_shot=2, repeats=1, query_size=10, seed=0)
    for name in ("protonet", "matching"):
        learner = create_learner(name, ConvEncoder3D(1, features=(4, 8), pooled_size=2), 64, n_way=2).eval()
        direct = learner_predictor(learner, subset)(eps[0])
        cached = learner_predictor(learner, subset, cache=True, batch_size=16)(eps[0])
        assert cached == pytest.approx(direct, abs=1e-5)
        assert isinstance(learner.encoder, ConvEncoder3D)  # restored after the call
