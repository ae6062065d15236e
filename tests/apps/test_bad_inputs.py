"""Every class of bad input, through the Python API and through the bundles' command lines.

The bad inputs are made from the real scans (a TotalSegmentator CT crop and its label map): a truncated copy, a
DICOM folder of garbage files, a mask on another grid, an all-zero mask, images with NaN / infinite voxels, task
files that are not JSON or miss ``support`` / ``query``, query ids that would leave ``output_dir``, too few examples
per class, more ways than classes, and unknown config keys. Each one raises its typed error
(:mod:`monai_metalearn.errors`) whose message names the file, item, key or class and what is wrong; the bundles
print that message as their only ``monai-metalearn: error:`` line, exit with status 1, and write nothing to
``output_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_metalearn.apps import classification as cls_app
from monai_metalearn.apps import segmentation as seg_app
from monai_metalearn.cli import PREFIX
from monai_metalearn.data import LoadScan, ScanLoadError, SegmentationEpisodeDataset, load_datalist
from monai_metalearn.errors import CheckpointError, ConfigError, DataError, MissingFileError, TaskFileError

ROOT = Path(__file__).resolve().parents[2]
CLS_BUNDLE = ROOT / "bundles" / "fewshot_classification_3d"
SEG_BUNDLE = ROOT / "bundles" / "fewshot_segmentation_3d"
TS = "totalsegmentator"
LIVER, SPLEEN = 5, 1  # TotalSegmentator label ids, both present in the example_seg.nii.gz crop

pytestmark = pytest.mark.xdist_group("bundle")


def record(where: str, case: str, message: str) -> None:
    """With ``BAD_INPUT_LOG`` set, append ``where<TAB>case<TAB>message`` to that file: the table of what users see."""
    path = os.environ.get("BAD_INPUT_LOG")
    if path:
        with open(path, "a") as log:
            log.write(f"{where}\t{case}\t{message}\n")


# ------------------------------------------------------------------------------------------------- bad files
class Files:
    """Good and bad inputs made from the real CT crop ``example_ct_sm.nii.gz`` (122 x 101 x 30 voxels of 3 mm) and
    its label map ``example_seg.nii.gz``; the good ones are read in place, the bad ones written to ``root``."""

    def __init__(self, data_dir: Path, root: Path) -> None:
        self.root = root
        self.ct = str(data_dir / TS / "example_ct_sm.nii.gz")
        self.seg = str(data_dir / TS / "example_seg.nii.gz")
        raw = Path(self.ct).read_bytes()
        self.truncated = self._write("truncated.nii.gz", raw[: len(raw) // 2])
        self.dicom = root / "series"
        self.dicom.mkdir()
        for i in range(3):  # files named like slices, holding no DICOM
            (self.dicom / f"IM{i:04d}.dcm").write_bytes(b"not a DICOM slice " * 64)
        self.dicom = str(self.dicom)
        ct, seg = nib.load(self.ct), nib.load(self.seg)
        image = np.asarray(ct.dataobj).astype(np.float32)
        labels = np.asarray(seg.dataobj)
        nan = image.copy()
        nan[10, 20, 5] = nan[11, 20, 5] = nan[60, 50, 15] = np.nan
        self.nan = self._nifti("nan.nii.gz", nan, ct.affine)
        inf = image.copy()
        inf[10, 20, 5], inf[60, 50, 15] = np.inf, -np.inf
        self.inf = self._nifti("inf.nii.gz", inf, ct.affine)
        shifted = seg.affine.copy()
        shifted[:3, 3] += 10.0  # the same voxels 10 mm away
        self.mask_shifted = self._nifti("mask_shifted.nii.gz", labels, shifted)
        self.mask_cropped = self._nifti("mask_cropped.nii.gz", np.ascontiguousarray(labels[..., :29]), seg.affine)
        self.mask_zero = self._nifti("mask_zero.nii.gz", np.zeros_like(labels), seg.affine)

    def _write(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return str(self.root / name)

    def _nifti(self, name: str, array: np.ndarray, affine: np.ndarray) -> str:
        nib.save(nib.Nifti1Image(array, affine), self.root / name)
        return str(self.root / name)


@pytest.fixture(scope="module")
def files(data_dir, tmp_path_factory) -> Files:
    return Files(Path(data_dir), tmp_path_factory.mktemp("bad_inputs"))


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


def write_task(path: Path, task: Any) -> Path:
    path.write_text(task if isinstance(task, str) else json.dumps(task))
    return path


# ------------------------------------------------------------------------------------------------ task files
def cls_item(f: Files, label: str | None = None, **change: Any) -> dict[str, Any]:
    """A classification task item: the CT cropped around the liver (or spleen) of its label map."""
    item = {"image": f.ct, "mask": f.seg, "mask_label": SPLEEN if label == "spleen" else LIVER}
    if label is not None:
        item["label"] = label
    item.update(change)
    return {k: v for k, v in item.items() if v is not None}


def cls_task(f: Files, support1: dict | None = None, query: list | None = None) -> dict[str, Any]:
    return {"support": [cls_item(f, "liver"), cls_item(f, "spleen", **(support1 or {}))],
            "query": query or [cls_item(f)]}


def seg_item(f: Files, **change: Any) -> dict[str, Any]:
    item = {"image": f.ct, "label": f.seg, "label_value": LIVER, **change}
    return {k: v for k, v in item.items() if v is not None}


def seg_task(f: Files, support: dict | None = None, query: list | None = None) -> dict[str, Any]:
    return {"support": [seg_item(f, **(support or {}))], "query": query or [{"image": f.ct}]}


# name -> (classification task, segmentation task, error type, message fragments: cls, seg). Where the bad item
# is not the first, the first items are good: the run has done work before it meets the bad one.
Case = tuple[Callable[[Files], Any], Callable[[Files], Any], type, Callable[[Files], list[str]],
             Callable[[Files], list[str]]]
CASES: dict[str, Case] = {
    "missing_file": (
        lambda f: cls_task(f, {"image": "missing.nii.gz"}),
        lambda f: seg_task(f, query=[{"image": f.ct}, {"image": "missing.nii.gz"}]),
        MissingFileError,
        lambda f: ["support[1]: file 'missing.nii.gz' not found"],
        lambda f: ["query[1]: file 'missing.nii.gz' not found"],
    ),
    "truncated_file": (
        lambda f: cls_task(f, {"image": f.truncated}),
        lambda f: seg_task(f, query=[{"image": f.ct}, {"image": f.truncated}]),
        DataError,
        lambda f: [f"support[1] {f.truncated}: image: {f.truncated}: cannot be read (EOFError"],
        lambda f: [f"query[1] {f.truncated}: image: {f.truncated}: cannot be read (EOFError"],
    ),
    "unreadable_dicom_folder": (
        lambda f: cls_task(f, query=[cls_item(f), {"image": f.dicom}]),
        lambda f: seg_task(f, query=[{"image": f.ct}, {"image": f.dicom}]),
        DataError,
        lambda f: [f"query[1] {f.dicom}: image: {f.dicom}: unreadable DICOM series folder: 3 of 3 files are not "
                   "readable slices", "IM0000.dcm, IM0001.dcm, IM0002.dcm"],
        lambda f: [f"query[1] {f.dicom}: image: {f.dicom}: unreadable DICOM series folder: 3 of 3 files"],
    ),
    "mask_on_another_affine": (
        lambda f: cls_task(f, {"mask": f.mask_shifted}),
        lambda f: seg_task(f, {"label": f.mask_shifted}),
        DataError,
        lambda f: [f"support[1] {f.ct}: mask: {f.mask_shifted}: grid differs from image ({f.ct})",
                   "affines differ by up to 10 mm"],
        lambda f: [f"support[0] {f.ct}: label: {f.mask_shifted}: grid differs from image ({f.ct})",
                   "affines differ by up to 10 mm"],
    ),
    "mask_of_another_shape": (
        lambda f: cls_task(f, {"mask": f.mask_cropped}),
        lambda f: seg_task(f, {"label": f.mask_cropped}),
        DataError,
        lambda f: [f"support[1] {f.ct}: mask: {f.mask_cropped}: grid differs from image",
                   "spatial shape (122, 101, 29) vs (122, 101, 30)"],
        lambda f: [f"support[0] {f.ct}: label: {f.mask_cropped}: grid differs from image",
                   "spatial shape (122, 101, 29) vs (122, 101, 30)"],
    ),
    "all_zero_mask": (
        lambda f: cls_task(f, {"mask": f.mask_zero, "mask_label": None}),
        lambda f: seg_task(f, {"label": f.mask_zero, "label_value": None}),
        DataError,
        lambda f: [f"support[1] {f.ct}: mask {f.mask_zero} is empty: no non-zero voxel"],
        lambda f: [f"support[0] {f.ct}: the support mask {f.mask_zero} is empty"],
    ),
    "label_absent_from_mask": (
        lambda f: cls_task(f, {"mask_label": 250}),
        lambda f: seg_task(f, {"label_value": 250}),
        DataError,
        lambda f: [f"support[1] {f.ct}: mask {f.seg} is empty: no voxel equal to mask_label 250"],
        lambda f: [f"support[0] {f.ct}: the support mask {f.seg} is empty (no voxel equals label_value 250)"],
    ),
    "nan_in_image": (
        lambda f: cls_task(f, query=[cls_item(f), cls_item(f, image=f.nan)]),
        lambda f: seg_task(f, query=[{"image": f.ct}, {"image": f.nan}]),
        DataError,
        lambda f: [f"query[1] {f.nan}: image: {f.nan}: 3 NaN and 0 infinite intensities"],
        lambda f: [f"query[1] {f.nan}: image: {f.nan}: 3 NaN and 0 infinite intensities"],
    ),
    "inf_in_image": (
        lambda f: cls_task(f, {"image": f.inf}),
        lambda f: seg_task(f, {"image": f.inf}),
        DataError,
        lambda f: [f"support[1] {f.inf}: image: {f.inf}: 0 NaN and 2 infinite intensities"],
        lambda f: [f"support[0] {f.inf}: image: {f.inf}: 0 NaN and 2 infinite intensities"],
    ),
    "task_not_json": (
        lambda f: '{"support": [{"image": "a.nii.gz", "label": "liver"}',
        lambda f: "{support: []}",
        TaskFileError,
        lambda f: ["task.json' is not valid JSON: Expecting"],
        lambda f: ["task.json' is not valid JSON: Expecting property name"],
    ),
    "task_without_support": (
        lambda f: {"query": [cls_item(f)]},
        lambda f: {"query": [{"image": f.ct}]},
        TaskFileError,
        lambda f: ["task.json' has no support examples"],
        lambda f: ["task.json' has no support examples"],
    ),
    "task_without_query": (
        lambda f: {k: v for k, v in cls_task(f).items() if k != "query"},
        lambda f: {**seg_task(f), "query": []},
        TaskFileError,
        lambda f: ["task.json' has no query images"],
        lambda f: ["task.json' has no query images"],
    ),
}


@pytest.fixture(scope="module")
def cls_learner():
    from monai_metalearn.learners import create_learner
    from monai_metalearn.networks import ConvEncoder3D

    torch.manual_seed(0)
    return create_learner("protonet", ConvEncoder3D(1, (4, 8), pooled_size=2), 64, 5)


@pytest.fixture(scope="module")
def seg_learner():
    from monai_metalearn.networks import unet_backbone

    torch.manual_seed(0)
    backbone = unet_backbone(feature_channels=4, channels=[4, 8, 8, 8], strides=[2, 2, 2], num_res_units=1,
                             norm="instance")
    return seg_app.build_segmentation_learner("protoseg", backbone, 4, ["a", "b"])


def predict(learner, task: Path, out: Path) -> dict[str, Any]:
    return cls_app.predict_task(learner, str(task), str(out), (16, 16, 16), (3.0, 3.0, 3.0))


def segment(learner, task: Path, out: Path) -> dict[str, Any]:
    return seg_app.segment_task(learner, str(task), str(out), patch_size=(16, 16, 16), n_patches=2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_classification_api(case, files, cls_learner, tmp_path):
    build, _, error, fragments, _ = CASES[case]
    task = write_task(tmp_path / "task.json", build(files))
    with pytest.raises(error) as info:
        predict(cls_learner, task, tmp_path / "out")
    message = str(info.value)
    record(f"classification API ({type(info.value).__name__})", case, message)
    assert "\n" not in message, message
    for fragment in fragments(files):
        assert fragment in message, (fragment, message)
    assert nothing_written(tmp_path / "out")


@pytest.mark.parametrize("case", sorted(CASES))
def test_segmentation_api(case, files, seg_learner, tmp_path):
    _, build, error, _, fragments = CASES[case]
    task = write_task(tmp_path / "task.json", build(files))
    with pytest.raises(error) as info:
        segment(seg_learner, task, tmp_path / "out")
    message = str(info.value)
    record(f"segmentation API ({type(info.value).__name__})", case, message)
    assert "\n" not in message, message
    for fragment in fragments(files):
        assert fragment in message, (fragment, message)
    assert nothing_written(tmp_path / "out")  # a good first query's mask is not written either


def test_good_tasks_pass_the_same_checks(files, cls_learner, seg_learner, tmp_path):
    """The matrix's good items (the same files, masks and labels) give predictions and a liver mask: the errors
    above come from the bad item alone."""
    result = predict(cls_learner, write_task(tmp_path / "c.json", cls_task(files)), tmp_path / "c")
    assert result["classes"] == ["liver", "spleen"] and result["k_shot"] == {"liver": 1, "spleen": 1}
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["predictions.json"]
    result = segment(seg_learner, write_task(tmp_path / "s.json", seg_task(files)), tmp_path / "s")
    assert [Path(s["mask"]).name for s in result["segmentations"]] == ["example_ct_sm_seg.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["example_ct_sm_seg.nii.gz", "segmentations.json"]
    assert nib.load(result["segmentations"][0]["mask"]).shape == (122, 101, 30)


@pytest.mark.parametrize("which", ["truncated", "dicom", "nan", "inf", "missing"])
def test_checked_loading_raises_data_errors_naming_the_file(files, which):
    """The loader itself: :class:`ScanLoadError` is a :class:`DataError` whose message starts with the file."""
    path = {"missing": str(files.root / "none.nii.gz")}.get(which) or getattr(files, which)
    reason = {"truncated": "cannot be read (EOFError", "dicom": "unreadable DICOM series folder",
              "nan": "3 NaN and 0 infinite intensities", "inf": "0 NaN and 2 infinite intensities",
              "missing": "file not found"}[which]
    with pytest.raises(ScanLoadError) as info:
        LoadScan()(path, key="image")
    assert isinstance(info.value, DataError) and isinstance(info.value, RuntimeError)
    assert str(info.value).startswith(f"image: {path}: {reason}"), str(info.value)
    assert info.value.path == path and info.value.key == "image"


def test_missing_task_file_and_truncated_checkpoint(files, cls_learner, tmp_path):
    with pytest.raises(MissingFileError, match=f"task_file '{tmp_path / 'none.json'}' not found"):
        predict(cls_learner, tmp_path / "none.json", tmp_path / "out")
    with pytest.raises(MissingFileError, match=f"task_file '{tmp_path / 'none.json'}' not found"):
        segment(cls_learner, tmp_path / "none.json", tmp_path / "out")
    torch.save({"learner": cls_learner.state_dict()}, tmp_path / "model.pt")
    raw = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint '{tmp_path / 'cut.pt'}' cannot be read"):
        cls_app.load_learner(cls_learner, str(tmp_path / "cut.pt"))
    assert nothing_written(tmp_path / "out")


# ------------------------------------------------------------------------------- too few examples, N too large
@pytest.fixture(scope="module")
def patches(data_dir):
    """Real structure patches: 2 views of 3 organs in each of the two TotalSegmentator CTs (4 per class)."""
    return cls_app.load_structure_patches(str(data_dir), ["totalseg_ct1", "totalseg_ct2"],
                                          ["liver", "spleen", "pancreas"], (3.0, 3.0, 3.0), n_views=2,
                                          progress=False)


def test_classification_episodes_with_too_few_examples_or_too_many_ways(patches, cls_learner, tmp_path):
    from monai_metalearn.data import ClassificationEpisodeDataset

    classes = ["liver", "spleen", "pancreas"]
    assert sorted(sum(p["class"] == c for p in patches) for c in classes) == [4, 4, 4]
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"n_way=4 but only 3 test classes: \['liver', 'spleen', 'pancreas'\]"):
        cls_app.evaluate_shots(cls_learner, patches, classes, 4, [1], 1, 2, "cpu", str(out), progress=False)
    with pytest.raises(DataError, match=r"3 class\(es\) have fewer than k_shot \+ q_query = 5 examples: "
                                        r"'liver' \(4\), 'pancreas' \(4\), 'spleen' \(4\)"):
        cls_app.evaluate_shots(cls_learner, patches, classes, 3, [3], 2, 2, "cpu", str(out), progress=False,
                               cross_subject=False)
    assert nothing_written(out)
    # the sampler's own errors are typed: a ConfigError for the ways, a DataError for the examples
    with pytest.raises(ConfigError, match=r"n_way=4 but only 3 classes are available"):
        ClassificationEpisodeDataset(patches, n_way=4, k_shot=1, q_query=1, num_episodes=1, classes=classes)
    with pytest.raises(DataError, match=r"cross_subject=True: 3 class\(es\) cannot give 3 support and 1 query"):
        ClassificationEpisodeDataset(patches, n_way=3, k_shot=3, q_query=1, num_episodes=1, classes=classes,
                                     cross_subject=True)
    episodes = ClassificationEpisodeDataset(patches, n_way=3, k_shot=1, q_query=1, num_episodes=1, classes=classes,
                                            cross_subject=True)  # one subject each side: possible
    assert len(episodes) == 1


def test_segmentation_episodes_with_too_few_subjects(data_dir):
    items = load_datalist("totalseg_ct1", str(data_dir)) + load_datalist("totalseg_ct2", str(data_dir))
    with pytest.raises(DataError, match=r"1 structure\(s\) are present in fewer than k_shot \+ q_query = 3 distinct "
                                        r"subjects: 'liver' in \['totalseg_ct1', 'totalseg_ct2'\]"):
        SegmentationEpisodeDataset(items, ["liver"], k_shot=2, q_query=1, num_episodes=1)
    assert len(SegmentationEpisodeDataset(items, ["liver"], k_shot=1, q_query=1, num_episodes=1)) == 1


# ---------------------------------------------------------------------------------------- unknown config keys
@pytest.mark.parametrize("bundle", [CLS_BUNDLE, SEG_BUNDLE], ids=["classification", "segmentation"])
def test_unknown_override_names_the_key_and_the_closest_ones(bundle):
    files = str([str(bundle / "configs" / c) for c in ("train.json", "inference.json")])
    argv = ["/x/monai/bundle/__main__.py", "run", "--config_file", files]
    ok = ["--task_file", "t.json", "--output_dir", "o", "--learner_name", "atlas", "--bundle_root", ".",
          "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf", "--epochs", "2"]
    cls_app.check_cli_overrides(argv + ok)  # MONAI's own arguments and config ids
    with pytest.raises(ConfigError, match=r"^unknown config key --no_such_key \(not in \[") as info:
        cls_app.check_cli_overrides(argv + ok + ["--no_such_key", "3"])
    assert "did you mean" not in str(info.value)  # nothing close to it
    with pytest.raises(ConfigError, match=r"unknown config key --output_dri .*did you mean --output_dir\?"):
        cls_app.check_cli_overrides(argv + ["--output_dri=o"])
    with pytest.raises(ConfigError, match=r"unknown config key --task_files .*did you mean --task_file"):
        cls_app.check_cli_overrides(argv + ["--task_files", "t.json"])


def test_nested_override_must_name_an_existing_path():
    files = str(CLS_BUNDLE / "configs" / "train.json")
    argv = ["/x/monai/bundle/__main__.py", "run", "--config_file", files]
    cls_app.check_cli_overrides(argv + ["--train#trainer#max_epochs", "2", "--dataset#data", "[]"])
    with pytest.raises(ConfigError, match=r"unknown config key --trian#trainer#max_epochs"):
        cls_app.check_cli_overrides(argv + ["--trian#trainer#max_epochs", "2"])


# ------------------------------------------------------------------------------------------ output names
@pytest.mark.parametrize("query_id", ["../../evil", "/tmp/evil", "..", "sub/evil", ""])
def test_segmentation_query_id_that_would_leave_output_dir(query_id, files, seg_learner, tmp_path):
    task = write_task(tmp_path / "task.json", seg_task(files, query=[{"image": files.ct, "id": "fine"},
                                                                     {"image": files.ct, "id": query_id}]))
    with pytest.raises(TaskFileError, match=rf"query\[1\] id {query_id!r} is not a plain file name"):
        segment(seg_learner, task, tmp_path / "a" / "b" / "out")
    assert not (tmp_path / "a").exists()
    assert not list(tmp_path.rglob("*evil*")) and not Path("/tmp/evil_seg.nii.gz").exists()


def test_output_names_from_image_names_and_ids_stay_in_output_dir(files, cls_learner, seg_learner, tmp_path):
    """An image reached through ``..`` is named by its file name; an id names its mask; both inside output_dir."""
    (tmp_path / "up").mkdir()
    shutil.copyfile(files.ct, tmp_path / "up" / "evil.nii.gz")
    (tmp_path / "tasks").mkdir()
    task = seg_task(files, query=[{"image": "../up/evil.nii.gz"}, {"image": files.ct, "id": "case_7"}])
    out = tmp_path / "tasks" / "out"
    result = segment(seg_learner, write_task(tmp_path / "tasks" / "task.json", task), out)
    assert sorted(p.name for p in out.iterdir()) == ["case_7_seg.nii.gz", "evil_seg.nii.gz", "segmentations.json"]
    assert [s.get("id") for s in result["segmentations"]] == [None, "case_7"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.nii.gz")) == [
        "tasks/out/case_7_seg.nii.gz", "tasks/out/evil_seg.nii.gz", "up/evil.nii.gz"]
    # classification: ids are only echoed in predictions.json, whatever they hold
    ctask = cls_task(files, query=[cls_item(files, id="../../evil"), cls_item(files, id="/tmp/evil")])
    result = predict(cls_learner, write_task(tmp_path / "c.json", ctask), tmp_path / "c")
    assert [p["id"] for p in result["predictions"]] == ["../../evil", "/tmp/evil"]
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["predictions.json"]


# ---------------------------------------------------------------------------------------- the command lines
def bundle_cli(bundle: Path, configs: list[str], *args: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file [...] ...`` in the bundle folder."""
    files = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 1, no traceback, exactly one ``monai-metalearn: error:`` line (the last of stderr) holding every
    fragment; returns the line."""
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    lines = [line for line in log.splitlines() if line.startswith(PREFIX)]
    assert len(lines) == 1, lines
    assert proc.stderr.strip().splitlines()[-1] == lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# the classification network of the CLI runs: small, random weights (only the error paths are run)
CLS_NET = ["--features", "[8,16,16,16]", "--learner_name", "protonet", "--pixdim", "[3.0,3.0,3.0]",
           "--progress", "False"]


@pytest.fixture(scope="module")
def cls_checkpoint(tmp_path_factory) -> Path:
    """The bundle's own learner for ``CLS_NET``, built from its configs in-process and saved as ``train.json``
    saves it: inference.json loads it before it reads the task."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CLS_BUNDLE / "configs" / c) for c in ("train.json", "inference.json")])
    parser.update({"features": [8, 16, 16, 16], "learner_name": "protonet", "pixdim": [3.0, 3.0, 3.0],
                   "device": "cpu"})
    path = tmp_path_factory.mktemp("cls_ckpt") / "model.pt"
    torch.save({"learner": parser.get_parsed_content("learner").state_dict()}, path)
    return path


