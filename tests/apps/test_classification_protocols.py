"""Classification across subjects and modalities: protocol pools per fold, the bundle's fold list and class splits,
and :func:`evaluate_protocols` with the nearest-centroid references on real BTCV CT and CHAOS MR patches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monai_metalearn.apps import protocols
from monai_metalearn.apps.classification import evaluate_protocols
from monai_metalearn.apps.protocols import CLASSIFICATION_PROTOCOLS, ProtocolError
from monai_metalearn.data import build_structure_patches, load_datalist
from monai_metalearn.learners import BodyPositionReference, PatchCentroidReference

CONFIG = Path(__file__).resolve().parents[2] / "bundles" / "fewshot_classification_3d" / "configs" / "cross_subject.json"


def _items(source: str, n: int) -> list[dict]:
    return [{"source": source, "subject": f"{source}_{i}"} for i in range(n)]


def test_protocol_pools_follow_the_fold_and_never_share_a_subject():
    items = _items("btcv_sabs", 4) + _items("lpba40", 2) + _items("chaos_t2", 3) + _items("acdc", 2)
    folds = {"btcv_sabs": [["btcv_sabs_0", "btcv_sabs_2"], ["btcv_sabs_1", "btcv_sabs_3"]],
             "lpba40": [["lpba40_0"], ["lpba40_1"]]}
    for fold in (0, 1):
        train = protocols.classification_training_subjects(items, folds, fold)
        entries = {e["name"]: e for e in protocols.classification_protocols("all", items, folds, fold)}
        assert set(entries) == set(CLASSIFICATION_PROTOCOLS)
        tested = {s for e in entries.values() for s in e["support_subjects"] + e["query_subjects"]}
        assert not tested & set(train)  # a fold's test subjects are never its training subjects
        assert sorted(train) == sorted(
            [f"btcv_sabs_{i}" for i in range(4) if f"btcv_sabs_{i}" not in folds["btcv_sabs"][fold]]
            + [f"lpba40_{1 - fold}"])
        assert entries["btcv_cross_subject"]["query_subjects"] == folds["btcv_sabs"][fold]
        # CT support from the fold's BTCV test subjects, MR query from every CHAOS subject (never trained on)
        assert entries["ct_to_mr"]["support_subjects"] == folds["btcv_sabs"][fold]
        assert entries["ct_to_mr"]["query_subjects"] == [f"chaos_t2_{i}" for i in range(3)]
        assert entries["ct_to_mr"]["n_way"] == 4 and entries["acdc_cross_subject"]["n_way"] == 3
    with pytest.raises(ProtocolError, match="unknown classification protocol \\['btcv'\\]"):
        protocols.classification_protocols(["btcv"], items, folds, 0)
    with pytest.raises(ProtocolError, match="needs source 'chaos_t2'"):
        protocols.classification_protocols("ct_to_mr", _items("btcv_sabs", 4), {"btcv_sabs": folds["btcv_sabs"]}, 0)
    with pytest.raises(ProtocolError, match="fold 2 is out of range"):
        protocols.classification_protocols("btcv_cross_subject", items, folds, 2)


def test_cross_subject_config_folds_and_class_splits(data_dir):
    config = json.loads(CONFIG.read_text())
    folds = protocols.check_folds(config["folds"])
    for source, fs in folds.items():
        everyone = sorted({i["subject"] for i in load_datalist(source, data_dir)})
        assert sorted(s for f in fs for s in f) == everyone, source  # each subject tested exactly once
    tested = {c for p in CLASSIFICATION_PROTOCOLS.values() for c in p["classes"]}
    train = [c for cs in protocols.CLASSIFICATION_TRAIN_CLASSES.values() for c in cs]
    assert not tested & set(train)
    assert set(config["val_classes"]) <= set(train)
    names = set()
    for source in config["sources"]:
        names |= set(load_datalist(source, data_dir)[0]["structures"])
    assert tested <= names and set(train) <= names


@pytest.fixture(scope="module")
def ct_mr_patches(data_dir):
    """Real patches: 3 BTCV CTs and 2 CHAOS T2 MRs, the four abdominal organs, 4 mm, 3 views each."""
    datalist = load_datalist("btcv_sabs", data_dir)[:3] + load_datalist("chaos_t2", data_dir)[:2]
    organs = list(CLASSIFICATION_PROTOCOLS["ct_to_mr"]["classes"])
    return build_structure_patches(datalist, organs, pixdim=(4.0, 4.0, 4.0), n_views=3, progress=False)


def test_evaluate_protocols_scores_ct_support_mr_query_on_fixed_episodes(ct_mr_patches, tmp_path):
    btcv = sorted({p["subject"] for p in ct_mr_patches if p["source"] == "btcv_sabs"})
    chaos = sorted({p["subject"] for p in ct_mr_patches if p["source"] == "chaos_t2"})
    folds = {"btcv_sabs": [btcv[:2], btcv[2:]]}
    args = (["ct_to_mr"], folds, 0, [1], 3, 12, "cpu")
    kw = dict(spatial_size=(16, 16, 16), body_coordinates=True, progress=False)
    pos = evaluate_protocols(BodyPositionReference(), ct_mr_patches, *args, str(tmp_path / "pos"), **kw)
    again = evaluate_protocols(BodyPositionReference(), ct_mr_patches, *args, str(tmp_path / "again"), **kw)
    raw = evaluate_protocols(PatchCentroidReference(), ct_mr_patches, *args, str(tmp_path / "raw"), **kw)
    m = pos["protocols"]["ct_to_mr"]["by_shot"]["1"]
    assert m["accuracy"]["n_episodes"] == 12
    # query subjects are the CHAOS MRs only, support the fold's BTCV test subjects
    assert sorted(m["accuracy_subjects"]["per_subject"]) == chaos
    assert pos["protocols"]["ct_to_mr"]["support_pool"] == btcv[:2]
    per = list(m["accuracy_subjects"]["per_subject"].values())
    assert m["accuracy_subjects"]["mean"] == pytest.approx(sum(per) / len(per))
    # where an organ lies in the body transfers from CT to MR (chance 0.25); raw intensities do not
    assert m["accuracy"]["mean"] > 0.6
    assert raw["protocols"]["ct_to_mr"]["by_shot"]["1"]["accuracy"]["mean"] < m["accuracy"]["mean"]
    # the same seed gives the same episodes: the same figures
    assert again["protocols"]["ct_to_mr"]["by_shot"]["1"]["accuracy"] == m["accuracy"]
    written = json.loads((tmp_path / "pos" / "metrics.json").read_text())
    assert written["fold"] == 0 and written["body_coordinates"] is True
    assert (tmp_path / "pos" / "metrics_ct_to_mr.json").is_file()


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("false", False), ("False", False),
                                             ("true", True), ("0", False), (1, True)])
def test_boolean_switches_read_command_line_words(value, expected):
    """``--position_features false`` reaches the config as the string 'false' (fire keeps lowercase words): the
    network must then be the plain encoder, not the position encoder."""
    from monai.bundle import ConfigParser

    from monai_metalearn.apps.classification import flag
    from monai_metalearn.networks import BodyPositionEncoder

    assert flag(value, "position_features") is expected
    parser = ConfigParser()
    parser.read_config([str(CONFIG.parent / "train.json"), str(CONFIG)])
    parser["position_features"] = value
    parser["body_coordinates"] = value
    network = parser.get_parsed_content("network")
    assert isinstance(network, BodyPositionEncoder) is expected
    first_conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d))
    assert first_conv.in_channels == (4 if expected else 1)


def test_a_boolean_switch_that_is_not_a_boolean_is_a_config_error():
    from monai_metalearn.apps.classification import flag
    from monai_metalearn.errors import ConfigError

    with pytest.raises(ConfigError, match="modality_augment must be true or false, got 'maybe'"):
        flag("maybe", "modality_augment")
