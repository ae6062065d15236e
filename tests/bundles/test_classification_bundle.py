"""The fewshot_classification_3d bundle from the command line, as a user runs it: train -> evaluate -> inference on
the real CT scans with small overrides, resume, schema validity, and the one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_metalearn.errors import CheckpointError, ConfigError, MetaLearnError, MissingFileError, TaskFileError
from monai_metalearn.apps import classification as app

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "fewshot_classification_3d"

# small real-data settings: the two CTs only, ribs as meta-train classes, abdominal organs as test classes
SMALL = [
    "--sources", "['totalseg_ct1','totalseg_ct2']",
    "--train_classes", "['rib_left_7','rib_left_8','rib_left_9','rib_right_7','rib_right_8','rib_right_9']",
    "--test_classes", "['liver','spleen','stomach','pancreas','aorta']",
    "--n_views", "6", "--pixdim", "[3.0,3.0,3.0]", "--features", "[8,16,16,16]",
    "--episodes_per_epoch", "2", "--meta_batch_size", "1", "--q_query", "2",
    "--val_episodes", "2", "--val_q_query", "2", "--progress", "False",
]

pytestmark = pytest.mark.xdist_group("bundle")


def bundle(configs: list[str], *args: str, out: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file [...] ...`` in the bundle folder."""
    files = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--output_dir", str(out),
           "--ckpt_path", str(out / "model.pt"), "--cache_dir", str(out.parent / "cache"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")  # session: built once even when xdist interleaves modules
def trained(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("cls") / "run"
    proc = ok(bundle(["train.json"], *SMALL, "--learner_name", "protonet", "--epochs", "1", out=out))
    return out, proc


def test_train_writes_checkpoint_logs_and_resume_state(trained):
    out, proc = trained
    state = torch.load(out / "model.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in state), sorted(state)[:5]
    resume = list((out / "resume").glob("*.pt"))
    assert len(resume) == 1
    ckpt = torch.load(resume[0], weights_only=False)
    assert set(ckpt) == {"learner", "optimizer", "trainer"}
    assert ckpt["trainer"]["iteration"] == 2 and ckpt["trainer"]["episode"] == 2  # 1 epoch of 2 episodes
    assert list(out.glob("events.out.tfevents.*")), "TensorBoardStatsHandler wrote no event file"
    assert "Epoch[1] Metrics -- accuracy" in proc.stdout + proc.stderr  # ValidationHandler ran meta-validation


def test_resume_continues_the_episode_count(trained, tmp_path):
    out, _ = trained
    resume = next((out / "resume").glob("*.pt"))
    run2 = tmp_path / "run"
    proc = ok(bundle(["train.json"], *SMALL, "--learner_name", "protonet", "--epochs", "2",
                     "--resume_from", str(resume), out=run2))
    log = proc.stdout + proc.stderr
    assert "Epoch: 2/2, Iter: 1/2" in log and "Epoch: 1/2" not in log
    ckpt = torch.load(next((run2 / "resume").glob("*.pt")), weights_only=False)
    assert ckpt["trainer"]["iteration"] == 4 and ckpt["trainer"]["episode"] == 4


def test_evaluate_writes_metrics_json(trained):
    out, _ = trained
    ok(bundle(["train.json", "evaluate.json"], *SMALL, "--learner_name", "protonet", "--test_episodes", "4",
              "--test_q_query", "3", out=out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_way"] == 5 and metrics["k_shot"] == 5 and metrics["q_query"] == 3
    assert set(metrics["by_shot"]) == {"1", "5"}
    for summary in metrics["by_shot"].values():
        acc = summary["accuracy"]
        assert summary["accuracy"]["n_episodes"] == 4 and 0.0 <= acc["mean"] <= 1.0 and acc["ci95"] >= 0
        assert set(summary["per_class"]) == {"liver", "spleen", "stomach", "pancreas", "aorta"}
    assert metrics["accuracy"] == metrics["by_shot"]["5"]["accuracy"]
    assert metrics["test_subjects"] == ["totalseg_ct1", "totalseg_ct2"] and metrics["cross_subject"] is True
    assert metrics["learner_name"] == "protonet"


def write_task(path: Path, data_dir: str, support_labels=(("liver", 5), ("spleen", 1), ("stomach", 6))) -> Path:
    ts = Path(data_dir) / "totalsegmentator"
    task = {
        "support": [
            {"image": str(ts / "example_ct.nii.gz"), "mask": str(ts / "example_seg_fast_force_split.nii.gz"),
             "mask_label": i, "label": name}
            for name, i in support_labels
        ],
        "query": [
            {"image": str(ts / "example_ct_dicom"), "mask": str(ts / "example_seg_dicom.nii.gz"), "mask_label": i}
            for _, i in support_labels
        ],
    }
    path.write_text(json.dumps(task))
    return path


def test_inference_on_a_dicom_query_writes_predictions(trained, data_dir, tmp_path):
    out, _ = trained
    task = write_task(tmp_path / "task.json", data_dir)
    ok(bundle(["train.json", "inference.json"], *SMALL, "--learner_name", "protonet", "--task_file", str(task),
              out=out))
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["classes"] == ["liver", "spleen", "stomach"]
    assert pred["k_shot"] == {"liver": 1, "spleen": 1, "stomach": 1}
    assert len(pred["predictions"]) == 3
    for p in pred["predictions"]:
        assert p["image"].endswith("example_ct_dicom")
        assert p["label"] in pred["classes"] and set(p["probabilities"]) == set(pred["classes"])
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-4
        assert p["probabilities"][p["label"]] == max(p["probabilities"].values())


def test_wrong_key_is_a_one_line_error(tmp_path):
    proc = bundle(["train.json"], "--epoch", "3", out=tmp_path / "x")
    assert proc.returncode != 0
    last = (proc.stdout + proc.stderr).strip().splitlines()[-1]
    assert last.startswith("monai-metalearn: error: unknown config key --epoch") and "--epochs" in last
    assert "Traceback" not in proc.stderr


def test_missing_checkpoint_and_data_dir_are_one_line_errors(tmp_path):
    proc = bundle(["train.json", "evaluate.json"], "--ckpt_path", str(tmp_path / "none.pt"), out=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "checkpoint" in proc.stderr.strip().splitlines()[-1] and "none.pt" in proc.stderr
    proc = bundle(["train.json"], "--data_dir", str(tmp_path / "nowhere"), out=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "is not a folder" in proc.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------- the same checks, in-process
def test_check_cli_overrides_accepts_config_ids_and_dict_entries():
    argv = ["/x/monai/bundle/__main__.py", "run", "--config_file", str(BUNDLE / "configs" / "train.json")]
    app.check_cli_overrides(argv + ["--epochs", "2", "--train#optimizer#lr", "0.1", "--learner_args#inner_lr", "1"])
    with pytest.raises(ConfigError, match=r"unknown config key --lerner_name .*did you mean --learner_name"):
        app.check_cli_overrides(argv + ["--lerner_name", "maml"])
    app.check_cli_overrides(["pytest", "--lerner_name"])  # not a bundle command line: ignored


@pytest.mark.parametrize(
    "task, match",
    [
        ({"query": [{"image": "q.nii.gz"}]}, "has no support examples"),
        ({"support": [{"image": "CT"}], "query": [{"image": "CT"}]}, r"support\[0\] .* has no 'label'"),
        ({"support": [{"image": "CT", "label": "liver"}], "query": [{"image": "CT"}]}, "at least 2 classes"),
        ({"support": [{"image": "CT", "label": "a"}, {"image": "missing.nii.gz", "label": "b"}],
          "query": [{"image": "CT"}]}, r"support\[1\]: file 'missing.nii.gz' not found"),
        ({"support": [{"image": "CT", "label": "a"}, {"image": "CT", "label": "b"}]}, "has no query images"),
    ],
)
def test_task_file_errors(tmp_path, data_dir, task, match):
    ct = str(Path(data_dir) / "totalsegmentator" / "example_ct.nii.gz")
    text = json.dumps(task).replace('"CT"', json.dumps(ct))
    (tmp_path / "task.json").write_text(text)
    with pytest.raises(MetaLearnError, match=match) as info:
        app.load_task_file(tmp_path / "task.json")
    assert isinstance(info.value, MissingFileError if "not found" in match else TaskFileError)


def test_task_file_not_json_and_missing(tmp_path):
    (tmp_path / "t.json").write_text("{support: ")
    with pytest.raises(TaskFileError, match="is not valid JSON"):
        app.load_task_file(tmp_path / "t.json")
    with pytest.raises(FileNotFoundError, match="not found"):
        app.load_task_file(tmp_path / "none.json")


def test_load_learner_rejects_another_learners_checkpoint(tmp_path):
    from monai_metalearn.learners import create_learner
    from monai_metalearn.networks import ConvEncoder3D

    proto = create_learner("protonet", ConvEncoder3D(1, (4, 8)), 8, 5)
    torch.save({"learner": proto.state_dict()}, tmp_path / "p.pt")
    maml = create_learner("maml", ConvEncoder3D(1, (4, 8)), 8, 5)
    with pytest.raises(CheckpointError, match="does not fit learner MAML"):
        app.load_learner(maml, str(tmp_path / "p.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        app.load_learner(proto, str(tmp_path / "bad.pt"))
    loaded = app.load_learner(create_learner("protonet", ConvEncoder3D(1, (4, 8)), 8, 5), str(tmp_path / "p.pt"))
    for (k, v), w in zip(loaded.state_dict().items(), proto.state_dict().values()):
        assert torch.equal(v, w), k


def test_build_learner_errors_and_defaults():
    from monai_metalearn.networks import ConvEncoder3D

    learner = app.build_learner("MAML", ConvEncoder3D(1, (4, 8)), 8, 5, ["a"] * 3, {"maml": {"inner_lr": 0.3}},
                                {"inner_steps": 2})
    assert learner.inner_lr == 0.3 and learner.inner_steps == 2
    with pytest.raises(ConfigError, match="unknown learner_name 'mam'"):
        app.build_learner("mam", ConvEncoder3D(1, (4, 8)), 8, 5, ["a"])
    with pytest.raises(ConfigError, match=r"has no argument\(s\) \['inner_lr'\]"):
        app.build_learner("protonet", ConvEncoder3D(1, (4, 8)), 8, 5, ["a"], None, {"inner_lr": 0.1})


def test_class_splits_in_the_config_are_disjoint_and_on_the_data(data_dir):
    from monai_metalearn.data import load_datalist

    cfg = json.loads((BUNDLE / "configs" / "train.json").read_text())
    splits = app.check_class_splits(train=cfg["train_classes"], val=cfg["val_classes"], test=cfg["test_classes"])
    have = {}
    for source in cfg["sources"]:
        for item in load_datalist(source, data_dir):
            for name in item["structures"]:
                have.setdefault(name, set()).add(item["subject"])
    for name in splits["train"]:
        assert name in have, f"train class {name} is in no source"
    for name in splits["val"] + splits["test"]:  # cross-subject evaluation needs >= 2 subjects per class
        assert len(have.get(name, ())) >= 2, (name, have.get(name))
    with pytest.raises(ConfigError, match="liver"):
        app.check_class_splits(train=["liver", "spleen"], test=["liver"])


def test_predict_task_leaves_the_learner_as_it_was(data_dir, tmp_path):
    from monai_metalearn.learners import create_learner
    from monai_metalearn.networks import ConvEncoder3D

    learner = create_learner("protonet", ConvEncoder3D(1, (4, 8), pooled_size=2), 64, 5)
    learner.n_way = 5  # as if built for 5-way episodes
    task = write_task(tmp_path / "task.json", data_dir, (("liver", 5), ("spleen", 1)))
    result = app.predict_task(learner, str(task), str(tmp_path / "out"), (16, 16, 16), (3.0, 3.0, 3.0))
    assert result["classes"] == ["liver", "spleen"] and len(result["predictions"]) == 2
    assert learner.n_way == 5  # a 2-class task did not change the 5-way learner


# cross-subject protocols on the multi-subject sets, small: BTCV and CHAOS only, two protocols, 4 mm
_EVEN = [f"btcv_sabs_{i:02d}" for i in range(0, 20, 2)]
_ODD = [f"btcv_sabs_{i:02d}" for i in range(1, 20, 2)]
CROSS = [
    "--sources", "['btcv_sabs','chaos_t2']",
    "--folds", "{'btcv_sabs': [" + repr(_EVEN) + ", " + repr(_ODD) + "]}",
    "--protocols", "['ct_to_mr','btcv_cross_subject']",
    "--train_classes", "['aorta','stomach','pancreas','esophagus','inferior_vena_cava']",
    "--val_classes", "['portal_vein_and_splenic_vein','adrenal_gland_right','adrenal_gland_left']",
    "--test_classes", "['liver','spleen','kidney_left','kidney_right','gallbladder']",
    "--n_views", "4", "--pixdim", "[4.0,4.0,4.0]", "--features", "[8,16,16,16]", "--epochs", "1",
    "--episodes_per_epoch", "2", "--meta_batch_size", "1", "--q_query", "2",
    "--val_episodes", "2", "--val_q_query", "2", "--progress", "False", "--learner_name", "protonet",
]


def test_cross_subject_train_evaluate_and_inference_on_ct_and_mr(data_dir, tmp_path):
    """train.json + cross_subject.json meta-trains on the fold's BTCV training subjects only, with body-frame
    coordinate channels; evaluate.json scores the protocols on the fold's test subjects (CT -> MR: CHAOS queries);
    inference.json classifies a CHAOS MR organ from BTCV CT support with the same channels."""
    out = tmp_path / "run"
    ok(bundle(["train.json", "cross_subject.json"], *CROSS, "--fold", "1", out=out))
    state = torch.load(out / "model.pt", weights_only=True)
    first = next(v for k, v in state.items() if k.startswith("encoder.") and v.ndim == 5)
    assert first.shape[1] == 4  # image + 3 coordinate channels
    ok(bundle(["train.json", "cross_subject.json", "evaluate.json"], *CROSS, "--fold", "1", "--test_episodes", "4",
              "--test_q_query", "3", "--test_shots", "[1]", out=out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fold"] == 1 and metrics["body_coordinates"] is True
    assert set(metrics["protocols"]) == {"ct_to_mr", "btcv_cross_subject"}
    btcv = metrics["protocols"]["btcv_cross_subject"]["by_shot"]["1"]
    assert set(btcv["accuracy_subjects"]["per_subject"]) <= set(_ODD)  # fold 1 tests the odd subjects only
    ct_mr = metrics["protocols"]["ct_to_mr"]
    assert metrics["protocols"]["ct_to_mr"]["support_pool"] == _ODD
    assert all(s.startswith("chaos_") for s in ct_mr["by_shot"]["1"]["accuracy_subjects"]["per_subject"])
    assert ct_mr["by_shot"]["1"]["accuracy"]["n_episodes"] == 4 and ct_mr["n_way"] == 4

    btcv_items = {i["subject"]: i for i in monai_metalearn_datalist("btcv_sabs", data_dir)}
    chaos = monai_metalearn_datalist("chaos_t2", data_dir)[0]
    organs = ["liver", "spleen", "kidney_left", "kidney_right"]
    support = [{"image": btcv_items[s]["image"], "mask": btcv_items[s]["label"], "modality": "CT",
                "mask_label": btcv_items[s]["structures"][o], "label": o} for s in _ODD[:2] for o in organs]
    query = [{"image": chaos["image"], "mask": chaos["label"], "modality": "MR",
              "mask_label": chaos["structures"][o], "id": o} for o in organs]
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"support": support, "query": query}))
    ok(bundle(["train.json", "cross_subject.json", "inference.json"], *CROSS, "--task_file", str(task), out=out))
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["classes"] == sorted(organs) and len(pred["predictions"]) == 4
    for p in pred["predictions"]:
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-4 and p["label"] in organs


def monai_metalearn_datalist(source: str, data_dir) -> list[dict]:
    from monai_metalearn.data import load_datalist

    return load_datalist(source, str(data_dir))
