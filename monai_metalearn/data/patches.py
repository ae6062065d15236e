"""Structure patches for few-shot classification: one example per (subject, structure), read once per subject.

:func:`build_structure_patches` loads each subject of a datalist once (checked loading, reorientation, optional
resampling), crops every requested structure's bounding box with a generous margin, and returns a datalist of
small in-memory examples ``{"image", "label", "class", "subject", ...}``. Wrap it in a MONAI ``Dataset`` or
``CacheDataset`` with :func:`patch_transforms` (random jittered organ patch of a fixed size, the OrganMNIST3D
construction, plus image synthesis for label-only subjects) and hand it to
:class:`~monai_metalearn.data.ClassificationEpisodeDataset`.

Loading a subject once for all its structures is what makes this fast: the 20 SynthSeg maps (256^3) are read in
seconds, against minutes if every (subject, structure) pair re-read its file.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "build_structure_patches", "patch_transforms", "render_patches", "class_counts", "scan_reader", "reader_input"
]

# item keys that change how its files are read (LoadScand): they travel with the paths to the reader
_READ_KEYS = ("orientation", "image_threshold", "label_threshold")


def reader_input(item: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The part of a datalist ``item`` that :func:`scan_reader` needs: the paths under ``keys`` and the item's
    reading options (``orientation``: a header correction, ``<key>_threshold``: a soft mask's threshold)."""
    return {**{k: item[k] for k in keys}, **{k: item[k] for k in _READ_KEYS if item.get(k) is not None}}


