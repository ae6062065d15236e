"""Few-shot 3D segmentation on the real scans: the glue used by the segmentation bundle, the benchmark and the
notebook.

The pipeline, one function per step a MONAI user would otherwise write by hand:

1. :func:`load_segmentation_subjects` reads every subject of the sources once (checked loading, RAS, a common
   spacing, intensities scaled to ``[0, 1]``: CT through an abdominal window, MRI through its 0.5-99.5 percentiles)
   and caches the result (``cache_dir``), so later runs do not re-read the scans;
2. :func:`subject_transforms` synthesizes an image for label-only subjects (the SynthSeg label maps; such images
   are SYNTHETIC and reported as such) before the episode picks its structure;
3. :func:`patch_transforms` cuts training / support patches around the structure and its background
   (``RandCropByPosNegLabeld``); query volumes stay whole and are segmented with a ``SlidingWindowInferer``;
4. :func:`evaluate_segmentation` runs fixed evaluation episodes for each protocol (e.g. CT-1 -> CT-2 and back,
   SynthSeg label maps -> the real T1) and writes ``metrics.json`` (Dice with 95% CIs, per structure, per
   support -> query direction);
5. :func:`segment_task` adapts to a user's task file and writes one mask per query on the query's own grid.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable

from monai_metalearn.transforms.intensity import CT_WINDOW, scale_intensity

from monai_metalearn.apps.classification import (
    LearnerNetwork,
    _patch_key,
    cached,
    check_cli_overrides,
    check_data_dir,
    check_checkpoint,
    check_class_splits,
    fail,
    read_task_file,
)
from monai_metalearn.errors import ConfigError, DataError, TaskFileError

__all__ = [
    "CT_WINDOW",
    "scale_intensity",
    "guess_modality",
    "item_intensity",
    "volume_prepare_episode",
    "SynthesizeMissingImaged",
    "check_cli_overrides",
    "check_checkpoint",
    "check_class_splits",
    "fail",
    "load_learner",
    "LearnerNetwork",
    "load_segmentation_subjects",
    "fold_train_subjects",
    "segmentation_protocols",
    "check_trainable",
    "subject_transforms",
    "patch_transforms",
    "volume_transforms",
    "build_segmentation_learner",
    "prepare_segmentation_episode_for",
    "sliding_window_inferer",
    "ContentGuardInferer",
    "evaluate_segmentation",
    "load_segmentation_task",
    "segment_task",
    "merge_fold_metrics",
]

logger = logging.getLogger("monai_metalearn")


def _reason(err: BaseException) -> str:
    """First line of the error that caused ``err``: MONAI's ``Compose`` wraps a transform's error in
    ``RuntimeError("applying transform <...>")``, whose own message names no file and no reason."""
    while str(err).startswith("applying transform") and err.__cause__ is not None:
        err = err.__cause__
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def guess_modality(image: torch.Tensor) -> str:
    """``"CT"`` when the image holds Hounsfield-like air (minimum below -500), else ``"MR"``. Only a guess of the
    modality: intensity scaling follows :func:`~monai_metalearn.transforms.infer_intensity`, which never applies the
    HU window to a scan without Hounsfield air, whatever its modality."""
    return "CT" if float(image.min()) < -500 else "MR"


def item_intensity(item: Mapping[str, Any], image: torch.Tensor) -> str:
    """The intensity kind of a datalist or task item: its ``intensity`` if declared, else inferred from its
    ``modality`` and the image values (:func:`~monai_metalearn.transforms.infer_intensity`)."""
    from monai_metalearn.transforms import check_intensity_kind, infer_intensity

    kind = item.get("intensity")
    return check_intensity_kind(kind) if kind else infer_intensity(image, item.get("modality"))


class SynthesizeMissingImaged(Randomizable, MapTransform):
    """For a label-only subject (no ``image``), draws a SYNTHETIC image from its whole label map (SynthSeg recipe,
    :class:`~monai_metalearn.transforms.RandSynthesizeImaged`) and scales it to ``[0, 1]`` like an MRI; subjects
    with an image pass through. Runs before the episode selects its structure, so every label shapes the image."""

    def __init__(self, label_key: str = "label", image_key: str = "image") -> None:
        from monai_metalearn.transforms import RandSynthesizeImaged

        MapTransform.__init__(self, [label_key], allow_missing_keys=True)
        self.image_key = image_key
        self.synth = RandSynthesizeImaged(keys=label_key, image_key=image_key, only_if_missing=True)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.synth.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        pass

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if d.get(self.image_key) is not None:
            return d
        d = dict(self.synth(d))
        d[self.image_key] = scale_intensity(torch.as_tensor(d[self.image_key]), "MR")
        return d


# ------------------------------------------------------------------------------------------------- subjects
def load_segmentation_subjects(
    data_dir: str,
    sources: Sequence[str],
    structures: Sequence[str],
    pixdim: Sequence[float] | None = (3.0, 3.0, 3.0),
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    min_voxels: int = 8,
    source_pixdim: Mapping[str, Sequence[float]] | None = None,
    source_options: Mapping[str, Mapping[str, Any]] | None = None,
    subjects: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Whole subjects of several real sources, resampled and intensity-scaled once, for segmentation episodes.

    Intensities are scaled by each item's declared kind (``item["intensity"]``: the HU window for ``ct_hu`` only;
    windowed CT and MRI through their own percentiles, see :func:`~monai_metalearn.transforms.scale_intensity`).

    Args:
        data_dir: the folder holding the sources (``MONAI_DATA_DIRECTORY``).
        sources: names of :data:`monai_metalearn.data.SOURCES`.
        structures: every structure the run uses (all splits); each subject keeps those it has.
        pixdim: common spacing in mm (``None``: keep each scan's own).
        progress: progress bar over subjects.
        cache_dir: save the subjects there and read them back on later runs (key: sources' files, sizes, dates,
            structures and ``pixdim``).
        min_voxels: a structure with fewer voxels in a subject after resampling is dropped from that subject (and
            logged: e.g. an organ that only grazes CT-2's 20-slice slab).
        source_pixdim: spacing per source overriding ``pixdim`` (e.g. ``{"lpba40": [1.5, 1.5, 1.5]}``).
        source_options: keyword arguments of :func:`~monai_metalearn.data.load_datalist` per source (e.g.
            ``{"acdc": {"phases": ["ED"]}}``).
        subjects: keep only these subject ids (``None``: all).

    Returns:
        list of dicts: ``image`` (float ``[1, D, H, W]`` in ``[0, 1]``; absent for label-only subjects), ``label``
        (int16 ``[1, D, H, W]``), ``structures`` (name -> id, those kept), ``subject``, ``modality``, ``source``,
        ``synthetic``, ``dropped`` (structures dropped for having < ``min_voxels`` voxels).

    Exits with a one-line error for an unknown source, a missing data dir, an unreadable scan or a structure that no
    subject has.
    """
    from monai_metalearn.data import SOURCES, load_datalist

    check_data_dir(data_dir)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        fail(f"unknown sources {unknown}; known: {sorted(SOURCES)}", DataError)
    options = {k: dict(v) for k, v in (source_options or {}).items()}
    datalist = []
    for name in sources:
        try:
            datalist += load_datalist(name, data_dir, **options.get(name, {}))
        except (FileNotFoundError, ValueError, TypeError) as err:
            fail(f"source {name!r}: {err}", DataError)
    if subjects is not None:
        keep = {str(s) for s in subjects}
        datalist = [item for item in datalist if str(item.get("subject")) in keep]
    known = set().union(*(item.get("structures", {}) for item in datalist)) if datalist else set()
    missing = [s for s in structures if s not in known]
    if missing:
        fail(f"structures {missing} are in none of the sources {list(sources)}", DataError)
    spacing = {name: (list(source_pixdim[name]) if source_pixdim and name in source_pixdim else pixdim)
               for name in sources}
    cache_file = None
    if cache_dir is not None:
        key = _patch_key(datalist, structures, [pixdim, sorted((source_pixdim or {}).items())], 0)
        cache_file = Path(cache_dir) / f"subjects_{key}.pt"
    return cached(cache_file, lambda: _read_subjects(datalist, structures, spacing, progress, min_voxels))


