"""Both bundles in the MONAI model-zoo layout: ``network_def`` as a config object that command-line overrides
reach, checkpoints under ``models/``, ``ckpt_export`` of the meta-learned network (the TorchScript computes what
the PyTorch network computes on a real patch), the pipeline of ``inference.json`` as config lists the app uses
(the defaults give the results of the built-in pipeline), and the docs' ``verify_metadata`` / ``ckpt_export``
commands run as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CLS = ROOT / "bundles" / "fewshot_classification_3d"
SEG = ROOT / "bundles" / "fewshot_segmentation_3d"
SCHEMA = "meta_schema_20240725.json"

pytestmark = pytest.mark.xdist_group("bundle")


def parser_for(bundle: Path, files=("train.json",), **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f) for f in files])
    parser["bundle_root"] = str(bundle)
    for key, value in overrides.items():
        parser[key.replace("__", "#")] = value
    return parser


def perturbed(learner: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The learner with every floating-point parameter moved away from its initialisation (a stand-in for
    trained weights: an export that ignored the checkpoint would give the initial network's output)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return learner


def cls_patch(data_dir: Path) -> torch.Tensor:
    """The liver of the real TotalSegmentator CT-1 as the bundle's 32^3 patch at 2 mm, ``[1, 1, 32, 32, 32]``."""
    from monai_metalearn.apps.classification import inference_transforms

    ts = data_dir / "totalsegmentator"
    item = {"image": str(ts / "example_ct.nii.gz"), "roi": str(ts / "example_seg_fast_force_split.nii.gz"),
            "structure": 5}
    return inference_transforms((32, 32, 32), (2.0, 2.0, 2.0))(item)["image"][None]


def seg_patch(data_dir: Path) -> torch.Tensor:
    """A 32^3 patch of real BTCV CT 0 around its liver, read and scaled as the bundle reads scans (3 mm)."""
    from monai_metalearn.apps.segmentation import item_intensity
    from monai_metalearn.data import load_datalist, scan_reader
    from monai_metalearn.transforms import scale_intensity

    ct0 = load_datalist("btcv_sabs", str(data_dir))[0]
    d = scan_reader(["image", "label"], (3.0, 3.0, 3.0))({"image": ct0["image"], "label": ct0["label"]})
    image = scale_intensity(d["image"].as_tensor(), item_intensity({"modality": "CT"}, d["image"]))
    liver = torch.nonzero(d["label"][0].round() == ct0["structures"]["liver"], as_tuple=True)
    c = [int(v.float().mean()) for v in liver]
    lo = [max(0, min(ci - 16, s - 32)) for ci, s in zip(c, image.shape[1:])]
    patch = image[:, lo[0]:lo[0] + 32, lo[1]:lo[1] + 32, lo[2]:lo[2] + 32]
    assert patch.shape == (1, 32, 32, 32) and float(patch.std()) > 0.01
    return patch[None].float()


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------------------------------------- network_def
def test_network_def_is_the_learners_network_and_overrides_reach_it(data_dir):
    from monai_metalearn.networks import ConvEncoder3D

    cfg = json.loads((CLS / "configs" / "train.json").read_text())
    assert cfg["network_def"]["_target_"] == "monai_metalearn.networks.ConvEncoder3D"
    parser = parser_for(CLS)
    learner = parser.get_parsed_content("learner")
    assert learner.encoder is parser.get_parsed_content("network_def") is parser.get_parsed_content("network")
    x = cls_patch(data_dir)
    assert learner.encoder(x).shape == (1, 64 * 8)  # features[-1] x pooled 2^3

    small = parser_for(CLS, network_def__features=[8, 16]).get_parsed_content("learner")
    assert isinstance(small.encoder, ConvEncoder3D) and small.encoder(x).shape == (1, 16 * 8)
    assert parser_for(CLS, features=[8, 12]).get_parsed_content("learner").encoder(x).shape == (1, 12 * 8)
    # the override files that set the encoder's arguments still reach the network (diagnosis: 2 channels)
    diag = parser_for(CLS, ("train.json", "diagnosis.json")).get_parsed_content("network_def")
    assert diag(torch.zeros(1, 2, 16, 16, 16)).shape[0] == 1
    with pytest.raises(RuntimeError):
        diag(torch.zeros(1, 1, 16, 16, 16))

    seg = parser_for(SEG, network_def__channels=[8, 16], network_def__strides=[2], network_def__feature_channels=4)
    seg_learner = seg.get_parsed_content("learner")
    assert seg_learner.encoder is seg.get_parsed_content("network_def")
    assert seg_learner.encoder(seg_patch(data_dir)).shape == (1, 4, 32, 32, 32)
    batch = parser_for(SEG, backbone__norm="batch").get_parsed_content("network_def")
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in batch.modules())


