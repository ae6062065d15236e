"""Few-shot 3D structure classification on the real scans: the glue used by the bundle, the demo and the notebook.

The functions here are referenced from ``bundles/fewshot_classification_3d/configs/*.json``; each one does one
step a MONAI user would otherwise write by hand (build the structure patches of several sources, check that the
data dir / checkpoint / task file make sense and say so in one line when they don't, write ``metrics.json`` and
``predictions.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

__all__ = [
    "fail",
    "check_data_dir",
    "check_checkpoint",
    "check_class_splits",
    "load_structure_patches",
    "GlobalLabels",
    "write_metrics",
    "load_task_file",
    "inference_transforms",
    "predict_task",
]


def fail(message: str) -> NoReturn:
    """Stops a bundle run with a one-line message (``SystemExit``: no traceback, exit status 1)."""
    raise SystemExit(f"monai-metalearn: error: {message}")


def check_data_dir(path: str | os.PathLike | None) -> str:
    """``path`` as a string if it is a folder, else a one-line error naming it and ``MONAI_DATA_DIRECTORY``."""
    if path is None or str(path) in ("", "None"):
        fail("no data_dir: set MONAI_DATA_DIRECTORY or pass --data_dir /path/to/data")
    if not Path(path).is_dir():
        fail(f"data_dir {str(path)!r} is not a folder: set MONAI_DATA_DIRECTORY or pass --data_dir /path/to/data")
    return str(path)


def check_checkpoint(path: str | os.PathLike) -> str:
    """``path`` if the checkpoint file exists, else a one-line error (train first, or pass --ckpt_path)."""
    if not Path(path).is_file():
        fail(f"checkpoint {str(path)!r} not found: run train.json first or pass --ckpt_path /path/to/model.pt")
    return str(path)


def check_class_splits(**splits: Sequence[str]) -> dict[str, list[str]]:
    """Checks that the named class lists are non-empty and disjoint; returns them."""
    from monai_metalearn.data import check_disjoint_splits

    for name, classes in splits.items():
        if not classes:
            fail(f"class split {name!r} is empty")
    try:
        check_disjoint_splits(splits)
    except ValueError as err:
        fail(str(err))
    return {k: list(v) for k, v in splits.items()}


def load_structure_patches(
    data_dir: str,
    sources: Sequence[str],
    structures: Sequence[str],
    pixdim: Sequence[float] | None = (2.0, 2.0, 2.0),
    n_views: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Structure patches (:func:`~monai_metalearn.data.build_structure_patches`) of several real sources.

    Args:
        data_dir: the folder holding the sources (``MONAI_DATA_DIRECTORY``).
        sources: names of :data:`monai_metalearn.data.SOURCES`.
        structures: every class the run will use (all splits).
        pixdim: common spacing in mm.
        n_views: random views per (subject, structure).
        progress: progress bar.

    Exits with a one-line error for an unknown source, a missing data dir or a structure no source has.
    """
    from monai_metalearn.data import SOURCES, build_structure_patches, load_datalist

    check_data_dir(data_dir)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        fail(f"unknown sources {unknown}; known: {sorted(SOURCES)}")
    datalist = [item for name in sources for item in load_datalist(name, data_dir)]
    try:
        return build_structure_patches(datalist, structures, pixdim=pixdim, n_views=n_views, progress=progress)
    except ValueError as err:
        fail(str(err))


class GlobalLabels:
    """``prepare_episode`` for the fine-tuning baseline's pre-training: episode labels -> global class ids.

    The baseline trains an ordinary classifier over all meta-train classes; fed with episodes, it needs each
    example's class id in ``classes`` rather than its episode-local label.
    """

    def __init__(self, classes: Sequence[str]) -> None:
        self.index = {c: i for i, c in enumerate(classes)}

    def __call__(self, episode: Mapping[str, Any], device: torch.device, non_blocking: bool = False, **kwargs):
        from monai_metalearn.engines import default_prepare_episode

        sx, sy, qx, qy = default_prepare_episode(episode, device, non_blocking, **kwargs)
        lut = torch.tensor([self.index[c] for c in episode["classes"]], device=sy.device)
        return sx, lut[sy], qx, lut[qy]


def write_metrics(path: str, evaluators: Mapping[Any, Any], **extra: Any) -> dict[str, Any]:
    """Writes ``metrics.json``: one entry per shot setting under ``by_shot``, and the largest one's figures at the
    top level (``accuracy`` / ``dice`` with mean, ci95, n_episodes; ``per_class`` / ``per_structure``).

    Args:
        path: output file.
        evaluators: k_shot -> a :class:`~monai_metalearn.engines.MetaEvaluator` that has run.
        extra: more top-level fields (``n_way``, ``q_query``, ``learner``, ``test_subjects`` ...).
    """
    by_shot = {str(k): dict(ev.state.summary) for k, ev in sorted(evaluators.items(), key=lambda t: int(t[0]))}
    top = max(evaluators, key=int)
    out = {**by_shot[str(top)], "k_shot": int(top), **extra, "by_shot": by_shot}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2))
    return out


