"""The classification bundle's diagnosis mode (``configs/diagnosis.json``) from the command line: meta-train on the
training patients of an ACDC fold (ED + ES as two channels), patient-level evaluation, and inference on a task file of
confirmed cases (multi-image items, ids echoed, the mixed-grid error)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "fewshot_classification_3d"
SMALL = ["--epochs", "1", "--episodes_per_epoch", "2", "--meta_batch_size", "2", "--val_episodes", "2",
         "--features", "[8,16,16,16]", "--progress", "False"]

pytestmark = pytest.mark.xdist_group("bundle")


def bundle(configs: list[str], *args: str, out: Path, ckpt: Path | None = None) -> subprocess.CompletedProcess:
    files = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--output_dir", str(out),
           "--ckpt_path", str(ckpt or out / "model.pt"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=900)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def case(data_dir: Path, patient: str) -> list[str]:
    return [str(data_dir / "acdc" / f"{patient}_{phase}.nii.gz") for phase in ("ED", "ES")]


@pytest.fixture(scope="session")  # session: built once even when xdist interleaves modules
def trained(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("diag") / "run"
    proc = ok(bundle(["train.json", "diagnosis.json"], *SMALL, out=out))
    return out, proc


def test_train_sees_only_the_folds_training_patients(trained):
    out, proc = trained
    state = torch.load(out / "model.pt", weights_only=True)
    # the encoder's first convolution takes the two cardiac phases as channels
    first = next(v for k, v in state.items() if k.startswith("encoder.") and v.dim() == 5)
    assert first.shape[1] == 2


def test_evaluate_writes_patient_level_metrics(trained):
    out, _ = trained
    ok(bundle(["train.json", "diagnosis.json", "evaluate.json"], *SMALL, "--diagnosis_episodes", "3", out=out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["by_shot"]) == {"1", "5"}
    from monai_metalearn.diagnosis import acdc_cases, stratified_patient_folds

    cases = acdc_cases()
    fold0 = [cases[i]["id"] for i in stratified_patient_folds([c["class"] for c in cases], 3)[0]]
    assert sorted(metrics["test_patients"]) == sorted(fold0) and len(fold0) == 10
    for summary in metrics["by_shot"].values():
        assert summary["classes"] == ["DCM", "HCM", "MINF", "NOR", "RV"]
        assert sum(map(sum, summary["confusion"])) == 3 * 5  # 3 episodes, one query patient per diagnosis
        assert set(summary["per_patient"]) <= set(fold0)
        assert 0.0 <= summary["mean"] <= 1.0 and summary["n_subjects"] <= 10


def test_inference_on_multi_image_cases_echoes_ids(trained, data_dir, tmp_path):
    out, _ = trained
    groups = json.loads((data_dir / "acdc" / "groups.json").read_text())
    by: dict[str, list[str]] = {}
    for patient, diagnosis in sorted(groups.items()):
        by.setdefault(diagnosis, []).append(patient)
    task = {"support": [{"id": p, "image": case(data_dir, p), "label": d} for d, ps in by.items() for p in ps[1:3]],
            "query": [{"id": ps[0], "image": case(data_dir, ps[0])} for ps in by.values()]}
    (tmp_path / "task.json").write_text(json.dumps(task))
    ok(bundle(["train.json", "diagnosis.json", "inference.json"], *SMALL, "--task_file", str(tmp_path / "task.json"),
              out=out))
    result = json.loads((out / "predictions.json").read_text())
    assert result["classes"] == sorted(by) and result["k_shot"] == {d: 2 for d in by}
    assert [p["id"] for p in result["predictions"]] == [ps[0] for ps in by.values()]
    for p in result["predictions"]:
        assert p["label"] in by and sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert len(p["image"]) == 2


def test_a_case_of_images_on_different_grids_is_a_one_line_error(trained, data_dir, tmp_path):
    out, _ = trained
    mixed = [str(data_dir / "acdc" / "patient001_ED.nii.gz"), str(data_dir / "acdc" / "patient004_ES.nii.gz")]
    task = {"support": [{"image": case(data_dir, "patient002"), "label": "DCM"},
                        {"image": case(data_dir, "patient062"), "label": "NOR"}],
            "query": [{"image": mixed}]}
    (tmp_path / "task.json").write_text(json.dumps(task))
    proc = bundle(["train.json", "diagnosis.json", "inference.json"], *SMALL, "--task_file", str(tmp_path / "task.json"),
                  out=tmp_path / "o", ckpt=out / "model.pt")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in log, log[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("monai-metalearn: error: query[0]") and mixed[0] in last and mixed[1] in last
    assert not (tmp_path / "o" / "predictions.json").exists()


def test_novel_condition_matching_network(tmp_path, data_dir):
    """``--diagnosis_holdout RV``: meta-training sees no RV patient (4-way episodes); evaluation is 5-way with RV."""
    out = tmp_path / "holdout"
    proc = ok(bundle(["train.json", "diagnosis.json"], *SMALL, "--learner_name", "matching", "--diagnosis_holdout",
                     "RV", out=out))
    assert "train_loss" in proc.stdout + proc.stderr
    ok(bundle(["train.json", "diagnosis.json", "evaluate.json"], *SMALL, "--learner_name", "matching",
              "--diagnosis_holdout", "RV", "--diagnosis_episodes", "2", "--diagnosis_shots", "[1]", out=out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["by_shot"]["1"]["classes"] == ["DCM", "HCM", "MINF", "NOR", "RV"]
    assert metrics["extra"]["holdout"] == "RV" and metrics["extra"]["learner_name"] == "matching"
    from monai_metalearn.apps.diagnosis import DiagnosisSplitError, diagnosis_split
    from monai_metalearn.diagnosis import acdc_cases

    split = diagnosis_split(acdc_cases(data_dir), 3, 0, "RV")
    assert split["train_classes"] == ["DCM", "HCM", "MINF", "NOR"] and len(split["train"]) == 16
    assert not {c["id"] for c in split["train"]} & set(metrics["test_patients"])
    with pytest.raises(DiagnosisSplitError, match="'XYZ' is not a diagnosis"):
        diagnosis_split(acdc_cases(data_dir), 3, 0, "XYZ")