def _read_subjects(datalist, structures, spacing, progress, min_voxels) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    from monai_metalearn.data import ScanLoadError, scan_reader
    from monai_metalearn.data.patches import reader_input

    wanted = set(structures)
    out = []
    for item in tqdm(datalist, desc="load subjects", disable=not progress, leave=False):
        present = {s: v for s, v in item.get("structures", {}).items() if s in wanted}
        if not present:
            continue
        keys = [k for k in ("image", "label") if item.get(k) is not None]
        pixdim = spacing.get(item.get("source"))
        try:
            loaded = scan_reader(keys, pixdim)(reader_input(item, keys))
        except (ScanLoadError, RuntimeError) as err:
            fail(f"subject {item.get('subject')!r}: {_reason(err)}", DataError)
        label = loaded["label"].as_tensor().round().to(torch.int16)
        kept, dropped = {}, []
        for s, sid in present.items():
            ids = list(sid) if isinstance(sid, (list, tuple)) else [sid]
            if int(torch.isin(label, torch.tensor(ids, dtype=label.dtype)).sum()) >= min_voxels:
                kept[s] = sid
            else:
                dropped.append(s)
        if dropped:
            logger.info(f"subject {item.get('subject')}: {dropped} have < {min_voxels} voxels at {pixdim} mm, dropped")
        entry = {
            "label": label,
            "structures": kept,
            "subject": str(item.get("subject")),
            "modality": item.get("modality"),
            "source": item.get("source"),
            "synthetic": bool(item.get("synthetic", False)),
            "dropped": dropped,
            "pixdim": None if pixdim is None else [float(p) for p in pixdim],
            **({"phase": item["phase"]} if item.get("phase") else {}),
        }
        if "image" in loaded:
            image = loaded["image"].as_tensor()
            entry["intensity"] = item_intensity(item, image)
            entry["image"] = scale_intensity(image, entry["intensity"])
        out.append(entry)
    return out


def fold_train_subjects(
    subjects: Sequence[Mapping[str, Any]],
    folds: Mapping[str, Sequence[Sequence[str]]],
    fold: int,
    train_sources: Sequence[str],
) -> list[str]:
    """The meta-training subjects of fold ``fold``: every loaded subject of ``train_sources`` that is not a test
    subject of that fold (:func:`~monai_metalearn.apps.protocols.fold_split`). One-line error for bad folds or a
    training source with no subject."""
    from monai_metalearn.apps.protocols import ProtocolError, fold_split

    by_source: dict[str, list[str]] = {str(src): [] for src in train_sources}
    for item in subjects:
        if str(item.get("source")) in by_source:
            by_source[str(item["source"])].append(str(item["subject"]))
    empty = [src for src, subs in by_source.items() if not subs]
    if empty:
        fail(f"train_sources {empty} have no loaded subject: add them to sources", ConfigError)
    try:
        return fold_split(folds, fold, by_source)["train"]
    except ProtocolError as err:
        fail(str(err), ConfigError)


def segmentation_protocols(protocol: Any, subjects: Sequence[Mapping[str, Any]], folds: Mapping[str, Any],
                           fold: int, episodes_per_query: int = 1, k_shot: int = 1) -> list[dict[str, Any]]:
    """:func:`monai_metalearn.apps.protocols.segmentation_protocols`, with a one-line error for a bad protocol."""
    from monai_metalearn.apps import protocols

    try:
        return protocols.segmentation_protocols(protocol, subjects, folds, fold, episodes_per_query, k_shot)
    except protocols.ProtocolError as err:
        fail(str(err), ConfigError)