def cls_inference(task: Path, out: Path, ckpt: Path, *args: str) -> subprocess.CompletedProcess:
    return bundle_cli(CLS_BUNDLE, ["train.json", "inference.json"], *CLS_NET, "--task_file", str(task),
                      "--output_dir", str(out), "--ckpt_path", str(ckpt), *args)


# atlas segmentation needs no checkpoint; a short registration schedule keeps each run to seconds
ATLAS = ["--learner_name", "atlas", "--learner_args", "{'registration': {'spacing': 6.0, 'iterations': [40, 20, 0]}}"]


def seg_inference(task: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return bundle_cli(SEG_BUNDLE, ["train.json", "inference.json"], *ATLAS, "--task_file", str(task),
                      "--output_dir", str(out), "--ckpt_path", str(out.parent / "none.pt"), *args)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated_file", "mask_of_another_shape", "nan_in_image", "task_without_query"])
def test_classification_cli(case, files, cls_checkpoint, tmp_path):
    build, _, _, fragments, _ = CASES[case]
    task = write_task(tmp_path / "task.json", build(files))
    proc = cls_inference(task, tmp_path / "out", cls_checkpoint)
    record("classification CLI", case, one_line_error(proc, *fragments(files)))
    assert nothing_written(tmp_path / "out")


@pytest.mark.slow
def test_classification_cli_unknown_key(files, cls_checkpoint, tmp_path):
    task = write_task(tmp_path / "task.json", cls_task(files))
    line = one_line_error(cls_inference(task, tmp_path / "out", cls_checkpoint, "--no_such_key", "3"))
    assert line == (PREFIX + "unknown config key --no_such_key (not in ['configs/train.json','configs/inference."
                    "json'])")
    assert nothing_written(tmp_path / "out")


@pytest.mark.slow
def test_classification_cli_too_few_examples_and_too_many_ways(data_dir, tmp_path):
    """train.json with 2 views per rib of one CT: 2 examples per class, 6 classes."""
    small = [*CLS_NET, "--sources", "['totalseg_ct1']", "--n_views", "2", "--q_query", "1",
             "--train_classes", "['rib_left_7','rib_left_8','rib_left_9','rib_right_7','rib_right_8','rib_right_9']",
             "--val_classes", "['kidney_left']", "--test_classes", "['liver','spleen']",
             "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]
    one_line_error(bundle_cli(CLS_BUNDLE, ["train.json"], *small, "--k_shot", "2"),
                   "6 class(es) have fewer than k_shot + q_query = 3 examples: 'rib_left_7' (2), 'rib_left_8' (2)")
    one_line_error(bundle_cli(CLS_BUNDLE, ["train.json"], *small, "--n_way", "9"),
                   "n_way=9 but only 6 classes are available: ['rib_left_7', 'rib_left_8'")
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated_file", "unreadable_dicom_folder", "all_zero_mask", "task_not_json"])
def test_segmentation_cli(case, files, tmp_path):
    """The truncated file and the DICOM folder are the second query: the first one's mask is not written either."""
    _, build, _, _, fragments = CASES[case]
    task = write_task(tmp_path / "task.json", build(files))
    record("segmentation CLI", case, one_line_error(seg_inference(task, tmp_path / "out"), *fragments(files)))
    assert nothing_written(tmp_path / "out")


@pytest.mark.slow
def test_segmentation_cli_query_id_that_would_leave_output_dir(files, tmp_path):
    task = write_task(tmp_path / "task.json", seg_task(files, query=[{"image": files.ct, "id": "../../evil"}]))
    line = one_line_error(seg_inference(task, tmp_path / "a" / "out"))
    assert line == PREFIX + ("task_file query[0] id '../../evil' is not a plain file name (no folders, not '.' or "
                             "'..'): it names the query's mask <id>_seg.nii.gz inside output_dir")
    assert not (tmp_path / "a").exists() and not list(tmp_path.rglob("*evil*"))