def test_checkpoints_default_to_models_and_are_ignored_by_git():
    for bundle in (CLS, SEG):
        parser = parser_for(bundle)
        assert Path(parser.get_parsed_content("ckpt_path")) == bundle / "models" / "model.pt"
        assert Path(parser.get_parsed_content("output_dir")) == bundle / "outputs"
        for name in ("model.pt", "model.ts", "model_best_val.pt"):
            proc = subprocess.run(["git", "check-ignore", "-q", str(bundle / "models" / name)], cwd=ROOT)
            assert proc.returncode == 0, f"{bundle.name}/models/{name} is not ignored by .gitignore"
        large = (bundle / "large_files.yml").read_text()
        assert re.search(r'^\s*- path: "models/model.pt"$', large, flags=re.MULTILINE) and "url:" not in large


# ----------------------------------------------------------------------------------------------- ckpt_export
def exported_matches(ts_path: Path, network: torch.nn.Module, fresh: torch.nn.Module, x: torch.Tensor) -> None:
    from monai.data import load_net_with_metadata

    ts, meta, extra = load_net_with_metadata(str(ts_path), more_extra_files=("train.json",))
    assert meta["version"] and meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32, 32]
    assert "network_def" in json.loads(extra["train.json"])
    with torch.no_grad():
        expected, got = network.eval()(x), ts.eval()(x)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), float((got - expected).abs().max())
        assert not torch.allclose(fresh.eval()(x), got, atol=1e-3)  # the checkpoint's weights, not the init


def test_ckpt_export_with_a_network_def_override_from_the_command_line(data_dir, tmp_path):
    """``--network_def#features "[8,16]"`` on the ckpt_export command line builds the small network (a strict
    load of the small checkpoint fails otherwise); the TorchScript equals the loaded encoder on the real liver."""
    parser = parser_for(CLS, network_def__features=[8, 16])
    learner = perturbed(parser.get_parsed_content("learner"), seed=1)
    torch.save(learner.state_dict(), tmp_path / "model.pt")  # what train.json's final checkpoint holds
    run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_export", "--filepath",
         str(tmp_path / "model.ts"), "--ckpt_file", str(tmp_path / "model.pt"), "--meta_file",
         "configs/metadata.json", "--config_file", "configs/train.json", "--network_def#features", "[8,16]"], CLS)
    fresh = parser_for(CLS, network_def__features=[8, 16]).get_parsed_content("network_def")
    exported_matches(tmp_path / "model.ts", learner.encoder, fresh, cls_patch(data_dir))


def test_learner_network_loads_only_its_learners_checkpoint(tmp_path):
    from monai_metalearn.apps.classification import LearnerNetwork
    from monai_metalearn.errors import CheckpointError, ConfigError

    parser = parser_for(CLS, network_def__features=[8, 16])
    export = parser.get_parsed_content("network_export")
    other = parser_for(CLS, network_def__features=[8, 12]).get_parsed_content("learner")
    with pytest.raises(CheckpointError, match="does not fit learner ProtoNet"):
        export.load_state_dict(other.state_dict())
    trained = perturbed(parser_for(CLS, network_def__features=[8, 16]).get_parsed_content("learner"), seed=2)
    export.load_state_dict({"learner": trained.state_dict()})
    for a, b in zip(export.network.parameters(), trained.encoder.parameters()):
        assert torch.equal(a, b)
    assert sorted(export.state_dict()) == sorted("network." + k for k in trained.encoder.state_dict())
    with pytest.raises(ConfigError, match="is not part of the learner"):
        LearnerNetwork(trained, other.encoder)