def subject_transforms():
    """The subject-level transform of the base dataset: image synthesis for label-only subjects (see
    :class:`SynthesizeMissingImaged`); real subjects pass unchanged."""
    return SynthesizeMissingImaged()


class _PosNegPatchesd(Randomizable, MapTransform):
    """``RandCropByPosNegLabeld`` with a fixed split: ``n_pos`` patches centred on the structure, then ``n_neg`` on
    its background, so that a support set always holds structure voxels (a random pos/neg draw for every patch
    gives all-background supports, e.g. 1 in 16 with 4 patches, which stops prototype / fine-tuning adaptation).

    Patch centres are drawn from the voxels equal to 1 (structure) and equal to 0 (background): voxels marked
    ``IGNORE_LABEL`` (-1, e.g. held-out test organs in setting 2) centre no patch."""

    def __init__(self, patch_size: Sequence[int], n_pos: int, n_neg: int) -> None:
        from monai.transforms import RandCropByPosNegLabeld

        MapTransform.__init__(self, ["image", "label"])
        self.crops = [
            RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=tuple(patch_size),
                                   pos=p, neg=1 - p, num_samples=n, allow_smaller=True,
                                   fg_indices_key="_fg_indices", bg_indices_key="_bg_indices")
            for p, n in ((1, n_pos), (0, n_neg)) if n > 0
        ]

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        for crop in self.crops:
            crop.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        pass

    def __call__(self, data: Mapping) -> list[dict]:
        d = dict(data)
        flat = torch.as_tensor(d["label"]).reshape(-1)
        d["_fg_indices"] = torch.nonzero(flat > 0).reshape(-1)
        d["_bg_indices"] = torch.nonzero(flat == 0).reshape(-1)
        samples = [sample for crop in self.crops for sample in crop(d)]
        for sample in samples:
            sample.pop("_fg_indices", None)
            sample.pop("_bg_indices", None)
        return samples


def patch_transforms(
    patch_size: Sequence[int] = (32, 32, 32), num_samples: int = 4, pos: float = 1.0, neg: float = 1.0
):
    """Patches around a binary structure mask and its background (``RandCropByPosNegLabeld``), padded to
    ``patch_size`` when the scan is smaller (CT-2 is a 20-slice slab); ``num_samples`` patches per subject, of which
    ``round(num_samples * pos / (pos + neg))`` on the structure (at least one when ``pos > 0``, and at least one on
    the background when ``neg > 0`` and ``num_samples >= 2``)."""
    from monai.transforms import Compose, EnsureTyped, SpatialPadd

    n = int(num_samples)
    n_pos = max(round(n * pos / (pos + neg)), 1 if pos > 0 else 0)
    if neg > 0 and n >= 2:
        n_pos = min(n_pos, n - 1)
    return Compose([
        _PosNegPatchesd(patch_size, n_pos, n - n_pos),
        SpatialPadd(keys=["image", "label"], spatial_size=tuple(patch_size)),
        EnsureTyped(keys=["image", "label"], dtype=torch.float32, track_meta=False),
    ])


def volume_transforms():
    """Whole query volumes as plain float tensors (segmented by a sliding window)."""
    from monai.transforms import EnsureTyped

    return EnsureTyped(keys=["image", "label"], dtype=torch.float32, track_meta=False)


class ContentGuardInferer:
    """A sliding-window inferer whose windows without image content (constant intensity: air outside the body,
    padding) are labelled background without asking the network.

    Instance normalisation turns a constant window into an all-zero feature map, whose prediction is whatever the
    biases say: a model that never saw such windows in training (patches are cut around structures) can paint the
    air around a CT as foreground. A window with no intensity variation cannot show a structure.

    Args:
        inferer: the wrapped ``SlidingWindowInferer`` (or any ``inferer(x, network)``).
        min_std: windows whose intensity standard deviation is at most this are constant.
        background_logit: the margin given to channel 0 in guarded windows.
    """

    def __init__(self, inferer: Any, min_std: float = 1e-4, background_logit: float = 10.0) -> None:
        self.inferer, self.min_std, self.background_logit = inferer, float(min_std), float(background_logit)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        def guarded(windows: torch.Tensor) -> torch.Tensor:
            empty = windows.reshape(windows.shape[0], -1).float().std(dim=1) <= self.min_std
            if not bool(empty.any()):
                return network(windows)
            # the network runs on the windows with content only (one window when none has, for the output shape)
            content = network(windows[~empty] if not bool(empty.all()) else windows[:1])
            fill = torch.full_like(content[0], -self.background_logit)
            fill[0] = self.background_logit
            logits = fill.expand(windows.shape[0], *fill.shape).clone()
            if not bool(empty.all()):
                logits[~empty] = content
            return logits

        return self.inferer(inputs, guarded, *args, **kwargs)


def sliding_window_inferer(patch_size: Sequence[int] = (32, 32, 32), sw_batch_size: int = 4, overlap: float = 0.25,
                           guard_empty: bool = True):
    """``monai.inferers.SlidingWindowInferer`` over windows of the training patch size (Gaussian blending); with
    ``guard_empty``, windows without image content are background (:class:`ContentGuardInferer`)."""
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(roi_size=tuple(patch_size), sw_batch_size=int(sw_batch_size),
                                   overlap=float(overlap), mode="gaussian")
    return ContentGuardInferer(inferer) if guard_empty else inferer