def scan_reader(keys: Sequence[str], pixdim: Sequence[float] | None = None):
    """Checked loading (:class:`~monai_metalearn.data.LoadScand`: one grid for all ``keys``), RAS orientation and,
    with ``pixdim``, resampling (bilinear for ``image``, nearest for the rest): how every pipeline here reads a
    subject. Invertible with MONAI's ``Invertd`` (orientation and spacing)."""
    from monai.transforms import Compose, Orientationd, Spacingd

    from monai_metalearn.data.loading import LoadScand

    keys = list(keys)
    steps = [LoadScand(keys=keys), Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    if pixdim is not None:
        steps.append(Spacingd(keys=keys, pixdim=pixdim, mode=["bilinear" if k == "image" else "nearest" for k in keys]))
    return Compose(steps)


def build_structure_patches(
    datalist: Sequence[Mapping[str, Any]],
    structures: Sequence[str] | None = None,
    margin: float = 0.25,
    pixdim: Sequence[float] | None = None,
    n_views: int = 1,
    min_voxels: int = 8,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Pre-crops every requested structure of every subject; each subject's files are read once.

    Args:
        datalist: items from :mod:`monai_metalearn.data.sources` (``label``, optional ``image``, ``subject``,
            ``structures`` name -> id, ``modality``, ``source``, ``synthetic``).
        structures: structure names to keep; default every structure of every item. A name that no item has
            raises ``ValueError``; a name that only some subjects have is simply absent from the others.
        margin: bounding-box margin, as a fraction of the box size per side, kept around each structure so that
            random jitter later has room.
        pixdim: resample to this spacing (mm) first (e.g. ``(2, 2, 2)``); default: keep each scan's own spacing.
        n_views: repeat each example this many times (``view`` 0..n-1); each repeat becomes a different random
            patch after :func:`patch_transforms`. Use with ``cross_subject=True`` sampling so that views of one
            subject never sit on both sides of an episode.
        min_voxels: structures with fewer voxels in a scan are reported in the error, not silently used.
        progress: tqdm progress bar over subjects.

    Returns:
        list of dicts: ``label`` (multi-label crop, uint8/int16 tensor ``[1, ...]`` with affine), ``image`` (crop,
        absent for label-only subjects), ``class``, ``structure_id``, ``structures``, ``subject``, ``modality``,
        ``source``, ``synthetic``, ``view``, ``body_box`` (the world box of the subject's body,
        :func:`~monai_metalearn.transforms.body_box`: of the intensity-scaled image, or of ``label > 0`` for
        label-only subjects; what :func:`patch_transforms` with ``body_coordinates=True`` needs).

    Raises:
        ValueError: unknown structure names; a structure listed in an item's ``structures`` but with fewer than
            ``min_voxels`` voxels in its label map (names subject, structure and file).
    """
    from tqdm.auto import tqdm

    from monai_metalearn.transforms import CropStructure, body_box, scale_intensity

    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}.")
    known = set().union(*(item.get("structures", {}) for item in datalist)) if datalist else set()
    wanted = list(structures) if structures is not None else sorted(known)
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise ValueError(f"structures {unknown} are in no subject of the datalist; known: {sorted(known)}.")

    out: list[dict[str, Any]] = []
    for item in tqdm(datalist, desc="structure patches", disable=not progress, leave=False):
        present = [s for s in wanted if s in item.get("structures", {})]
        if not present:
            continue
        keys = [k for k in ("image", "label") if item.get(k) is not None]
        loaded = scan_reader(keys, pixdim)(reader_input(item, keys))
        label = loaded["label"]
        label = label.to(torch.int16) if float(label.max()) > 255 else label.to(torch.uint8)
        image = loaded.get("image")
        if image is not None:
            box = body_box(scale_intensity(image, item.get("intensity")), affine=label.affine)
        else:
            box = body_box(label, affine=label.affine, mask=label > 0)
        for s in present:
            sid = item["structures"][s]
            ids = list(sid) if isinstance(sid, (list, tuple)) else [sid]
            count = int(np.isin(label.cpu().numpy(), ids).sum())
            if count < min_voxels:
                raise ValueError(
                    f"structure {s!r} (id {sid}) has {count} voxel(s) < min_voxels={min_voxels} in subject "
                    f"{item.get('subject')!r} ({item['label']}); remove it from the item's structures or lower "
                    "min_voxels."
                )
            crop = CropStructure(structure=sid, margin=margin)
            if image is not None:
                img_c, lab_c = crop(image, label)
            else:
                lab_c = crop(label, label)[1]
                img_c = None
            for view in range(n_views):
                ex = {
                    "label": lab_c,
                    "class": s,
                    "structure_id": sid,
                    "structures": dict(item["structures"]),
                    "subject": item.get("subject"),
                    "modality": item.get("modality"),
                    "source": item.get("source"),
                    "synthetic": bool(item.get("synthetic", False)),
                    "view": view,
                    "body_box": box,
                }
                if img_c is not None:
                    ex["image"] = img_c
                out.append(ex)
    return out


def class_counts(patches: Sequence[Mapping[str, Any]], key: str = "class") -> dict[str, dict[str, int]]:
    """``{class: {"examples": n, "subjects": m}}``: what stands behind each class."""
    out: dict[str, dict[str, Any]] = {}
    for p in patches:
        c = out.setdefault(p[key], {"examples": 0, "subjects": set()})
        c["examples"] += 1
        c["subjects"].add(p.get("subject"))
    return {k: {"examples": v["examples"], "subjects": len(v["subjects"])} for k, v in sorted(out.items())}


def patch_transforms(
    spatial_size: Sequence[int] = (32, 32, 32),
    jitter: float = 0.1,
    scale_range: tuple[float, float] = (0.9, 1.2),
    synthesize: bool = True,
    augment: bool = True,
    body_coordinates: bool = False,
    modality_augment: bool = False,
):
    """The random part of the organ-patch pipeline, for a MONAI ``Dataset``/``CacheDataset`` over
    :func:`build_structure_patches` output.

    Real examples: jittered box around the structure, resized to ``spatial_size``, z-scored. Label-only examples
    (SynthSeg maps): the same crop of the label map, then a SYNTHETIC image drawn from it with the SynthSeg recipe
    (:class:`~monai_metalearn.transforms.RandSynthesizeImaged`); results on them must be reported as synthetic.

    Args:
        spatial_size: patch size.
        jitter: random shift of the box centre, as a fraction of the box size (0 for evaluation-time determinism
            is not needed: episodes seed their own copies of these transforms per example).
        scale_range: random scaling of the box.
        synthesize: synthesize images for examples without one (else such examples raise ``KeyError``).
        augment: random jitter/scale (False: the centred box, e.g. for inference).
        body_coordinates: append the three body-frame coordinate channels
            (:class:`~monai_metalearn.transforms.BodyCoordinatesd`, from each item's ``body_box``) after z-scoring:
            the patch becomes ``[4, *spatial_size]`` and says where it lies in the body and how large it is.
        modality_augment: a random intensity remap of each patch after z-scoring
            (:func:`~monai_metalearn.transforms.modality_augmentation`: monotonic curve, gamma, sign flip), for
            meta-training features that carry from CT to MR. Training only: evaluation patches keep their contrast.
    """
    from monai.transforms import Compose, EnsureTyped, NormalizeIntensityd

    from monai_metalearn.transforms import (
        BodyCoordinatesd,
        CropStructured,
        RandCropStructured,
        RandSynthesizeImaged,
        modality_augmentation,
    )

    crop_kwargs = dict(
        keys=["image", "label"], label_key="label", structure_key="structure_id", spatial_size=tuple(spatial_size),
        allow_missing_keys=True,
    )
    crop = (
        RandCropStructured(jitter=jitter, scale_range=scale_range, margin=0.1, **crop_kwargs)
        if augment
        else CropStructured(margin=0.1, **crop_kwargs)
    )
    steps = [crop]
    if synthesize:
        steps.append(RandSynthesizeImaged(keys="label", image_key="image", only_if_missing=True))
    steps.append(NormalizeIntensityd(keys="image"))
    if modality_augment:
        steps.append(modality_augmentation(keys="image"))
    if body_coordinates:
        steps.append(BodyCoordinatesd(keys="image"))
    steps.append(EnsureTyped(keys=["image"], dtype=torch.float32, track_meta=False))
    return Compose(steps)


def render_patches(
    patches: Sequence[Mapping[str, Any]],
    transform: Any,
    seed: int = 0,
    keys: Sequence[str] = ("image",),
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Applies ``transform`` (e.g. :func:`patch_transforms`) once to every patch, seeded per item, and keeps the
    results: a fixed, in-memory set of views for evaluation.

    Meta-training wants fresh random views every episode; meta-testing wants every learner to see the *same*
    views and no transform cost per episode. The returned items keep ``class``, ``subject``, ``view``,
    ``modality``, ``source``, ``synthetic`` and hold ``keys`` as plain tensors (``label`` maps are dropped: they
    would carry the answer and are not needed to classify). Item ``i``'s view depends only on ``(seed, i)``: a
    private copy of ``transform`` is seeded and run, so the caller's transform keeps its random state and several
    threads may render with one transform at once.

    Args:
        patches: :func:`build_structure_patches` output.
        transform: a MONAI (``Randomizable``) transform chain.
        seed: base seed.
        keys: transformed entries to keep.
        progress: tqdm progress bar.
    """
    from tqdm.auto import tqdm

    meta_keys = ("class", "subject", "view", "modality", "source", "synthetic", "structure_id")
    transform = copy.deepcopy(transform)
    out = []
    for i, item in enumerate(tqdm(patches, desc="render views", disable=not progress)):
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=int(np.random.default_rng([seed, i, 11]).integers(0, 2**31 - 1)))
        result = transform(dict(item))
        rendered = {k: item[k] for k in meta_keys if k in item}
        for k in keys:
            value = result[k]
            rendered[k] = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
        out.append(rendered)
    return out