# ------------------------------------------------------------------------------------------- docs' commands
def doc_commands(bundle: Path, tool: str) -> list[list[str]]:
    text = (bundle / "docs" / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    cmds = [shlex.split(line) for b in blocks for line in b.splitlines() if f"monai.bundle {tool}" in line]
    assert len(cmds) == 1, f"{bundle.name}/docs/README.md: {len(cmds)} 'monai.bundle {tool}' commands"
    return cmds


@pytest.mark.parametrize("bundle", [CLS, SEG], ids=lambda b: b.name)
def test_docs_verify_metadata_and_ckpt_export_commands_run(bundle, data_dir, tmp_path):
    """The README's two commands, verbatim, in a copy of the bundle whose models/model.pt is a checkpoint of the
    default learner (the schema placed where the command would download it: the tests run offline)."""
    work = tmp_path / bundle.name
    shutil.copytree(bundle / "configs", work / "configs")
    (work / "models").mkdir()
    (work / "outputs").mkdir()
    shutil.copy(Path(data_dir).resolve().parent / "monai" / SCHEMA, work / "outputs" / SCHEMA)
    parser = parser_for(work)
    learner = perturbed(parser.get_parsed_content("learner"), seed=3)
    torch.save(learner.state_dict(), work / "models" / "model.pt")

    (verify,) = doc_commands(bundle, "verify_metadata")
    assert verify[0] == "python" and f"outputs/{SCHEMA}" in verify
    run([sys.executable, *verify[1:]], work)
    (export,) = doc_commands(bundle, "ckpt_export")
    assert export[0] == "python" and "models/model.ts" in export and "models/model.pt" in export
    run([sys.executable, *export[1:]], work)

    fresh = parser_for(work).get_parsed_content("network_def")
    x = cls_patch(data_dir) if bundle == CLS else seg_patch(data_dir)
    network = parser.get_parsed_content("network" if bundle == CLS else "network_def")
    assert any(m is network for m in learner.modules())
    exported_matches(work / "models" / "model.ts", network, fresh, x)


# ------------------------------------------------------------------------------ inference.json's pipeline
def test_classification_inference_pipeline_from_the_config_gives_the_default_predictions(data_dir, tmp_path):
    from monai.transforms import Compose

    from monai_metalearn.apps.classification import predict_task

    ts = data_dir / "totalsegmentator"
    labels = {"liver": 5, "spleen": 1, "stomach": 6}
    task = tmp_path / "task.json"  # support from the NIfTI CT-1, queries from the DICOM series of CT-2
    task.write_text(json.dumps({
        "support": [{"image": str(ts / "example_ct.nii.gz"), "mask": str(ts / "example_seg_fast_force_split.nii.gz"),
                     "mask_label": i, "label": name} for name, i in labels.items()],
        "query": [{"image": str(ts / "example_ct_dicom"), "mask": str(ts / "example_seg_dicom.nii.gz"),
                   "mask_label": i} for i in labels.values()]}))
    parser = parser_for(CLS, ("train.json", "inference.json"), network_def__features=[8, 16], pixdim=[3.0, 3.0, 3.0])
    learner = perturbed(parser.get_parsed_content("learner"), seed=4)
    pre, post = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("postprocessing")
    assert [len(stage.transforms) for stage in pre.transforms] == [3, 5]  # body-coordinate steps are disabled
    args = (learner, str(task))
    kw = dict(spatial_size=(32, 32, 32), pixdim=(3.0, 3.0, 3.0))
    default = predict_task(*args, str(tmp_path / "a"), **kw)
    configured = predict_task(*args, str(tmp_path / "b"), **kw, preprocessing=pre, postprocessing=post)
    assert configured == default
    assert len({p["label"] for p in default["predictions"]}) >= 1 and len(default["predictions"]) == 3
    # a flat Compose is applied to each item whole: the same patches
    flat = Compose([t for stage in pre.transforms for t in stage.transforms])
    assert predict_task(*args, str(tmp_path / "c"), **kw, preprocessing=flat) == default
    # the config's steps are the ones used: a sigmoid instead of the softmax changes the probabilities
    sig = parser_for(CLS, ("train.json", "inference.json"), postprocessing={"_target_": "Activations",
                                                                             "sigmoid": True})
    other = predict_task(*args, str(tmp_path / "d"), **kw, postprocessing=sig.get_parsed_content("postprocessing"))
    sums = [sum(p["probabilities"].values()) for p in other["predictions"]]
    assert any(abs(s - 1) > 1e-3 for s in sums), sums

    body = parser_for(CLS, ("train.json", "inference.json"), body_coordinates=True)
    assert [len(stage.transforms) for stage in body.get_parsed_content("preprocessing").transforms] == [4, 6]


def test_segmentation_inference_pipeline_from_the_config_gives_the_default_masks(data_dir, tmp_path):
    import nibabel as nib

    from monai_metalearn.apps.segmentation import segment_task
    from monai_metalearn.data import load_datalist

    ct0, ct1 = load_datalist("btcv_sabs", str(data_dir))[:2]
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"support": [{"image": ct1["image"], "label": ct1["label"],
                                             "label_value": ct1["structures"]["liver"]}],
                                "query": [{"image": ct0["image"]}], "modality": "CT"}))
    small = dict(network_def__channels=[8, 16], network_def__strides=[2], network_def__feature_channels=8,
                 feature_channels=8)
    for keep in (True, False):
        parser = parser_for(SEG, ("train.json", "inference.json"), keep_largest_component=keep, **small)
        learner = perturbed(parser.get_parsed_content("learner"), seed=5)
        kw = dict(pixdim=(3.0, 3.0, 3.0), patch_size=(32, 32, 32), n_patches=4, keep_largest_component=keep)
        default = segment_task(learner, str(task), str(tmp_path / f"a{keep}"), **kw)
        configured = segment_task(learner, str(task), str(tmp_path / f"b{keep}"), **kw,
                                  preprocessing=parser.get_parsed_content("preprocessing"),
                                  inferer=parser.get_parsed_content("inferer"),
                                  postprocessing=parser.get_parsed_content("postprocessing"))
        a = np.asarray(nib.load(default["segmentations"][0]["mask"]).dataobj)
        b = np.asarray(nib.load(configured["segmentations"][0]["mask"]).dataobj)
        assert a.shape == nib.load(ct0["image"]).shape and 0 < a.sum() < a.size
        np.testing.assert_array_equal(a, b)
        assert [s["foreground_ml"] for s in configured["segmentations"]] == [
            s["foreground_ml"] for s in default["segmentations"]]
        assert len(parser.get_parsed_content("postprocessing").transforms) == (2 if keep else 1)
