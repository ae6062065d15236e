"""Protocols: cross-validation folds over subjects, fold splits, protocol pools, setting 1 / 2, and the ignore mask of
setting 2 on real BTCV episodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monai_metalearn.apps import protocols
from monai_metalearn.apps.protocols import ProtocolError
from monai_metalearn.apps.segmentation import _PosNegPatchesd
from monai_metalearn.data import SegmentationEpisodeDataset, load_datalist, scan_reader
from monai_metalearn.transforms import IGNORE_LABEL

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "fewshot_segmentation_3d" / "configs" / "train.json"


def test_subject_folds_round_robin_and_errors():
    subs = [f"s{i}" for i in range(5)]
    assert protocols.subject_folds(subs, 2) == [["s0", "s2", "s4"], ["s1", "s3"]]
    with pytest.raises(ProtocolError, match="n_folds"):
        protocols.subject_folds(subs, 6)
    with pytest.raises(ProtocolError, match="repeated"):
        protocols.subject_folds(["a", "a"], 2)


def test_bundle_folds_never_share_a_subject_and_cover_every_subject(data_dir):
    config = json.loads(BUNDLE.read_text())
    folds = protocols.check_folds(config["folds"])
    for source, fs in folds.items():
        everyone = sorted({i["subject"] for i in load_datalist(source, data_dir)})
        held = [s for f in fs for s in f]
        assert sorted(held) == everyone, source  # every subject is tested exactly once
        assert len(held) == len(set(held))
    assert set(config["train_sources"]) <= set(folds)
    # training and test subjects of each fold are disjoint, and together they are every subject
    by_source = {src: [s for f in fs for s in f] for src, fs in folds.items()}
    for f in range(len(folds["btcv_sabs"])):
        split = protocols.fold_split(folds, f, by_source)
        assert not set(split["train"]) & set(split["test"])
        assert sorted(split["train"] + split["test"]) == sorted(s for v in by_source.values() for s in v)


def test_check_folds_names_the_subject_in_two_folds():
    with pytest.raises(ProtocolError, match="'b' is in fold 0 and fold 1"):
        protocols.check_folds({"x": [["a", "b"], ["b", "c"]]})
    with pytest.raises(ProtocolError, match="same number of folds"):
        protocols.check_folds({"x": [["a"], ["b"]], "y": [["c"]]})
    with pytest.raises(ProtocolError, match="out of range"):
        protocols.fold_split({"x": [["a"], ["b"]]}, 2, {"x": ["a", "b"]})


def test_settings_and_protocol_pools():
    assert protocols.ignored_structures(2, ["liver"]) == ["liver"]
    assert protocols.ignored_structures(1, ["liver"]) == []
    with pytest.raises(ProtocolError, match="setting"):
        protocols.ignored_structures(3, ["liver"])
    subjects = ([{"subject": f"btcv_sabs_{i:02d}", "source": "btcv_sabs"} for i in range(6)]
                + [{"subject": f"chaos_{i:02d}", "source": "chaos_t2"} for i in range(3)])
    folds = {"btcv_sabs": protocols.subject_folds([s["subject"] for s in subjects[:6]], 2)}
    entries = {e["name"]: e for e in protocols.segmentation_protocols("abdominal", subjects, folds, 1)}
    assert entries["abdominal_ct"]["query_subjects"] == ["btcv_sabs_01", "btcv_sabs_03", "btcv_sabs_05"]
    assert entries["abdominal_ct_to_mr"]["support_subjects"] == ["btcv_sabs_01", "btcv_sabs_03", "btcv_sabs_05"]
    assert entries["abdominal_ct_to_mr"]["query_subjects"] == ["chaos_00", "chaos_01", "chaos_02"]
    assert entries["abdominal_mr"]["num_episodes"] == 4 * 3
    with pytest.raises(ProtocolError, match="'acdc'"):
        protocols.segmentation_protocols("heart", subjects, folds, 0)
    with pytest.raises(ProtocolError, match="unknown protocol"):
        protocols.segmentation_protocols("lungs", subjects, folds, 0)


@pytest.fixture(scope="module")
def btcv_pair(data_dir):
    items = [i for i in load_datalist("btcv_sabs", data_dir) if i["subject"] in ("btcv_sabs_00", "btcv_sabs_01")]
    out = []
    for item in items:
        d = scan_reader(["image", "label"], (4.0, 4.0, 4.0))({k: item[k] for k in ("image", "label")})
        out.append({"image": d["image"].as_tensor() / 255.0, "label": d["label"].as_tensor().round().short(),
                    "structures": item["structures"], "subject": item["subject"]})
    return out


def test_setting_2_marks_the_test_organs_ignored_in_training_masks(btcv_pair):
    test_organs = list(protocols.ABDOMINAL_TEST_ORGANS)
    episodes = SegmentationEpisodeDataset(btcv_pair, ["stomach"], 1, 1, 2, ignore_structures=test_organs, seed=3)
    ep = episodes[0]
    for side in ("support", "query"):
        subject = ep[f"{side}_subject"][0]
        item = next(i for i in btcv_pair if i["subject"] == subject)
        ids = torch.tensor([item["structures"][o] for o in test_organs], dtype=item["label"].dtype)
        organ_voxels = torch.isin(item["label"], ids)
        mask = ep[f"{side}_label"][0]
        assert torch.equal(mask == IGNORE_LABEL, organ_voxels)  # exactly the four organs are ignored
        assert torch.equal(mask == 1, item["label"] == item["structures"]["stomach"])
    setting1 = SegmentationEpisodeDataset(btcv_pair, ["stomach"], 1, 1, 2, seed=3)[0]
    assert not bool((setting1["support_label"] < 0).any())
    with pytest.raises(ValueError, match="both episode structures and ignore_structures"):
        SegmentationEpisodeDataset(btcv_pair, ["liver"], 1, 1, 2, ignore_structures=["liver"])


def test_no_patch_is_centred_on_an_ignored_voxel(btcv_pair):
    item = btcv_pair[0]
    liver = item["label"] == item["structures"]["liver"]
    stomach = (item["label"] == item["structures"]["stomach"]).float()
    label = torch.where(liver, torch.full_like(stomach, IGNORE_LABEL), stomach)
    crop = _PosNegPatchesd((9, 9, 9), n_pos=2, n_neg=30)
    crop.set_random_state(seed=0)
    samples = crop({"image": item["image"], "label": label})
    centres = [s["label"][0, 4, 4, 4] for s in samples]
    assert all(float(c) == 1.0 for c in centres[:2])
    assert all(float(c) == 0.0 for c in centres[2:])
    # a random draw over the volume would hit the liver: it holds this fraction of the non-structure voxels
    assert float(liver.float().mean()) > 0.03


def test_merged_folds_give_the_interval_over_query_subjects():
    from monai_metalearn.apps.segmentation import merge_fold_metrics
    from monai_metalearn.metrics import mean_ci95

    def rec(q, s, dice, structure="liver"):
        return {"protocol": "abdominal_mr", "k_shot": 1, "structure": structure, "support_subject": [s],
                "query_subject": [q], "dice": dice}

    fold0 = {"fold": 0, "episodes": [rec("a", "b", 0.2), rec("a", "c", 0.4, "spleen"), rec("b", "a", 0.9)]}
    fold1 = {"fold": 1, "episodes": [rec("a", "c", 0.6), rec("c", "a", 0.5)]}
    merged = merge_fold_metrics([fold0, fold1])
    dice = merged["by_protocol"]["abdominal_mr"]["1"]["dice"]
    assert dice["n_episodes"] == 5 and dice["mean"] == pytest.approx((0.2 + 0.4 + 0.9 + 0.6 + 0.5) / 5)
    # subject a: mean of its 3 episodes from both folds; b and c one each
    expected = mean_ci95([0.4, 0.9, 0.5])
    assert dice["subjects"]["n_subjects"] == 3
    assert dice["subjects"]["mean"] == pytest.approx(expected[0])
    assert dice["subjects"]["ci95"] == pytest.approx(expected[1])
    liver = merged["by_protocol"]["abdominal_mr"]["1"]["per_structure"]["liver"]["subjects"]
    assert liver["n_subjects"] == 3 and liver["mean"] == pytest.approx((0.4 + 0.9 + 0.5) / 3)
    assert merged["folds"] == [0, 1] and merged["n_episodes"] == 5
