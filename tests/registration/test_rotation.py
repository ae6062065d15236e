"""The initial search over in-plane rotations on real cardiac short-axis MR (ACDC): a scan rotated in its plane by a
known angle is put back by the search and not without it; one rotation is the previous behaviour; the batched
registration makes the same search; the ACDC source hands the search to the atlas learners."""

from __future__ import annotations

import math

import pytest
import torch
from monai.data import MetaTensor

from monai_metalearn.registration import RegistrationConfig, dice_per_label, register, register_many

PIX = (3.0, 3.0, 3.0)
ROTATIONS = tuple(range(0, 360, 30))
HEART = (1, 2, 3)  # ACDC ids: right ventricle, myocardium, left ventricle


def _read(data_dir, patient: int):
    from monai_metalearn.data import scan_reader

    root = data_dir / "acdc"
    item = {"image": str(root / f"patient{patient:03d}_ED.nii.gz"), "label": str(root / f"patient{patient:03d}_ED_gt.nii.gz")}
    return scan_reader(["image", "label"], PIX)(item)


@pytest.fixture(scope="module")
def heart(data_dir):
    return _read(data_dir, 1)


def _rotated(scan: MetaTensor, degrees: float) -> tuple[MetaTensor, torch.Tensor]:
    """``scan`` with its world coordinates rotated by ``degrees`` about the body axis (z) through its centre: the same
    voxels, another in-plane orientation (as another patient's short-axis plane). Returns the scan and the 4x4 map
    from the original world to the rotated one."""
    aff = scan.affine.double()
    centre = aff[:3, :3] @ ((torch.tensor(scan.shape[1:], dtype=torch.float64) - 1) / 2) + aff[:3, 3]
    a = math.radians(degrees)
    rot = torch.eye(4, dtype=torch.float64)
    rot[:2, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    move = torch.eye(4, dtype=torch.float64)
    move[:3, 3] = centre - rot[:3, :3] @ centre
    world = move @ rot
    return MetaTensor(scan.as_tensor().clone(), affine=world @ aff), world


def _angle(matrix: torch.Tensor) -> float:
    return math.degrees(math.atan2(float(matrix[1, 0]), float(matrix[0, 0]))) % 360.0


def test_search_over_rotations_puts_a_rotated_short_axis_scan_back(heart):
    """Patient 1's ED scan rotated by 120 degrees in-plane: with the rotation search the initial alignment finds the
    angle within one step (30 degrees) and carries the heart labels back with a Dice above 0.6; with the default
    single rotation it cannot (the carried heart misses the heart)."""
    moving, world = _rotated(heart["image"], 120.0)
    labels = MetaTensor(heart["label"].as_tensor().clone(), affine=moving.affine)
    searched = register(moving, heart["image"], stages=("initial",), initial_spacing=6.0,
                        initial_rotations=ROTATIONS)
    assert searched.initial["rotation"] == pytest.approx(120.0, abs=30.0)
    assert abs((_angle(searched.affine) - 120.0 + 180.0) % 360.0 - 180.0) <= 30.0
    assert len(searched.initial["candidate_rotations"]) == len(searched.initial["candidates"])
    good = dice_per_label(searched.warp_label(labels), heart["label"], HEART)
    plain = register(moving, heart["image"], stages=("initial",), initial_spacing=6.0)
    assert plain.initial["rotation"] == 0.0
    bad = dice_per_label(plain.warp_label(labels), heart["label"], HEART)
    assert sum(good.values()) / 3 > 0.45, good
    assert sum(bad.values()) / 3 < sum(good.values()) / 3 - 0.3, (good, bad)


def test_one_rotation_is_the_previous_search(heart, data_dir):
    """``initial_rotations=(0,)`` (the default) scores exactly the translation / scale candidates of the search
    without rotations; a full circle scores 12 times as many and never a worse best."""
    other = _read(data_dir, 2)["image"]
    one = register(other, heart["image"], stages=("initial",), initial_spacing=6.0)
    zero = register(other, heart["image"], stages=("initial",), initial_spacing=6.0, initial_rotations=[0])
    assert torch.equal(one.affine, zero.affine)
    circle = register(other, heart["image"], stages=("initial",), initial_spacing=6.0, initial_rotations=ROTATIONS)
    assert len(circle.initial["candidates"]) == 12 * len(one.initial["candidates"])
    assert circle.initial["score"] <= one.initial["score"] + 1e-9
    assert sorted(set(circle.initial["candidate_rotations"])) == [float(a) for a in ROTATIONS]


def test_batched_registration_searches_the_same_rotations(heart, data_dir):
    """``register_many`` makes the same rotation search as ``register`` (per-item kernels: the same start)."""
    other = _read(data_dir, 2)["image"]
    cfg = {"stages": ("initial", "affine"), "spacing": 6.0, "initial_spacing": 6.0, "affine_levels": (2, 1),
           "affine_iterations": (5, 3), "initial_refine_iterations": 3, "initial_rotations": ROTATIONS}
    single = register(other, heart["image"], **cfg)
    many = register_many([other, other], heart["image"], **cfg)
    for r in many:
        assert r.initial["rotation"] == single.initial["rotation"]
        assert torch.allclose(r.affine, single.affine, atol=1e-6)


def test_rotations_are_validated():
    with pytest.raises(ValueError, match="initial_rotations"):
        RegistrationConfig(initial_rotations=())
    assert RegistrationConfig(initial_rotations=range(0, 360, 90)).initial_rotations == (0.0, 90.0, 180.0, 270.0)


def test_acdc_source_hands_the_rotation_search_to_the_atlas_learners():
    """The ACDC source's registration settings reach ``AtlasSegmenter`` through ``prepare_protocol``; a setting its
    user made wins; the next protocol (abdominal CT) drops them; unknown fields are named."""
    from monai_metalearn.data import SOURCES, registration_settings
    from monai_metalearn.learners import AtlasSegmenter

    hints = registration_settings(["acdc", "btcv_sabs", "my_own_scans", None])
    assert hints == {"initial_rotations": tuple(float(a) for a in ROTATIONS)}
    assert registration_settings(["btcv_sabs"]) == {}
    fields = set(RegistrationConfig.__dataclass_fields__)
    for src in SOURCES.values():  # every source's settings are RegistrationConfig fields
        assert set(src.registration) <= fields, src.name
    learner = AtlasSegmenter()
    learner.prepare_protocol(registration=hints)
    assert learner.config.initial_rotations == hints["initial_rotations"]
    learner.prepare_protocol(registration={})
    assert learner.config.initial_rotations == (0.0,)
    mine = AtlasSegmenter(registration={"initial_rotations": [0, 180]}, similarity="mind")
    mine.prepare_protocol(registration=hints)
    assert mine.config.initial_rotations == (0.0, 180.0) and mine.config.similarity == "mind"
    with pytest.raises(ValueError, match="not_a_field"):
        learner.prepare_protocol(registration={"not_a_field": 1})
    # the evaluation app reads the settings off the protocol's subjects
    from monai_metalearn.apps.segmentation import _protocol_geometry

    subjects = [{"subject": "acdc_patient001", "source": "acdc", "modality": "MR", "pixdim": [1.5, 1.5, 3.0]},
                {"subject": "btcv_sabs_00", "source": "btcv_sabs", "modality": "CT", "pixdim": [3.0, 3.0, 3.0]}]
    assert _protocol_geometry(subjects, ["acdc_patient001"], ["acdc_patient001"])["registration"] == hints
    assert _protocol_geometry(subjects, ["btcv_sabs_00"], ["btcv_sabs_00"])["registration"] == {}