# ---------------------------------------------------------------------------------------------------- inference
def load_task_file(path: str | os.PathLike, data_dir: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Reads and checks a few-shot task file.

    Format::

        {"support": [{"image": "a.nii.gz", "label": "lesion"}, ...],
         "query": [{"image": "q.nii.gz"}, ...]}

    ``image`` is a NIfTI/NRRD file or a DICOM series folder; relative paths are taken from the task file's folder
    (or ``data_dir``). An item may also give ``mask`` (a label map) and ``mask_label`` (its id of the structure,
    default: any non-zero voxel): the image is then cropped around that structure, as in training.

    Exits with a one-line error for: a missing/unreadable file, no support, fewer than 2 classes, a support item
    without ``label``, a missing image.
    """
    path = Path(path)
    if not path.is_file():
        fail(f"task_file {str(path)!r} not found")
    try:
        task = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        fail(f"task_file {str(path)!r} is not valid JSON: {err}")
    if not isinstance(task, dict) or not task.get("support"):
        fail(f"task_file {str(path)!r} has no support examples (expected {{'support': [...], 'query': [...]}})")
    if not task.get("query"):
        fail(f"task_file {str(path)!r} has no query images")
    bases = [path.parent] + ([Path(data_dir)] if data_dir else [])

    def resolve(p: str, where: str) -> str:
        for base in bases:
            cand = Path(p) if Path(p).is_absolute() else base / p
            if cand.exists():
                return str(cand)
        fail(f"{where}: file {p!r} not found (relative to {', '.join(str(b) for b in bases)})")

    for part in ("support", "query"):
        for i, item in enumerate(task[part]):
            if not isinstance(item, dict) or "image" not in item:
                fail(f"task_file {part}[{i}] has no 'image'")
            if part == "support" and "label" not in item:
                fail(f"task_file support[{i}] ({item['image']}) has no 'label'")
            item["image"] = resolve(item["image"], f"{part}[{i}]")
            if "mask" in item:
                item["mask"] = resolve(item["mask"], f"{part}[{i}] mask")
    labels = sorted({str(it["label"]) for it in task["support"]})
    if len(labels) < 2:
        fail(f"task_file support has {len(labels)} class ({labels}): a few-shot task needs at least 2 classes")
    return task


def inference_transforms(spatial_size: Sequence[int] = (32, 32, 32), pixdim: Sequence[float] | None = None):
    """Loading + patch pipeline for task-file images: checked loading, RAS, optional spacing, crop around the
    ``mask`` structure when given (else the whole image), resize to ``spatial_size``, z-score."""
    from monai.transforms import Compose, EnsureTyped, NormalizeIntensityd, Orientationd, Resized, Spacingd

    from monai_metalearn.data import LoadScand

    steps = [
        LoadScand(keys=["image", "mask"], allow_missing_keys=True),
        Orientationd(keys=["image", "mask"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")),
                     allow_missing_keys=True),
    ]
    if pixdim is not None:
        steps.append(Spacingd(keys=["image", "mask"], pixdim=pixdim, mode=["bilinear", "nearest"],
                              allow_missing_keys=True))
    steps += [
        _MaskCrop(spatial_size),
        Resized(keys="image", spatial_size=tuple(spatial_size)),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        NormalizeIntensityd(keys="image"),
    ]
    return Compose(steps)


class _MaskCrop:
    """Crops ``image`` around ``mask`` (id ``mask_label`` or any non-zero voxel) when the item has a mask."""

    def __init__(self, spatial_size: Sequence[int], margin: float = 0.1) -> None:
        self.spatial_size, self.margin = tuple(spatial_size), margin

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        from monai_metalearn.transforms import CropStructure

        d = dict(data)
        if d.get("mask") is None:
            return d
        mask = d["mask"]
        structure = d.get("mask_label")
        if structure is None:
            mask = (mask > 0).to(torch.uint8)
            structure = 1
        try:
            d["image"], _ = CropStructure(structure=int(structure), margin=self.margin)(d["image"], mask)
        except ValueError as err:
            fail(str(err))
        return d


def predict_task(
    learner: torch.nn.Module,
    task_file: str,
    output_dir: str,
    spatial_size: Sequence[int] = (32, 32, 32),
    pixdim: Sequence[float] | None = (2.0, 2.0, 2.0),
    device: str | torch.device = "cpu",
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Adapts ``learner`` to the task file's support set and writes ``output_dir/predictions.json``.

    Returns:
        ``{"classes": [...], "predictions": [{"image", "label", "probabilities": {class: p}}, ...]}``.
    """
    from monai_metalearn.data import ScanLoadError

    task = load_task_file(task_file, data_dir)
    transform = inference_transforms(spatial_size, pixdim)
    classes = sorted({str(it["label"]) for it in task["support"]})

    def load(items: list[dict[str, Any]], part: str) -> torch.Tensor:
        out = []
        for i, item in enumerate(items):
            try:
                out.append(transform({k: v for k, v in item.items() if k in ("image", "mask", "mask_label")})["image"])
            except (ScanLoadError, RuntimeError, OSError) as err:
                fail(f"{part}[{i}] {item['image']}: {str(err).splitlines()[0]}")
        return torch.stack([torch.as_tensor(x) for x in out]).to(device)

    sx, qx = load(task["support"], "support"), load(task["query"], "query")
    sy = torch.tensor([classes.index(str(it["label"])) for it in task["support"]], device=device)
    learner = learner.to(device).eval()
    with torch.enable_grad():
        predictor = learner.adapt(sx, sy)
    with torch.no_grad():
        probs = torch.softmax(predictor(qx).float(), dim=1).cpu()
    preds = [
        {
            "image": item["image"],
            "label": classes[int(p.argmax())],
            "probabilities": {c: round(float(v), 6) for c, v in zip(classes, p)},
        }
        for item, p in zip(task["query"], probs)
    ]
    result = {"classes": classes, "k_shot": {c: sum(str(it["label"]) == c for it in task["support"]) for c in classes},
              "predictions": preds}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "predictions.json").write_text(json.dumps(result, indent=2))
    return result
