"""The fewshot_segmentation_3d bundle from the command line, as a user runs it: train -> evaluate -> inference on
the real scans with small overrides, resume, schema validity, and the one-line errors.

One train run is shared by the module (``trained``), and every run reads the subjects from one module cache
(``--cache_dir``), so the 20 BTCV CTs, 10 CHAOS MRs, 30 ACDC and 6 LPBA40 scans are loaded and resampled once."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_metalearn.errors import ConfigError, MetaLearnError, MissingFileError, TaskFileError
from monai_metalearn.apps import segmentation as app

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "fewshot_segmentation_3d"
TS = "totalsegmentator"

# small settings, the same for train / evaluate / inference (the checkpoint must fit the network): 16^3 patches,
# a 4-8-8-8 UNet, 2 patches per subject; the data and the structure splits are the bundle's own
SMALL = [
    "--patch_size", "[16,16,16]", "--channels", "[4,8,8,8]", "--feature_channels", "4",
    "--n_patches", "2", "--eval_patches", "2", "--episodes_per_epoch", "2", "--meta_batch_size", "1",
    "--val_episodes", "2", "--val_interval", "1", "--progress", "False",
]
TEST_STRUCTURES = {"liver", "spleen", "kidney_left", "kidney_right", "caudate_left", "caudate_right", "putamen_left",
                   "putamen_right", "hippocampus_left", "hippocampus_right", "right_ventricle", "myocardium",
                   "left_ventricle"}
FOLD0_BTCV = {f"btcv_sabs_{i:02d}" for i in range(0, 20, 2)}

pytestmark = pytest.mark.xdist_group("bundle")


@pytest.fixture(scope="session")  # session: built once even when xdist interleaves modules
def cache_dir(tmp_path_factory) -> Path:
    """Subjects cache shared by every run of the module."""
    return tmp_path_factory.mktemp("seg_cache")


def bundle(configs: list[str], *args: str, out: Path, ckpt: Path | None = None,
           cache: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file [...] ...`` in the bundle folder."""
    files = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--output_dir", str(out),
           "--ckpt_path", str(ckpt or out / "model.pt"), "--cache_dir", str(cache or out / "cache"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def one_line_error(proc: subprocess.CompletedProcess, *reasons: str) -> str:
    """The run failed with a single ``monai-metalearn: error: ...`` line naming ``reasons``, and no traceback."""
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("monai-metalearn: error: "), log[-3000:]
    for reason in reasons:
        assert reason in last, (reason, last)
    return last


@pytest.fixture(scope="session")  # session: built once even when xdist interleaves modules
def trained(tmp_path_factory, data_dir, cache_dir):
    out = tmp_path_factory.mktemp("seg") / "run"
    proc = ok(bundle(["train.json"], *SMALL, "--epochs", "1", out=out, cache=cache_dir))
    return out, proc


def test_train_writes_checkpoint_logs_and_resume_state(trained, cache_dir):
    out, proc = trained
    state = torch.load(out / "model.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in state), sorted(state)[:5]
    resume = list((out / "resume").glob("*.pt"))
    assert len(resume) == 1
    ckpt = torch.load(resume[0], weights_only=False)
    assert set(ckpt) == {"learner", "optimizer", "trainer"}
    assert ckpt["trainer"]["iteration"] == 2 and ckpt["trainer"]["episode"] == 2  # 1 epoch of 2 episodes
    assert list(out.glob("events.out.tfevents.*")), "TensorBoardStatsHandler wrote no event file"
    assert "Epoch[1] Metrics -- dice" in proc.stdout + proc.stderr  # ValidationHandler ran meta-validation
    assert len(list(cache_dir.glob("subjects_*.pt"))) == 1  # later runs read the subjects from here


def test_resume_continues_the_episode_count(trained, tmp_path, cache_dir):
    out, _ = trained
    resume = next((out / "resume").glob("*.pt"))
    run2 = tmp_path / "run"
    proc = ok(bundle(["train.json"], *SMALL, "--epochs", "2", "--resume_from", str(resume), out=run2,
                     cache=cache_dir))
    log = proc.stdout + proc.stderr
    assert "Epoch: 2/2, Iter: 1/2" in log and "Epoch: 1/2" not in log
    ckpt = torch.load(next((run2 / "resume").glob("*.pt")), weights_only=False)
    assert ckpt["trainer"]["iteration"] == 4 and ckpt["trainer"]["episode"] == 4


def _dice_ok(summary: dict, n: int | None = None) -> None:
    dice = summary["dice"]
    assert math.isfinite(dice["mean"]) and 0.0 <= dice["mean"] <= 1.0, dice
    assert math.isfinite(dice["ci95"]) and dice["ci95"] >= 0, dice
    if n is not None:
        assert dice["n_episodes"] == n, dice
    assert summary["per_structure"] and set(summary["per_structure"]) <= TEST_STRUCTURES, summary["per_structure"]
    for name, s in summary["per_structure"].items():
        assert math.isfinite(s["mean"]) and 0.0 <= s["mean"] <= 1.0, (name, s)


def test_evaluate_writes_metrics_json(trained, tmp_path, cache_dir):
    out, _ = trained
    ok(bundle(["train.json", "evaluate.json"], *SMALL, "--test_episodes", "2", "--protocol", "all", out=tmp_path,
              ckpt=out / "model.pt", cache=cache_dir))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # the top level: 1-shot over the five protocol entries, 2 episodes each
    _dice_ok(metrics, n=10)
    assert metrics["k_shot"] == 1 and metrics["learner_name"] == "protoseg"
    assert metrics["fold"] == 0 and metrics["setting"] == 2 and metrics["protocol"] == "all"
    assert set(metrics["by_shot"]) == {"1"} and metrics["by_shot"]["1"]["dice"] == metrics["dice"]
    protocols = metrics["by_protocol"]
    assert set(protocols) == {"abdominal_ct", "abdominal_mr", "abdominal_ct_to_mr", "heart", "brain"}
    for by_k in protocols.values():
        summary = by_k["1"]
        _dice_ok(summary, n=2)
        # the interval over query subjects, and how many: balanced episodes take the structures in turn for the
        # first query subject, so 2 episodes are 2 structures of 1 subject (no interval over 1 subject)
        subjects = summary["dice"]["subjects"]
        assert subjects["n_subjects"] == 1 and subjects["ci95"] is None, subjects
        assert subjects["mean"] == pytest.approx(summary["dice"]["mean"]), subjects
    assert metrics["not_possible"] == []
    pools = {"abdominal_ct": (FOLD0_BTCV, FOLD0_BTCV), "abdominal_mr": ("chaos_", "chaos_"),
             "abdominal_ct_to_mr": (FOLD0_BTCV, "chaos_"), "heart": ("acdc_", "acdc_"),
             "brain": ({"lpba40_S01", "lpba40_S03", "lpba40_S05"},) * 2}
    assert len(metrics["episodes"]) == 10
    for ep in metrics["episodes"]:
        assert math.isfinite(ep["dice"]) and 0.0 <= ep["dice"] <= 1.0, ep
        assert ep["structure"] in TEST_STRUCTURES and len(ep["support_subject"]) == ep["k_shot"] == 1
        assert not set(ep["support_subject"]) & set(ep["query_subject"]), ep  # support and query subjects differ
        for side, pool in zip(("support_subject", "query_subject"), pools[ep["protocol"]]):
            for sub in ep[side]:
                assert sub in pool if isinstance(pool, set) else sub.startswith(pool), (side, ep)


def test_reference_learners_run_without_a_checkpoint(tmp_path, cache_dir, data_dir):
    proc = bundle(["train.json", "evaluate.json"], *SMALL, "--learner_name", "boxaligned", "--test_episodes", "2",
                  out=tmp_path, ckpt=tmp_path / "none.pt", cache=cache_dir)
    ok(proc)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["by_protocol"]) == {"abdominal_ct", "abdominal_mr", "abdominal_ct_to_mr"}
    # the liver placed by the body boxes overlaps the query's liver
    liver = [e for e in metrics["episodes"] if e["structure"] == "liver"]
    assert liver and all(e["dice"] > 0.1 for e in liver), liver
    proc = bundle(["train.json"], *SMALL, "--learner_name", "wholebody", out=tmp_path / "train")
    one_line_error(proc, "'wholebody' has nothing to meta-train", "evaluate.json")


def test_inference_on_windowed_ct_and_mr_without_hu(tmp_path, data_dir):
    """A task of BTCV (8-bit windowed CT) support and a BTCV and a CHAOS (MR) query, declared ``"modality": "CT"``
    for the CT items: the box-aligned reference needs no checkpoint and writes masks on each query's grid."""
    import nibabel as nib

    task = {"support": [{"image": "btcv_sabs/image_0.nii.gz", "label": "btcv_sabs/label_0.nii.gz", "label_value": 6,
                         "modality": "CT"}],
            "query": [{"image": "btcv_sabs/image_3.nii.gz", "modality": "CT"},
                      {"image": "chaos_t2/image_1.nii.gz", "modality": "MR"}]}
    (tmp_path / "task.json").write_text(json.dumps(task))
    res = tmp_path / "out"
    ok(bundle(["train.json", "inference.json"], *SMALL, "--learner_name", "boxaligned", "--task_file",
              str(tmp_path / "task.json"), "--data_dir", str(data_dir), out=res, ckpt=tmp_path / "none.pt"))
    listing = {Path(s["image"]).name: s for s in json.loads((res / "segmentations.json").read_text())["segmentations"]}
    for name, folder in (("image_3.nii.gz", "btcv_sabs"), ("image_1.nii.gz", "chaos_t2")):
        mask = nib.load(listing[name]["mask"])
        query = nib.load(str(data_dir / folder / name))
        assert mask.shape == query.shape and np.allclose(mask.affine, query.affine, atol=1e-4)
        assert listing[name]["foreground_ml"] > 100, listing[name]  # a liver-sized mask, not an empty one
    truth = np.asarray(nib.load(str(data_dir / "btcv_sabs" / "label_3.nii.gz")).dataobj) == 6
    pred = np.asarray(nib.load(listing["image_3.nii.gz"]["mask"]).dataobj) > 0
    assert 2 * (truth & pred).sum() / (truth.sum() + pred.sum()) > 0.2


def test_atlas_inference_on_nifti_and_dicom_queries(tmp_path, data_dir):
    """``learner_name atlas`` through train.json + inference.json with no checkpoint: BTCV subject 0's liver carried
    to BTCV subject 3 (NIfTI) and to the TotalSegmentator DICOM slab, each mask on its query's own grid; a short
    registration schedule (``--learner_args``) keeps the test under half a minute."""
    import nibabel as nib

    from monai_metalearn.data import LoadScan

    task = {"support": [{"image": "btcv_sabs/image_0.nii.gz", "label": "btcv_sabs/label_0.nii.gz", "label_value": 6}],
            "query": [{"image": "btcv_sabs/image_3.nii.gz"}, {"image": f"{TS}/example_ct_dicom"}]}
    (tmp_path / "task.json").write_text(json.dumps(task))
    res = tmp_path / "out"
    ok(bundle(["train.json", "inference.json"], "--learner_name", "atlas", "--task_file", str(tmp_path / "task.json"),
              "--data_dir", str(data_dir), "--learner_args",
              "{'registration': {'spacing': 6.0, 'iterations': [40, 20, 0]}}", out=res, ckpt=tmp_path / "none.pt"))
    listing = {Path(s["image"]).name: s for s in json.loads((res / "segmentations.json").read_text())["segmentations"]}
    btcv = nib.load(listing["image_3.nii.gz"]["mask"])
    query = nib.load(str(data_dir / "btcv_sabs" / "image_3.nii.gz"))
    assert btcv.shape == query.shape and np.allclose(btcv.affine, query.affine, atol=1e-4)
    truth = np.asarray(nib.load(str(data_dir / "btcv_sabs" / "label_3.nii.gz")).dataobj) == 6
    pred = np.asarray(btcv.dataobj) > 0
    assert 2 * (truth & pred).sum() / (truth.sum() + pred.sum()) > 0.6  # box-aligned reaches ~0.4 on BTCV livers
    dicom = LoadScan()(str(data_dir / TS / "example_ct_dicom"))
    slab = nib.load(listing["example_ct_dicom"]["mask"])
    assert slab.shape == tuple(dicom.shape[1:])
    np.testing.assert_allclose(slab.affine, np.asarray(dicom.affine, dtype=np.float64), atol=1e-4)
    assert listing["example_ct_dicom"]["foreground_ml"] > 50  # the slab holds liver: the carried mask is not empty


def liver_support(data_dir: Path, label: str = "example_seg_fast_force_split.nii.gz", value: int | None = 5) -> dict:
    item = {"image": str(data_dir / TS / "example_ct.nii.gz"), "label": str(data_dir / TS / label)}
    return item if value is None else {**item, "label_value": value}


def test_inference_writes_masks_on_each_querys_own_grid(trained, data_dir, tmp_path):
    import nibabel as nib

    from monai_metalearn.data import LoadScan

    out, _ = trained
    task = {  # relative paths: found under --data_dir (not in the task file's folder)
        "support": [{"image": f"{TS}/example_ct.nii.gz", "label": f"{TS}/example_seg_fast_force_split.nii.gz",
                     "label_value": 5}],
        "query": [{"image": f"{TS}/example_ct_dicom"}, {"image": f"{TS}/example_ct.nii.gz"},
                  {"image": f"{TS}/example_ct.nii.gz"}],  # the same name twice: two masks, none overwritten
    }
    (tmp_path / "task.json").write_text(json.dumps(task))
    res = tmp_path / "out"
    ok(bundle(["train.json", "inference.json"], *SMALL, "--task_file", str(tmp_path / "task.json"), "--data_dir",
              str(data_dir), out=res, ckpt=out / "model.pt"))
    listing = json.loads((res / "segmentations.json").read_text())
    assert listing["k_shot"] == 1 and len(listing["segmentations"]) == 3
    by_name = {Path(s["mask"]).name: s for s in listing["segmentations"]}
    assert set(by_name) == {"example_ct_dicom_seg.nii.gz", "example_ct_seg.nii.gz", "example_ct_query2_seg.nii.gz"}
    twice = [np.asarray(nib.load(by_name[n]["mask"]).dataobj) for n in ("example_ct_seg.nii.gz",
                                                                         "example_ct_query2_seg.nii.gz")]
    np.testing.assert_array_equal(*twice)  # one adapted model, one query: the same mask

    dicom = LoadScan()(str(data_dir / TS / "example_ct_dicom"))
    nifti = nib.load(str(data_dir / TS / "example_ct.nii.gz"))
    expected = {
        "example_ct_dicom_seg.nii.gz": (tuple(dicom.shape[1:]), np.asarray(dicom.affine, dtype=np.float64)),
        "example_ct_seg.nii.gz": (tuple(nifti.shape), nifti.affine),
    }
    for name, (shape, affine) in expected.items():
        entry = by_name[name]
        assert Path(entry["mask"]).is_file() and Path(entry["image"]).exists()
        mask = nib.load(entry["mask"])
        values = np.asarray(mask.dataobj)
        assert mask.shape == shape and tuple(entry["shape"]) == shape, (name, mask.shape, shape)
        np.testing.assert_allclose(mask.affine, affine, atol=1e-4, err_msg=name)
        assert set(np.unique(values).tolist()) <= {0, 1}, (name, np.unique(values))
        voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
        assert entry["foreground_ml"] == pytest.approx(float(values.sum()) * voxel_ml, abs=0.01)


# ------------------------------------------------------------------------------------------ one-line errors
def test_empty_support_mask_is_a_one_line_error(trained, data_dir, tmp_path):
    out, _ = trained
    task = {"support": [liver_support(data_dir, value=250)],  # 250: an id absent from TotalSegmentator's map
            "query": [{"image": str(data_dir / TS / "example_ct.nii.gz")}]}
    (tmp_path / "task.json").write_text(json.dumps(task))
    proc = bundle(["train.json", "inference.json"], *SMALL, "--task_file", str(tmp_path / "task.json"),
                  out=tmp_path / "out", ckpt=out / "model.pt")
    one_line_error(proc, "support[0]", "is empty", "label_value 250")
    assert not (tmp_path / "out" / "segmentations.json").exists()


def test_missing_task_file_checkpoint_and_wrong_key_are_one_line_errors(tmp_path):
    proc = bundle(["train.json", "inference.json"], *SMALL, out=tmp_path, ckpt=tmp_path / "none.pt")
    one_line_error(proc, "no task_file", "--task_file")
    proc = bundle(["train.json", "evaluate.json"], *SMALL, out=tmp_path, ckpt=tmp_path / "none.pt")
    one_line_error(proc, "checkpoint", "none.pt")
    proc = bundle(["train.json"], "--epoch", "3", out=tmp_path / "x")
    one_line_error(proc, "unknown config key --epoch", "--epochs")


def _task_error(tmp_path: Path, task: dict) -> str:
    """``segment_task`` on ``task`` (the bundle's inference step, in-process): its typed error's one-line message.
    The bundle prints it as the process's last line (see the CLI tests above)."""
    from monai_metalearn.networks import unet_backbone

    backbone = unet_backbone(feature_channels=4, channels=[4, 8, 8, 8], strides=[2, 2, 2], num_res_units=1,
                             norm="instance")
    learner = app.build_segmentation_learner("protoseg", backbone, 4, ["a", "b"])
    (tmp_path / "task.json").write_text(json.dumps(task))
    with pytest.raises(MetaLearnError) as info:
        app.segment_task(learner, str(tmp_path / "task.json"), str(tmp_path / "out"), patch_size=(16, 16, 16),
                         n_patches=2)
    message = str(info.value)
    assert message and "\n" not in message, message
    assert not (tmp_path / "out" / "segmentations.json").exists()
    return message


def test_support_image_and_mask_of_different_geometry(data_dir, tmp_path):
    # CT-1's image with CT-2's label map (512x512x20 at 0.98x0.98x2 mm)
    msg = _task_error(tmp_path, {"support": [liver_support(data_dir, "example_seg_dicom.nii.gz")],
                                 "query": [{"image": str(data_dir / TS / "example_ct.nii.gz")}]})
    assert "support[0]" in msg and "example_seg_dicom.nii.gz" in msg and "grid differs" in msg, msg


def test_unreadable_query(data_dir, tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"this is not a NIfTI file")
    msg = _task_error(tmp_path, {"support": [liver_support(data_dir)],
                                 "query": [{"image": "bad.nii.gz"}]})  # relative: next to the task file
    assert "query[0]" in msg and "bad.nii.gz" in msg and "cannot be read" in msg, msg


@pytest.mark.parametrize(
    "task, match",
    [
        ({"support": [], "query": [{"image": "CT"}]}, "has no support examples"),
        ({"query": [{"image": "CT"}]}, "has no support examples"),
        ({"support": [{"image": "CT", "label": "CT"}]}, "has no query images"),
        ({"support": [{"image": "CT"}], "query": [{"image": "CT"}]}, r"support\[0\] .* has no 'label'"),
        ({"support": [{"image": "CT", "label": "missing.nii.gz"}], "query": [{"image": "CT"}]},
         r"support\[0\] label: file 'missing.nii.gz' not found"),
    ],
)
def test_task_file_errors(tmp_path, data_dir, task, match):
    ct = str(data_dir / TS / "example_ct.nii.gz")
    (tmp_path / "task.json").write_text(json.dumps(task).replace('"CT"', json.dumps(ct)))
    with pytest.raises(MetaLearnError, match=match) as info:
        app.load_segmentation_task(tmp_path / "task.json")
    assert isinstance(info.value, (TaskFileError, MissingFileError))


def test_task_file_not_json_and_missing(tmp_path):
    (tmp_path / "t.json").write_text("{support: ")
    with pytest.raises(TaskFileError, match="is not valid JSON"):
        app.load_segmentation_task(tmp_path / "t.json")
    with pytest.raises(FileNotFoundError, match="not found"):
        app.load_segmentation_task(tmp_path / "none.json")


# ------------------------------------------------------------------------------------------ in-process checks
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_patch_transforms_always_hold_the_structure_and_background(n):
    """Every support set holds structure voxels (and background ones from 2 patches on), whatever the seed: a
    random pos/neg draw per patch gave all-background supports (1 in 2**n) that stopped adaptation."""
    label = torch.zeros(1, 40, 40, 40)
    label[0, 5:8, 5:8, 5:8] = 1  # a small structure: a background-centred patch misses it
    image = torch.rand(1, 40, 40, 40)
    transform = app.patch_transforms((16, 16, 16), n)
    for seed in range(20):
        transform.set_random_state(seed=seed)
        patches = transform({"image": image, "label": label})
        assert len(patches) == n and all(p["image"].shape == (1, 16, 16, 16) for p in patches)
        assert sum(float(p["label"].sum()) for p in patches) > 0, seed
        if n >= 2:
            assert any(bool((p["label"] == 0).any()) for p in patches), seed
    transform.set_random_state(seed=3)
    a = transform({"image": image, "label": label})
    transform.set_random_state(seed=3)
    b = transform({"image": image, "label": label})
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))  # seeded: fixed evaluation episodes


def test_structure_splits_in_the_config_are_disjoint(data_dir):
    cfg = json.loads((BUNDLE / "configs" / "train.json").read_text())
    test = cfg["test_ct_structures"] + cfg["test_brain_structures"] + cfg["test_heart_structures"]
    app.check_class_splits(train=cfg["train_structures"], val=cfg["val_structures"], test=test)
    assert set(test) == TEST_STRUCTURES
    with pytest.raises(ConfigError, match="liver"):
        app.check_class_splits(train=cfg["train_structures"] + ["liver"], test=test)