def largest_component(pred: torch.Tensor) -> torch.Tensor:
    """Keeps the largest connected foreground component of each binary mask ``[B, 1, *S]`` (MONAI
    ``KeepLargestConnectedComponent``, full connectivity); an empty mask stays empty.

    One structure per episode is one connected organ or nucleus: the prototype and fine-tuned models adapted on a few
    patches scatter false positives over the rest of a whole volume, and this removes those not touching the largest
    blob."""
    from monai.transforms import KeepLargestConnectedComponent

    keep = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, connectivity=None)
    out = pred.clone()
    for i in range(pred.shape[0]):
        if bool(pred[i].any()):
            out[i] = torch.as_tensor(keep(pred[i].long().cpu())).to(pred.device, pred.dtype)
    return out


def mask_postprocess(keep_largest_component: bool):
    """The evaluator's ``mask_postprocess`` from the bundle flag: :func:`largest_component` or ``None``."""
    if not isinstance(keep_largest_component, bool):
        fail(f"keep_largest_component must be true or false, got {keep_largest_component!r}", ConfigError)
    return largest_component if keep_largest_component else None


# ------------------------------------------------------------------------------------------------- learners
def build_segmentation_learner(
    name: str,
    backbone: torch.nn.Module,
    feature_channels: int,
    train_structures: Sequence[str],
    defaults: Mapping[str, Mapping[str, Any]] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """:func:`~monai_metalearn.learners.create_segmentation_learner` with the bundle's per-learner defaults,
    overridden by ``overrides``; one-line error for an unknown learner or argument."""
    import inspect

    from monai_metalearn.learners import ANIL, FOMAML, MAML, Reptile
    from monai_metalearn.learners.factory import MEMORY_OPTIONS
    from monai_metalearn.learners.segmentation import (
        SEGMENTATION_LEARNERS,
        VOLUME_LEARNERS,
        PrototypeSegmenter,
        SegmentationFineTune,
        create_segmentation_learner,
        segmentation_learner_key,
    )

    key = segmentation_learner_key(name)
    if key is None:
        fail(f"unknown learner_name {name!r}; choose one of {sorted(SEGMENTATION_LEARNERS)}", ConfigError)
    kwargs = {**dict((defaults or {}).get(key, {})), **dict(overrides or {})}
    classes = {"maml": MAML, "fomaml": FOMAML, "anil": ANIL, "reptile": Reptile, "protoseg": PrototypeSegmenter,
               "finetune": SegmentationFineTune, "scratch": SegmentationFineTune, **VOLUME_LEARNERS}
    accepted: set[str] = set()
    for klass in classes[key].__mro__:  # a ``**kwargs`` __init__ passes its keywords on to the parent's
        params = inspect.signature(klass.__init__).parameters
        accepted |= {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()) or klass is torch.nn.Module:
            break
    accepted -= {"self", "model", "encoder", "feature_channels", "n_base_structures", "pretrained"}
    accepted |= set(MEMORY_OPTIONS)  # the factory's activation_checkpointing / channels_last
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        fail(f"learner {key!r} has no argument(s) {unknown}; it takes {sorted(accepted)}", ConfigError)
    try:
        return create_segmentation_learner(key, backbone, feature_channels,
                                           n_base_structures=len(train_structures), **kwargs)
    except (TypeError, ValueError) as err:
        fail(f"learner {key!r}: {err}", ConfigError)


def load_learner(learner: torch.nn.Module, ckpt_path: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Loads ``train.json``'s checkpoint into ``learner`` (see
    :func:`~monai_metalearn.apps.classification.load_learner`); learners with nothing to meta-train (``trainable =
    False``: the references, the registration-based atlases) need no checkpoint and are only moved to ``device``."""
    from monai_metalearn.apps.classification import load_learner as load_checkpoint

    if not getattr(learner, "trainable", True):
        return learner.to(device)
    return load_checkpoint(learner, ckpt_path, device)


def check_trainable(learner: torch.nn.Module, name: str) -> torch.nn.Module:
    """``learner`` if it has something to meta-train, else a one-line error: run evaluate.json / inference.json."""
    if not getattr(learner, "trainable", True):
        fail(f"learner {name!r} has nothing to meta-train: run configs/evaluate.json or configs/inference.json "
             "directly (no checkpoint needed)", ConfigError)
    return learner


def prepare_segmentation_episode_for(name: str, train_structures: Sequence[str]):
    """The trainer's ``prepare_episode``: masks carrying global structure ids for the pre-trained fine-tuning
    baseline, binary masks otherwise."""
    from monai_metalearn.engines import default_prepare_episode
    from monai_metalearn.learners import learner_key
    from monai_metalearn.learners.segmentation import SegmentationGlobalLabels

    return SegmentationGlobalLabels(train_structures) if learner_key(name) == "finetune" else default_prepare_episode


def volume_prepare_episode(episode: Mapping[str, Any], device: Any = None, non_blocking: bool = False, **kwargs):
    """``prepare_episode`` of whole-volume learners: support scans stay a list of ``[1, *S]`` volumes (K scans of
    different sizes), the query is stacked (one volume: ``[1, 1, *S]``)."""

    def plain(v: Any) -> torch.Tensor:
        v = v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(v)
        return v.to(device=device, non_blocking=non_blocking)

    sx = [plain(v) for v in episode["support_image"]]
    sy = [plain(v) for v in episode["support_label"]]
    qx = torch.stack([plain(v) for v in episode["query_image"]])
    qy = torch.stack([plain(v) for v in episode["query_label"]])
    return sx, sy, qx, qy


# ------------------------------------------------------------------------------------------------- evaluation
def _subject_counts(subjects: Sequence[Mapping[str, Any]]) -> dict[str, set[str]]:
    have: dict[str, set[str]] = defaultdict(set)
    for item in subjects:
        for s in item.get("structures", {}):
            have[s].add(str(item["subject"]))
    return have


def evaluate_segmentation(
    learner: torch.nn.Module,
    dataset: Any,
    protocols: Sequence[Mapping[str, Any]],
    shots: Sequence[int],
    num_episodes: int | None,
    device: str | torch.device,
    output_dir: str,
    patch_size: Sequence[int] = (32, 32, 32),
    n_patches: int = 8,
    seed: int = 0,
    amp: bool = False,
    progress: bool = True,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    keep_largest_component: bool = True,
    inferer: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """Meta-test on whole query volumes; writes ``output_dir/metrics.json``.

    Each protocol is ``{"name", "structures", "support_subjects" (optional), "query_subjects" (optional),
    "num_episodes" (optional)}`` (see :func:`~monai_metalearn.apps.protocols.segmentation_protocols`). For every
    protocol and K in ``shots``, ``num_episodes`` fixed episodes (the argument when given, e.g. a cap for slow
    learners, else the protocol's own; structures and query subjects taken in turn) adapt on ``n_patches`` patches per support subject and segment one whole query volume
    with a sliding window. Learners with ``whole_volume = True`` (references, registration-based atlases) get the
    whole support scans instead of patches and segment the whole query directly. A (protocol, K) whose structures
    have too few subjects is reported as such, not silently dropped. With
    ``keep_largest_component`` the predicted mask is reduced to its largest connected component before scoring
    (:func:`largest_component`); the summaries then also hold ``raw``, the Dice without it. ``inferer`` replaces
    the sliding window of patch-based learners (``evaluate.json``'s ``inferer``; default
    :func:`sliding_window_inferer` with ``patch_size``, ``sw_batch_size`` and ``overlap``).

    ``metrics.json``: ``dice`` (mean, ci95, n_episodes) and ``per_structure`` of the smallest K over all protocols,
    each summary also under ``slab`` for the Dice on the structure's axial slices only (the 3D analogue of the 2D
    protocol of SSL-ALPNet, which scores the slices that contain the organ; whole-volume Dice stays the main figure),
    ``by_shot`` (K -> summary over all protocols), ``by_protocol`` (name -> K -> summary with ``per_direction``,
    ``support -> query`` subject pairs), ``not_possible`` and ``episodes`` (one record per episode).
    """
    from monai.handlers import StatsHandler

    from monai_metalearn.data import SegmentationEpisodeDataset, can_draw_episode, episode_loader
    from monai_metalearn.engines import MetaEvaluator, default_prepare_episode

    raw = getattr(dataset, "data", dataset)
    have = _subject_counts(raw)
    records: list[dict[str, Any]] = []
    by_protocol: dict[str, dict[str, Any]] = {}
    not_possible: list[str] = []
    for proto in protocols:
        name = str(proto["name"])
        sup_pool, qry_pool = proto.get("support_subjects"), proto.get("query_subjects")
        by_protocol[name] = {}
        for k in shots:
            k = int(k)
            usable = [s for s in proto["structures"] if can_draw_episode(have.get(s, ()), k, 1, sup_pool, qry_pool)]
            skipped = [s for s in proto["structures"] if s not in usable]
            if skipped:
                not_possible.append(f"{name} {k}-shot: {skipped} (too few subjects)")
            if not usable:
                continue
            whole = bool(getattr(learner, "whole_volume", False))
            if hasattr(learner, "prepare_protocol"):  # registration-based learners: spacing and modalities
                learner.prepare_protocol(**_protocol_geometry(raw, sup_pool, qry_pool))
            episodes = SegmentationEpisodeDataset(
                dataset, usable, k_shot=k, q_query=1,
                num_episodes=int(num_episodes if num_episodes is not None else proto["num_episodes"]),
                support_transform=volume_transforms() if whole else patch_transforms(patch_size, n_patches),
                query_transform=volume_transforms(), support_subjects=sup_pool, query_subjects=qry_pool,
                balanced=True, seed=seed + 1000 * k, stack=not whole,
            )
            evaluator = MetaEvaluator(
                device=device, val_data_loader=episode_loader(episodes), learner=learner, task="segmentation",
                prepare_episode=volume_prepare_episode if whole else default_prepare_episode,
                amp=amp, progress=progress,
                inferer=None if whole else (inferer if inferer is not None
                                            else sliding_window_inferer(patch_size, sw_batch_size, overlap)),
                mask_postprocess=mask_postprocess(keep_largest_component),
                val_handlers=[StatsHandler(iteration_log=False, name=f"evaluate_{name}_{k}shot")],
            )
            evaluator.run()
            recs = [{**r, "protocol": name, "k_shot": k} for r in evaluator.state.episode_records]
            records += recs
            by_protocol[name][str(k)] = _summary(recs)
            m = evaluator.state.metrics
            logger.info(f"{name} {k}-shot: Dice {m['dice']:.4f} +/- {m['dice_ci95']:.4f} over {len(recs)} episodes")
    if not records:
        fail("no protocol could be evaluated: " + "; ".join(not_possible), DataError)
    by_shot = {str(k): _summary([r for r in records if r["k_shot"] == int(k)])
               for k in sorted({r["k_shot"] for r in records})}
    top = by_shot[min(by_shot, key=int)]
    out = {**top, "k_shot": int(min(by_shot, key=int)), "keep_largest_component": keep_largest_component, **extra,
           "by_shot": by_shot, "by_protocol": by_protocol,
           "not_possible": not_possible, "test_subjects": sorted({s for r in records for s in _subjects(r)}),
           "episodes": records}
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return out


def _protocol_geometry(subjects: Sequence[Mapping[str, Any]], support: Sequence[str] | None,
                       query: Sequence[str] | None) -> dict[str, Any]:
    """Voxel spacing, modalities and the sources' registration settings of a protocol's support and query subjects
    (for ``prepare_protocol``)."""
    from monai_metalearn.data import registration_settings

    def pick(pool):
        keep = None if pool is None else {str(p) for p in pool}
        return [s for s in subjects if keep is None or str(s.get("subject")) in keep]

    sup, qry = pick(support), pick(query)
    spacing = next((s["pixdim"] for s in qry + sup if s.get("pixdim") is not None), None)
    return {"spacing": spacing, "support_modalities": sorted({str(s.get("modality")) for s in sup}),
            "query_modalities": sorted({str(s.get("modality")) for s in qry}),
            "registration": registration_settings(sorted({str(s.get("source")) for s in qry + sup}))}


def merge_fold_metrics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Cross-validation: the ``metrics.json`` of several folds (each with its ``fold`` and ``episodes``) as one
    summary per protocol and shot over all their episodes, with the interval over query subjects.

    A subject queried in several folds (CHAOS, ACDC: never trained on, so every fold's model segments them) counts
    once in the subject-level interval, its episodes averaged.

    Returns:
        ``{"by_protocol": {name: {k: summary}}, "by_shot": {k: summary}, "folds": [...], "n_episodes": n}``.
    """
    records = [{**r, "fold": m.get("fold")} for m in metrics for r in m.get("episodes", [])]
    by_protocol: dict[str, dict[str, Any]] = {}
    for name in sorted({r["protocol"] for r in records}):
        for k in sorted({r["k_shot"] for r in records if r["protocol"] == name}):
            sel = [r for r in records if r["protocol"] == name and r["k_shot"] == k]
            by_protocol.setdefault(name, {})[str(k)] = _summary(sel)
    by_shot = {str(k): _summary([r for r in records if r["k_shot"] == k]) for k in sorted({r["k_shot"] for r in records})}
    return {"by_protocol": by_protocol, "by_shot": by_shot, "folds": [m.get("fold") for m in metrics],
            "n_episodes": len(records)}


def _subjects(record: Mapping[str, Any]) -> list[str]:
    return [str(s) for key in ("support_subject", "query_subject") for s in record.get(key, [])]


def _query(record: Mapping[str, Any]) -> str:
    """The query subject(s) of an episode record, as one id."""
    return "+".join(str(q) for q in record.get("query_subject", [])) or "unknown"


def _direction(record: Mapping[str, Any]) -> str:
    return f"{'+'.join(record.get('support_subject', []))} -> {'+'.join(record.get('query_subject', []))}"


def _summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Dice summary of episode records: overall, ``per_structure``, ``per_direction`` (1-shot), ``slab`` (the
    same for the Dice on the structure's axial slices, see :func:`~monai_metalearn.metrics.slab_dice`) and ``raw``
    (the same before the mask post-processing, when there was one)."""
    from monai_metalearn.metrics import mean_ci95_subjects, summarize, summarize_groups

    out: dict[str, Any] = {}
    for key, part_name in (("dice", None), ("dice_slab", "slab"), ("dice_raw", "raw")):
        if not all(key in r for r in records):
            continue
        per_structure: dict[str, list[float]] = defaultdict(list)
        per_direction: dict[str, list[float]] = defaultdict(list)
        for r in records:
            per_structure[str(r.get("structure"))].append(r[key])
            if len(r.get("support_subject", [])) == 1:
                per_direction[_direction(r)].append(r[key])
        part = summarize([r[key] for r in records], per_class=per_structure, name="dice", group_key="per_structure")
        # the interval over query subjects (each subject's episodes averaged first) and how many stand behind it
        part["dice"]["subjects"] = mean_ci95_subjects([r[key] for r in records], [_query(r) for r in records])
        part["dice"]["n_support_subjects"] = len({s for r in records for s in r.get("support_subject", [])})
        for name, entry in part["per_structure"].items():
            sel = [r for r in records if str(r.get("structure")) == name]
            entry["subjects"] = mean_ci95_subjects([r[key] for r in sel], [_query(r) for r in sel])
        if per_direction:
            part["per_direction"] = summarize_groups(per_direction)
        if part_name is None:
            out.update(part)
        else:
            out[part_name] = part
    return out


# ------------------------------------------------------------------------------------------------- inference
def load_segmentation_task(path: str | os.PathLike, data_dir: str | None = None) -> dict[str, Any]:
    """Reads and checks a few-shot segmentation task file.

    Format::

        {"support": [{"image": "a.nii.gz", "label": "a_mask.nii.gz"}, ...],
         "query": [{"image": "q.nii.gz"}, {"image": "dicom_series_folder"}],
         "modality": "CT"}

    ``image`` is a NIfTI/NRRD file or a DICOM series folder; ``label`` a mask on the same grid (non-zero voxels, or
    the voxels equal to the item's ``label_value``, are the structure). Relative paths are taken from the task file's
    folder (or ``data_dir``). An optional ``id`` per query names its mask (``<id>_seg.nii.gz``: a plain file name, no
    folders). Intensities are scaled per image (see
    :func:`~monai_metalearn.transforms.scale_intensity`): ``intensity`` (top level or per item: ``"ct_hu"``,
    ``"ct_windowed"``, ``"mr"``) says what they are; else ``modality`` (``"CT"`` or ``"MR"``) and the values decide
    (:func:`~monai_metalearn.transforms.infer_intensity`): the HU window only for scans with Hounsfield air (below
    -500), so windowed 8-bit CT and MRI of any scale are scaled by their own percentiles. ``orientation`` (top level
    or per item, e.g. ``"LAS"``) corrects files whose header points an axis the wrong way
    (:class:`~monai_metalearn.data.LoadScand`); for the files of a named ``source`` with a known header fault (BTCV's
    shared layout) the source's correction applies by itself. The masks are written with the query file's own header.

    Exits with a one-line error for: a missing/unreadable task file, no support, no query, a support item without
    ``label``, a missing file.
    """
    return read_task_file(path, data_dir, support_files=("image", "label"), query_files=("image",),
                          expected="{'support': [{'image', 'label'}], 'query': [{'image'}]}")


def _reader(pixdim: Sequence[float] | None, with_label: bool):
    from monai_metalearn.data import scan_reader

    return scan_reader(["image", "label"] if with_label else ["image"], pixdim)


def segment_task(
    learner: torch.nn.Module,
    task_file: str,
    output_dir: str,
    pixdim: Sequence[float] | None = (3.0, 3.0, 3.0),
    patch_size: Sequence[int] = (32, 32, 32),
    n_patches: int = 8,
    device: str | torch.device = "cpu",
    data_dir: str | None = None,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    seed: int = 0,
    keep_largest_component: bool = True,
    preprocessing: Any = None,
    inferer: Any = None,
    postprocessing: Any = None,
) -> dict[str, Any]:
    """Adapts ``learner`` to the task file's support scans and writes one mask per query to ``output_dir``.

    Support scans are read with their masks (same grid required), resampled to ``pixdim`` and cut into
    ``n_patches`` patches each around the structure and its background; the adapted model segments each whole
    query with a sliding window at ``pixdim`` (with ``keep_largest_component``, only the mask's largest connected
    component is kept: :func:`largest_component`), and the mask is resampled back (MONAI ``Invertd``: nearest
    neighbour) onto the query's own grid and saved (``SaveImaged``) as ``<query name>_seg.nii.gz``, with the query's
    affine (``<query name>_query<i>_seg.nii.gz`` when an earlier query has the same name; the name is the query's
    ``id`` when given, else its image's name). The masks are written once every query has been segmented, so a task
    that fails leaves ``output_dir`` as it was.
    ``output_dir/segmentations.json`` lists the outputs with their foreground volume in ml. Under ``torchrun``, with
    a process group initialised (:func:`~monai_metalearn.engines.init_distributed`), every rank adapts to the
    support set and segments its share of the queries (:func:`~monai_metalearn.engines.shard_queries`: queries
    ``r, r + W, ...``); the shares are gathered (:func:`~monai_metalearn.engines.gather_results`), rank 0 writes
    every mask and ``segmentations.json``, and every rank returns the combined result (an error on any rank is
    raised on all of them).

    Exits with a one-line error for: an empty support mask, a support image and mask of different geometry, an
    unreadable scan or one with NaN / infinite values (names the task item and file), a task file with no support or
    no query, a query ``id`` that is not a plain file name.

    Args:
        preprocessing: reads a support item ``{"image", "label"}`` and a query item ``{"image"}`` (an invertible
            MONAI transform: the query's mask is resampled back with ``Invertd`` through it); default
            :func:`~monai_metalearn.data.scan_reader` with ``pixdim`` (``inference.json``'s ``preprocessing``).
        inferer: ``inferer(volume, predictor) -> logits [1, C, *S]`` for patch-based learners; default
            :func:`sliding_window_inferer` with ``patch_size``, ``sw_batch_size`` and ``overlap``.
        postprocessing: maps one query's logits ``[C, *S]`` to its mask ``[1, *S]`` (e.g. ``AsDiscrete(argmax=True)``
            then ``KeepLargestConnectedComponent``); default the arg-max, then :func:`largest_component` with
            ``keep_largest_component``.
    """
    from monai.data import MetaTensor
    from monai.transforms import Invertd, SaveImaged

    from monai_metalearn.data import ScanLoadError

    task = load_segmentation_task(task_file, data_dir)
    names = _output_names(task["query"])  # before any work: an id that would leave output_dir is refused
    top_modality = task.get("modality")
    support_read = _reader(pixdim, with_label=True) if preprocessing is None else preprocessing
    sampler = patch_transforms(patch_size, n_patches)
    whole = bool(getattr(learner, "whole_volume", False))
    xs, ys = [], []
    for i, item in enumerate(task["support"]):
        where = f"support[{i}] {item['image']}"
        try:
            d = support_read({"image": item["image"], "label": item["label"], **_read_options(item, task)})
        except (ScanLoadError, RuntimeError, OSError) as err:
            fail(f"{where}: {_reason(err)}", DataError)
        label = d["label"]
        value = item.get("label_value")
        mask = (label > 0) if value is None else (label.round() == float(value))
        if int(mask.sum()) == 0:
            fail(f"{where}: the support mask {item['label']} is empty"
                 + ("" if value is None else f" (no voxel equals label_value {value})")
                 + (f" after resampling to {list(pixdim)} mm" if pixdim is not None else ""), DataError)
        image = d["image"].as_tensor()
        image = scale_intensity(
            image, item_intensity({"modality": top_modality, "intensity": task.get("intensity"), **item}, image))
        if whole:  # whole-volume learners (atlases, references) take the support scans whole
            xs.append(image.to(device))
            ys.append(mask.as_tensor().float().to(device))
            continue
        sampler.set_random_state(seed=seed + i)
        for sample in sampler({"image": image, "label": mask.as_tensor().float()}):
            xs.append(sample["image"])
            ys.append(sample["label"])
    sx, sy = (xs, ys) if whole else (torch.stack(xs).to(device), torch.stack(ys).to(device))
    learner = learner.to(device).eval()
    if hasattr(learner, "prepare_protocol"):  # registration-based learners: spacing and modalities of the task
        def modality(item):
            kind = item.get("intensity") or task.get("intensity")
            mod = item.get("modality") or top_modality
            return str(mod).upper() if mod else ("MR" if kind == "mr" else "CT" if kind else "unknown")

        from monai_metalearn.data import registration_settings

        sources = sorted({str(i.get("source") or task.get("source")) for i in [*task["support"], *task["query"]]})
        learner.prepare_protocol(spacing=pixdim, support_modalities=sorted({modality(i) for i in task["support"]}),
                                 query_modalities=sorted({modality(i) for i in task["query"]}),
                                 registration=registration_settings(sources))
    try:
        with torch.enable_grad():
            predictor = learner.adapt(sx, sy)
    except ValueError as err:
        fail(f"cannot adapt to the support set of {task_file}: {err}", TaskFileError)
    if inferer is None:
        inferer = sliding_window_inferer(patch_size, sw_batch_size, overlap)
    postprocess = mask_postprocess(keep_largest_component) if postprocessing is None else None
    query_read = _reader(pixdim, with_label=False) if preprocessing is None else preprocessing
    saver = SaveImaged(keys="pred", output_dir=str(output_dir), output_postfix="seg", separate_folder=False,
                       resample=False, output_dtype=np.uint8, print_log=False)
    def segment_query(i: int, item: Mapping[str, Any]) -> tuple[dict[str, Any], MetaTensor]:
        where = f"query[{i}] {item['image']}"
        try:
            d = query_read({"image": item["image"], **_read_options(item, task)})
        except (ScanLoadError, RuntimeError, OSError) as err:
            fail(f"{where}: {_reason(err)}", DataError)
        image = d["image"]
        kind = item_intensity({"modality": top_modality, "intensity": task.get("intensity"), **item}, image)
        x = scale_intensity(image.as_tensor(), kind)[None].to(device)
        with torch.no_grad():
            logits = predictor(x) if whole else inferer(x, predictor)
        if postprocessing is not None:
            pred = torch.as_tensor(postprocessing(logits[0].detach().cpu())).to(torch.uint8)
        else:
            pred = (logits.argmax(1, keepdim=True) if logits.shape[1] > 1 else logits[:, :1] > 0).to(torch.uint8).cpu()
            if postprocess is not None:
                pred = postprocess(pred)
            pred = pred[0]
        d["pred"] = MetaTensor(pred.reshape(image.shape), meta=dict(image.meta),
                               applied_operations=list(image.applied_operations))
        inverted = Invertd(keys="pred", transform=query_read, orig_keys="image", nearest_interp=True)(d)
        mask = inverted["pred"]
        name = names[i]
        meta = {**mask.meta, "filename_or_obj": f"{name}.nii.gz"}
        if "header_affine" in meta:  # a corrected header: the mask is written with the query file's own header
            meta["affine"] = torch.as_tensor(meta.pop("header_affine"))
        mask = MetaTensor((mask.as_tensor() > 0.5).to(torch.uint8), meta=meta)
        path = Path(output_dir) / f"{name}_seg.nii.gz"
        voxel_ml = float(abs(np.linalg.det(np.asarray(mask.affine)[:3, :3]))) / 1000.0
        return ({**({"id": item["id"]} if "id" in item else {}), "image": item["image"], "mask": str(path),
                 "shape": list(mask.shape[1:]), "foreground_ml": round(float(mask.sum()) * voxel_ml, 3)}, mask)

    # under torchrun (a process group initialised, e.g. by monai_metalearn.engines.init_distributed) every rank
    # segments its share of the queries; the shares are gathered and rank 0 writes them all
    from monai_metalearn.engines.distributed import gather_results, is_distributed, is_main_process, shard_queries

    done, error = [], None
    try:
        for i, item in shard_queries(task["query"]):
            done.append((i, segment_query(i, item)))
    except Exception as err:  # noqa: BLE001 - every rank must reach the gather, then all raise the same error
        if not is_distributed():
            raise
        error = err
    segmented = gather_results(done, len(task["query"]), error)
    outputs = [out for out, _ in segmented]
    result = {"task_file": str(task_file), "k_shot": len(task["support"]), "segmentations": outputs}
    if is_main_process():
        for _, mask in segmented:  # written once every query has been read: a bad query leaves output_dir untouched
            saver({"pred": mask})
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "segmentations.json").write_text(json.dumps(result, indent=2))
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()  # the other ranks return once rank 0 has written
    return result


def _read_options(item: Mapping[str, Any], task: Mapping[str, Any]) -> dict[str, Any]:
    """Reading options of a task item: its ``orientation`` (or the task's), else its source's correction for the
    source's own shared files (:func:`~monai_metalearn.data.file_orientation`: BTCV's shared layout)."""
    from monai_metalearn.data import file_orientation

    codes = item.get("orientation") or task.get("orientation") or file_orientation(
        item.get("source") or task.get("source"), item.get("image"))
    return {"orientation": str(codes)} if codes else {}


def _output_names(queries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The base name of each query's mask (``<name>_seg.nii.gz`` in ``output_dir``): the query's ``id`` when given,
    else its image's file or folder name without extension; ``<name>_query<i>`` when an earlier query has the same
    name (two DICOM folders called ``series``), so no mask overwrites another.

    Raises:
        TaskFileError: an ``id`` that is not a plain file name (empty, ``.`` / ``..``, an absolute path or one with
            folders, e.g. ``"../../evil"``): the mask would be written outside ``output_dir``.
    """
    names: list[str] = []
    for i, item in enumerate(queries):
        if item.get("id") is not None:
            name = str(item["id"])
            if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
                fail(f"task_file query[{i}] id {name!r} is not a plain file name (no folders, not '.' or '..'): "
                     "it names the query's mask <id>_seg.nii.gz inside output_dir", TaskFileError)
        else:
            name = _output_name(item["image"])
        if name in ("", ".", ".."):
            name = f"query{i}"
        if name in names:
            name = f"{name}_query{i}"
        names.append(name)
    return names


def _output_name(image: str) -> str:
    name = Path(str(image).rstrip("/")).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".npz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name
