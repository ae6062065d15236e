"""Array transforms for few-shot meta-learning on 3D CT/MRI (MONAI style, channel-first ``[C, D, H, W]``).

* :class:`SelectStructure`: multi-label map -> binary mask of one structure (by id, ids or name).
* :class:`CropStructure` / :class:`RandCropStructure`: structure-centred patch (OrganMNIST3D-style), with the
  label map cropped by the same box; the random version jitters and rescales the box.
* :class:`RemapLabels`: class names or ids -> episode-local labels ``start..start+N-1`` (and back).
* :class:`RandSynthesizeImage`: SynthSeg-style synthetic image from a label map. Its output is SYNTHETIC.

All transforms take and return :class:`monai.data.MetaTensor` (numpy arrays are converted); spatial ops are
MONAI's own (:class:`~monai.transforms.SpatialCrop`, :class:`~monai.transforms.BorderPad`,
:class:`~monai.transforms.Resize`, :class:`~monai.transforms.Resample`), so the affine stays correct.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from monai.config import DtypeLike
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import (
    BorderPad,
    RandAdjustContrast,
    RandAffineGrid,
    RandBiasField,
    RandGaussianNoise,
    RandGaussianSmooth,
    Resample,
    Resize,
    ScaleIntensity,
    SpatialCrop,
)
from monai.transforms.transform import RandomizableTransform, Transform
from monai.transforms.utils import create_grid
from monai.utils import convert_to_tensor, ensure_tuple_rep, get_equivalent_dtype

__all__ = [
    "StructureSpec",
    "resolve_structure",
    "structure_mask",
    "structure_bounding_box",
    "SelectStructure",
    "CropStructure",
    "RandCropStructure",
    "RemapLabels",
    "RandSynthesizeImage",
]

#: A structure: one label id, a sequence of ids (union) or a name looked up in a ``label_names`` map.
StructureSpec = Union[int, float, str, Sequence[Union[int, float]]]

_SPATIAL_DIMS = 3


def _as_id(value: Any) -> int | float:
    """One label id as a Python number (ints stay ints; bools are rejected)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"label ids must be numbers, got {value!r} ({type(value).__name__}).")
    return int(value) if float(value).is_integer() else float(value)


def _name_map(label_names: Mapping | None) -> dict[str, tuple[int | float, ...]]:
    """Normalise ``label_names`` to ``{name: ids}``.

    Accepts ``{name: id}``, ``{name: [ids]}`` and the inverted ``{id: name}`` form of TotalSegmentator's
    ``class_map.json`` (keys may be digit strings); several ids with the same name are united.
    """
    if label_names is None:
        return {}
    if not isinstance(label_names, Mapping):
        raise TypeError(f"label_names must be a mapping name -> id(s), got {type(label_names).__name__}.")
    out: dict[str, tuple[int | float, ...]] = {}
    if label_names and all(isinstance(v, str) for v in label_names.values()):  # {id: name}
        for key, name in label_names.items():
            out[name] = out.get(name, ()) + (_as_id(int(key) if isinstance(key, str) else key),)
        return out
    for name, ids in label_names.items():
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"label_names[{name!r}] must be an id or ids, got {ids!r}.")
        if isinstance(ids, (np.ndarray, torch.Tensor)):
            ids = np.asarray(ids).reshape(-1).tolist()
        out[str(name)] = tuple(_as_id(i) for i in (ids if isinstance(ids, Sequence) else (ids,)))
    return out


def resolve_structure(structure: StructureSpec, label_names: Mapping | None = None) -> tuple[str, tuple]:
    """Turn a structure spec into ``(description, ids)``.

    Args:
        structure: an id (``5``), a sequence of ids (``[2, 3]``, union) or a name (``"liver"``) looked up in
            ``label_names``.
        label_names: ``{name: id or ids}``, or ``{id: name}`` as in TotalSegmentator's ``class_map.json``.

    Returns:
        A human-readable description for error messages (``"structure 'liver' (id 5)"``) and the tuple of ids.

    Raises:
        KeyError: ``structure`` is a name that is not in ``label_names`` (the message lists the known names).
        TypeError: ``structure`` is neither a number, a sequence of numbers nor a string.
        ValueError: ``structure`` is an empty sequence.

    Example::

        >>> resolve_structure("liver", {"liver": 5, "kidneys": [2, 3]})
        ("structure 'liver' (id 5)", (5,))
    """
    if isinstance(structure, bytes):
        structure = structure.decode()
    if isinstance(structure, str):
        names = _name_map(label_names)
        if structure not in names:
            known = sorted(names)
            shown = ", ".join(repr(k) for k in known[:60]) + (" ..." if len(known) > 60 else "")
            raise KeyError(
                f"unknown structure {structure!r}: not in label_names"
                + (f" (available: {shown})" if known else " (no label_names given)")
            )
        ids = names[structure]
        prefix = f"structure {structure!r}"
    else:
        if isinstance(structure, (np.ndarray, torch.Tensor)):
            structure = np.asarray(structure).reshape(-1).tolist()
        seq = structure if isinstance(structure, Sequence) else (structure,)
        ids = tuple(_as_id(i) for i in seq)
        prefix = "structure"
    if len(ids) == 0:
        raise ValueError(f"{prefix} has no label ids.")
    if len(ids) == 1:
        desc = f"{prefix} (id {ids[0]})" if prefix != "structure" else f"structure {ids[0]}"
    else:
        desc = f"{prefix} (ids {list(ids)})" if prefix != "structure" else f"structure ids {list(ids)}"
    return desc, ids


def _like(data: torch.Tensor, ref: Any, **extra_meta: Any) -> torch.Tensor:
    """Wrap ``data`` as a MetaTensor with ``ref``'s affine, metadata and applied operations (if ``ref`` has any)."""
    if not isinstance(ref, MetaTensor):
        return MetaTensor(data, meta=dict(extra_meta)) if extra_meta else data
    meta = {k: copy.deepcopy(v) for k, v in ref.meta.items() if k != "affine"}
    meta.update(extra_meta)
    out = MetaTensor(data, affine=ref.affine.clone(), meta=meta)
    out.applied_operations = copy.deepcopy(ref.applied_operations)
    return out


def _source_name(label: Any) -> str:
    """The file a MetaTensor was read from, for error messages."""
    meta = getattr(label, "meta", None) or {}
    src = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    if isinstance(src, (list, tuple)):
        src = src[0] if src else None
    return str(src) if src else "the label map"


def structure_mask(label: torch.Tensor, ids: Sequence[int | float], desc: str = "structure") -> torch.Tensor:
    """Boolean mask (same shape as ``label``) of the voxels whose value is in ``ids``.

    Args:
        label: label map (tensor / MetaTensor), any shape.
        ids: label ids to unite.
        desc: description used in the error message (see :func:`resolve_structure`).

    Raises:
        ValueError: the mask is empty ("structure 'liver' (id 5) is absent from <file>").
    """
    lab = label.as_tensor() if isinstance(label, MetaTensor) else label
    mask = lab == ids[0]
    for i in ids[1:]:
        mask |= lab == i
    if not bool(mask.any()):
        raise ValueError(f"{desc} is absent from {_source_name(label)}")
    return mask


def structure_bounding_box(mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Spatial bounding box ``(start, end)`` (``end`` exclusive) of a channel-first boolean mask.

    Raises:
        ValueError: the mask is empty.
    """
    m = mask.any(dim=0) if mask.ndim > _SPATIAL_DIMS else mask
    start, end = [], []
    for axis in range(m.ndim):
        other = tuple(a for a in range(m.ndim) if a != axis)
        idx = torch.nonzero(m.any(dim=other) if other else m).reshape(-1)
        if idx.numel() == 0:
            raise ValueError("cannot compute the bounding box of an empty mask")
        start.append(int(idx[0]))
        end.append(int(idx[-1]) + 1)
    return np.asarray(start, dtype=np.int64), np.asarray(end, dtype=np.int64)


class SelectStructure(Transform):
    """Binary mask of one structure from a channel-first multi-label map ``[1, D, H, W]``.

    Args:
        structure: a label id (``5``), several ids whose union is the structure (``[2, 3]``), or a name
            looked up in ``label_names`` (``"liver"``).
        label_names: ``{name: id or ids}``, or the ``{id: name}`` map of TotalSegmentator's ``class_map.json``
            (``json.load(...)["total"]``). Only needed for names.
        dtype: output dtype (default ``torch.float32``; use ``torch.bool`` for a boolean mask).

    Raises:
        KeyError: a name not in ``label_names`` (the message lists the available names).
        ValueError: the structure has no voxel in the label map; the message names the structure and the file
            (``meta["filename_or_obj"]``), e.g. ``"structure 'liver' (id 5) is absent from seg.nii.gz"``.

    Example::

        names = json.load(open("class_map.json"))["total"]  # {"5": "liver", ...}
        liver = SelectStructure("liver", label_names=names)(seg)  # MetaTensor [1, D, H, W], 0./1.
        kidneys = SelectStructure([2, 3])(seg)
    """

    def __init__(
        self,
        structure: StructureSpec,
        label_names: Mapping | None = None,
        dtype: DtypeLike | torch.dtype = torch.float32,
    ) -> None:
        self.structure = structure
        self.label_names = label_names
        self.dtype = dtype

    def __call__(
        self, label: Any, structure: StructureSpec | None = None, label_names: Mapping | None = None
    ) -> torch.Tensor:
        """Return the mask; ``structure``/``label_names`` override the constructor's for this call."""
        label = convert_to_tensor(label, track_meta=get_track_meta())
        desc, ids = resolve_structure(
            self.structure if structure is None else structure, self.label_names if label_names is None else label_names
        )
        mask = structure_mask(label, ids, desc)
        out = _like(mask, label)
        return out.to(get_equivalent_dtype(self.dtype, torch.Tensor))


def _margin_voxels(margin: Any, size: np.ndarray) -> np.ndarray:
    """Margin per side in voxels: ints are voxels, floats are fractions of the box size (rounded up)."""
    margins = ensure_tuple_rep(margin, len(size))
    out = []
    for m, s in zip(margins, size):
        if isinstance(m, (bool, np.bool_)) or not isinstance(m, (int, float, np.integer, np.floating)):
            raise TypeError(f"margin must be an int (voxels) or a float (fraction of the box), got {m!r}.")
        if m < 0:
            raise ValueError(f"margin must be >= 0, got {m!r}.")
        out.append(int(m) if isinstance(m, (int, np.integer)) else int(math.ceil(float(m) * float(s) - 1e-9)))
    return np.asarray(out, dtype=np.int64)


class CropStructure(Transform):
    """Crop a patch around one structure of a label map (the OrganMNIST3D organ-patch construction).

    The box is the structure's bounding box enlarged on *each side* by ``margin``:

    * an ``int`` margin is a number of voxels (``margin=4``: 4 voxels before and after, per axis);
    * a ``float`` margin is a fraction of the bounding box size of that axis, rounded up to whole voxels
      (``margin=0.1`` on a 50-voxel box adds 5 voxels on each side: the box grows by 20 %);
    * a sequence gives one value per spatial axis.

    The box is then grown symmetrically to at least ``min_size`` voxels per axis. Parts of the box outside the
    volume are padded (image with its minimum, label with 0), so the box is never shifted; the output affine
    (MONAI crop + pad + resize) maps the patch's first voxel to the world position of the box start. With
    ``spatial_size`` the patch is resized (image ``mode``, trilinear by default; label ``label_mode``,
    nearest neighbour). Without it the patch keeps the box size, and with ``margin >= 0`` it contains every
    voxel of the structure.

    Args:
        structure: id, ids (union) or name of the structure (see :class:`SelectStructure`).
        margin: margin per side, voxels (int) or fraction of the box size (float); per axis with a sequence.
        spatial_size: output patch size, e.g. ``(32, 32, 32)``; ``None`` keeps the box size.
        label_names: ``{name: id(s)}`` or ``{id: name}`` map, needed for names.
        min_size: minimal box size in voxels per axis (after margin).
        mode: interpolation for the image when resizing (``"trilinear"``, ``"area"``, ...).
        label_mode: interpolation for the label map when resizing; ``"nearest-exact"`` is nearest neighbour
            consistent with the affine MONAI's ``Resize`` writes (``"nearest"`` is offset by up to a voxel).

    Raises:
        KeyError: unknown structure name.
        ValueError: the structure is absent from the label map (message names the structure and the file).

    Example::

        crop = CropStructure("liver", margin=0.1, spatial_size=(32, 32, 32), label_names=names)
        patch, patch_label = crop(ct, seg)  # MetaTensors [1, 32, 32, 32]
    """

    def __init__(
        self,
        structure: StructureSpec,
        margin: Sequence[int | float] | int | float = 0.1,
        spatial_size: Sequence[int] | int | None = None,
        label_names: Mapping | None = None,
        min_size: Sequence[int] | int = 1,
        mode: str = "trilinear",
        label_mode: str = "nearest-exact",
    ) -> None:
        self.structure = structure
        self.margin = margin
        _margin_voxels(margin, np.ones(_SPATIAL_DIMS))  # validate early
        self.spatial_size = None if spatial_size is None else ensure_tuple_rep(spatial_size, _SPATIAL_DIMS)
        self.label_names = label_names
        self.min_size = np.asarray(ensure_tuple_rep(min_size, _SPATIAL_DIMS), dtype=np.int64)
        self.mode = mode
        self.label_mode = label_mode

    def compute_box(
        self, label: Any, structure: StructureSpec | None = None, label_names: Mapping | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Box ``(start, end)`` in voxel indices of ``label`` (``end`` exclusive, may reach outside the volume).

        Raises:
            KeyError: unknown structure name.
            ValueError: the structure is absent from ``label``.
        """
        label = convert_to_tensor(label, track_meta=get_track_meta())
        desc, ids = resolve_structure(
            self.structure if structure is None else structure, self.label_names if label_names is None else label_names
        )
        start, end = structure_bounding_box(structure_mask(label, ids, desc))
        m = _margin_voxels(self.margin, end - start)
        start, end = start - m, end + m
        short = np.maximum(self.min_size - (end - start), 0)
        start, end = start - short // 2, end + (short - short // 2)
        return start, end

    def crop_box(
        self,
        img: Any,
        start: Sequence[int],
        end: Sequence[int],
        pad_value: float | None = None,
        mode: str | None = None,
    ) -> torch.Tensor:
        """Crop ``img`` to ``[start, end)``, padding outside the volume with ``pad_value`` and resizing.

        Args:
            img: channel-first image or label map.
            start: box start per spatial axis (may be negative).
            end: box end per spatial axis, exclusive (may exceed the volume).
            pad_value: value for the padded region; ``None`` uses the minimum of ``img``.
            mode: interpolation used to resize to ``spatial_size`` (default: ``self.mode``).
        """
        img = convert_to_tensor(img, track_meta=get_track_meta())
        shape = np.asarray(img.shape[1:], dtype=np.int64)
        start, end = np.asarray(start, dtype=np.int64), np.asarray(end, dtype=np.int64)
        lo_in, hi_in = np.clip(start, 0, shape), np.clip(end, 0, shape)
        if np.any(hi_in <= lo_in):
            raise ValueError(f"crop box {start.tolist()}..{end.tolist()} does not overlap the volume {shape.tolist()}")
        out = SpatialCrop(roi_start=lo_in.tolist(), roi_end=hi_in.tolist())(img)
        if isinstance(out, MetaTensor) and "pixdim" in out.meta:
            # MONAI shallow-copies meta and writes the new spacing into meta["pixdim"] in place (Resize): give the
            # patch its own array, or every crop would change the source's pixdim (and PersistentDataset hashes)
            out.meta["pixdim"] = copy.deepcopy(out.meta["pixdim"])
        before, after = lo_in - start, end - hi_in
        if np.any(before > 0) or np.any(after > 0):
            value = float(img.min()) if pad_value is None else float(pad_value)
            border = [int(v) for pair in zip(before, after) for v in pair]
            out = BorderPad(spatial_border=border, mode="constant", value=value)(out)
        if self.spatial_size is not None:
            dtype = out.dtype
            out = Resize(self.spatial_size, mode=self.mode if mode is None else mode)(out)
            if not dtype.is_floating_point:  # integer label maps keep their dtype (nearest values are exact)
                out = torch.round(out).to(dtype)
        return out

    def __call__(self, img: Any, label: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image_patch, label_patch)`` cropped with the same box (see class docstring)."""
        start, end = self.compute_box(label)
        return self.crop_box(img, start, end), self.crop_box(label, start, end, pad_value=0, mode=self.label_mode)


class RandCropStructure(RandomizableTransform, CropStructure):
    """:class:`CropStructure` with a randomly jittered and rescaled box (few-shot training views).

    After the deterministic box of :class:`CropStructure` (bounding box + margin) is computed, its centre is
    shifted per axis by ``U(-jitter, jitter) * box_size`` and its size multiplied by one isotropic factor
    ``U(*scale_range)`` (rounded to whole voxels). With probability ``1 - prob`` the deterministic box is used.
    Seed with :meth:`set_random_state`: the same seed gives the identical patch.

    Args:
        structure: id, ids (union) or name of the structure.
        margin: see :class:`CropStructure`.
        spatial_size: output patch size; ``None`` keeps the (random) box size.
        label_names: name map, needed for names.
        min_size: minimal box size in voxels per axis (before the random scaling).
        jitter: maximal centre shift as a fraction of the box size (per axis).
        scale_range: range of the isotropic box scale factor.
        prob: probability of randomising the box.
        mode: image interpolation for resizing.
        label_mode: label interpolation for resizing.

    Raises:
        KeyError: unknown structure name.
        ValueError: the structure is absent; ``jitter < 0`` or an invalid ``scale_range``.

    Example::

        rand_crop = RandCropStructure("liver", spatial_size=(32, 32, 32), label_names=names).set_random_state(0)
        view, view_label = rand_crop(ct, seg)
    """

    def __init__(
        self,
        structure: StructureSpec,
        margin: Sequence[int | float] | int | float = 0.1,
        spatial_size: Sequence[int] | int | None = None,
        label_names: Mapping | None = None,
        min_size: Sequence[int] | int = 1,
        jitter: float = 0.1,
        scale_range: tuple[float, float] = (0.9, 1.2),
        prob: float = 1.0,
        mode: str = "trilinear",
        label_mode: str = "nearest-exact",
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        CropStructure.__init__(self, structure, margin, spatial_size, label_names, min_size, mode, label_mode)
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}.")
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}.")
        self.jitter = float(jitter)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self._shift = np.zeros(_SPATIAL_DIMS)
        self._scale = 1.0

    def randomize(self, data: Any = None) -> None:
        """Draw the centre shift (fraction of the box per axis) and the scale factor."""
        super().randomize(None)
        if not self._do_transform:
            return
        self._shift = self.R.uniform(-self.jitter, self.jitter, _SPATIAL_DIMS)
        self._scale = float(self.R.uniform(*self.scale_range))

    def perturb_box(self, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Apply the last drawn shift and scale to a box (identity when the transform was not drawn)."""
        if not self._do_transform:
            return start, end
        size = (end - start).astype(np.float64)
        centre = (start + end) / 2.0 + self._shift * size
        new_size = np.maximum(np.rint(size * self._scale), 1).astype(np.int64)
        new_start = np.floor(centre - new_size / 2.0 + 0.5).astype(np.int64)
        return new_start, new_start + new_size

    def __call__(self, img: Any, label: Any, randomize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image_patch, label_patch)`` cropped with the same random box."""
        start, end = self.compute_box(label)
        if randomize:
            self.randomize()
        start, end = self.perturb_box(start, end)
        return self.crop_box(img, start, end), self.crop_box(label, start, end, pad_value=0, mode=self.label_mode)


class RemapLabels(Transform):
    """Map class names or ids to episode-local labels ``start, start+1, ..., start+N-1`` in the order of ``classes``.

    Classification (default ``start=0``, ``background=None``): every value must be one of ``classes``
    (``classes[i] -> i``), otherwise ``KeyError``. Label maps: pass ``background`` (e.g. ``0``) so that every
    voxel not in ``classes`` becomes ``background``; use ``start=1`` to keep ``0`` for the background
    (``RemapLabels([5, 2], start=1, background=0)``: liver -> 1, right kidney -> 2, rest -> 0).

    Works on Python scalars (-> ``int``), lists/tuples (-> ``list``), numpy arrays (-> ``int64`` array) and
    tensors (-> ``int64`` tensor; MetaTensor metadata is kept). String classes work on scalars, lists and
    numpy string arrays. :meth:`invert` maps local labels back (``inverse_classes`` is the dict).

    Args:
        classes: the episode's classes (names or ids), in label order; no duplicates.
        start: the first local label.
        background: value for entries not in ``classes``; ``None`` (default) makes them an error.
        inverse_background: what :meth:`invert` returns for ``background`` entries (default ``0``).

    Raises:
        ValueError: duplicate or empty ``classes``, or ``background`` colliding with a local label.
        KeyError: (on call) a value not in ``classes`` while ``background is None``; the message names the
            unknown values and the classes.

    Example::

        remap = RemapLabels(["liver", "spleen", "kidney_left"])
        remap(["spleen", "liver"])  # [1, 0]
        remap.invert([1, 0])        # ["spleen", "liver"]
    """

    def __init__(
        self,
        classes: Sequence[Hashable],
        start: int = 0,
        background: int | None = None,
        inverse_background: Hashable = 0,
    ) -> None:
        classes = [c.item() if isinstance(c, (np.generic, torch.Tensor)) else c for c in classes]
        if len(classes) == 0:
            raise ValueError("classes must not be empty.")
        if len(set(classes)) != len(classes):
            dup = sorted({repr(c) for c in classes if classes.count(c) > 1})
            raise ValueError(f"duplicate classes: {', '.join(dup)}.")
        self.classes = list(classes)
        self.start = int(start)
        self.background = None if background is None else int(background)
        if self.background is not None and self.start <= self.background < self.start + len(self.classes):
            raise ValueError(
                f"background={self.background} collides with the local labels "
                f"{self.start}..{self.start + len(self.classes) - 1}."
            )
        self.inverse_background = inverse_background
        self.class_to_label = {c: self.start + i for i, c in enumerate(self.classes)}
        self.inverse_classes = {self.start + i: c for i, c in enumerate(self.classes)}

    def _unknown(self, values: Sequence) -> KeyError:
        shown = ", ".join(repr(v) for v in list(values)[:10]) + (" ..." if len(values) > 10 else "")
        return KeyError(f"unknown class(es) {shown}; classes are {self.classes}")

    def _map_one(self, value: Any) -> int:
        key = value.item() if isinstance(value, (np.generic, torch.Tensor)) else value
        if isinstance(key, float) and key.is_integer():
            key = int(key)
        if key in self.class_to_label:
            return self.class_to_label[key]
        if self.background is None:
            raise self._unknown([key])
        return self.background

    def __call__(self, labels: Any) -> Any:
        """Map ``labels`` (scalar, list, numpy array or tensor) to local labels."""
        if isinstance(labels, torch.Tensor):
            return self._map_tensor(labels)
        if isinstance(labels, np.ndarray):
            if labels.dtype.kind in "biuf":
                return self._map_tensor(torch.as_tensor(labels)).numpy()
            flat = [self._map_one(v) for v in labels.reshape(-1).tolist()]
            return np.asarray(flat, dtype=np.int64).reshape(labels.shape)
        if isinstance(labels, (list, tuple)):
            return [self(v) for v in labels]
        return self._map_one(labels)

    def _map_tensor(self, labels: torch.Tensor) -> torch.Tensor:
        numeric = [c for c in self.classes if isinstance(c, (int, float)) and not isinstance(c, bool)]
        lab = labels.as_tensor() if isinstance(labels, MetaTensor) else labels
        fill = -1 if self.background is None else self.background
        out = torch.full(lab.shape, fill, dtype=torch.int64, device=lab.device)
        matched = torch.zeros(lab.shape, dtype=torch.bool, device=lab.device)
        for c in numeric:
            hit = lab == c
            out[hit] = self.class_to_label[c]
            matched |= hit
        if self.background is None and not bool(matched.all()):
            raise self._unknown(torch.unique(lab[~matched]).tolist())
        return _like(out, labels)

    def invert(self, labels: Any) -> Any:
        """Map local labels back to the classes (``background`` entries -> ``inverse_background``).

        Tensors and numeric arrays come back as tensors/arrays when the classes are numbers, else as (nested)
        lists.

        Raises:
            KeyError: a value that is neither a local label nor the background.
        """
        if isinstance(labels, (torch.Tensor, np.ndarray)):
            numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in self.classes)
            numeric = numeric and isinstance(self.inverse_background, (int, float))
            if labels.ndim == 0:
                return self.invert(labels.item())
            if not numeric:
                return [self.invert(v) for v in labels]
            t = torch.as_tensor(labels)
            vals = torch.as_tensor([float(c) for c in self.classes], dtype=torch.float64)
            idx = t.long() - self.start
            valid = (idx >= 0) & (idx < len(self.classes))
            is_bg = (t == self.background) if self.background is not None else torch.zeros_like(valid)
            if not bool((valid | is_bg).all()):
                raise self._unknown_local(torch.unique(t[~(valid | is_bg)]).tolist())
            out = torch.where(valid, vals[idx.clamp(0, len(self.classes) - 1)], float(self.inverse_background))
            if all(isinstance(c, int) for c in self.classes) and isinstance(self.inverse_background, int):
                out = out.long()
            if isinstance(labels, np.ndarray):
                return out.numpy()
            return _like(out, labels)
        if isinstance(labels, (list, tuple)):
            return [self.invert(v) for v in labels]
        key = labels.item() if isinstance(labels, np.generic) else labels
        if isinstance(key, float) and key.is_integer():
            key = int(key)
        if key in self.inverse_classes:
            return self.inverse_classes[key]
        if self.background is not None and key == self.background:
            return self.inverse_background
        raise self._unknown_local([key])

    def _unknown_local(self, values: Sequence) -> KeyError:
        return KeyError(
            f"unknown local label(s) {list(values)[:10]}; local labels are "
            f"{self.start}..{self.start + len(self.classes) - 1} for classes {self.classes}"
        )


class RandSynthesizeImage(RandomizableTransform):
    """SYNTHETIC image from a label map, SynthSeg-style (Billot et al., 2023); returns ``(image, label)``.

    .. warning::
        The output image is **SYNTHETIC**: it is generated from the label map alone and is not a scan. Its
        MetaTensor carries ``meta["synthetic"] = True``; any result obtained on such images must be reported
        as obtained on synthetic images.

    Recipe, all drawn once per call from this transform's random state (``set_random_state``):

    1. deform the label map (nearest neighbour, so image and label stay aligned): a random affine
       (MONAI :class:`~monai.transforms.RandAffineGrid`) plus a smooth non-linear field, a coarse
       ``elastic_points ** 3`` grid of Gaussian displacements (std ``U(0, elastic_magnitude)`` voxels) upsampled
       trilinearly, as in SynthSeg; resampled with MONAI :class:`~monai.transforms.Resample`. (MONAI's
       ``Rand3DElastic`` smooths a full-resolution field and takes ~3 s at 128^3, hence the coarse field.)
    2. per label: mean ``U(*mean_range)`` and std ``U(*std_range)`` -> piecewise Gaussian image;
    3. Gaussian blur with random per-axis sigma (:class:`~monai.transforms.RandGaussianSmooth`);
    4. multiplicative bias field (:class:`~monai.transforms.RandBiasField`);
    5. min-max normalisation to [0, 1] (:class:`~monai.transforms.ScaleIntensity`), additive Gaussian noise
       with std ``U(0, noise_std)`` (:class:`~monai.transforms.RandGaussianNoise`), optional gamma
       (:class:`~monai.transforms.RandAdjustContrast`), and min-max normalisation to [0, 1] again.

    The label map is deformed, not relabelled; the image gets the label's affine and metadata plus
    ``synthetic=True``. Labels must be numbers (any ids, e.g. FreeSurfer's up to 2035).

    Args:
        mean_range: range of the per-label mean intensity.
        std_range: range of the per-label intensity std (same units as ``mean_range``).
        deform: apply the spatial deformation (affine + non-linear).
        rotate_range: rotation range in radians (MONAI ``RandAffineGrid`` convention).
        scale_range: scale range (MONAI convention: ``0.15`` means factors in ``[0.85, 1.15]``).
        shear_range: shear range (MONAI convention).
        translate_range: translation range in voxels.
        elastic_magnitude: maximal std of the non-linear displacement, in voxels (0 disables it).
        elastic_points: control points per axis of the non-linear field.
        padding_mode: ``grid_sample`` padding for the deformed label map (``"border"`` repeats edge labels).
        blur_sigma_range: per-axis range of the blur sigma in voxels.
        blur_prob: probability of blurring.
        bias_coeff_range: range of the Legendre coefficients of the log bias field.
        bias_degree: degree of the bias field polynomial.
        bias_prob: probability of the bias field.
        noise_std: maximal std of the additive noise, on the [0, 1] scale.
        noise_prob: probability of the noise.
        gamma_range: range of the gamma exponent.
        gamma_prob: probability of the gamma transform.
        dtype: image dtype.

    Raises:
        TypeError: the label map is not numeric.

    Example::

        synth = RandSynthesizeImage().set_random_state(0)
        image, label = synth(label_map)      # image in [0, 1], image.meta["synthetic"] is True
    """

    def __init__(
        self,
        mean_range: tuple[float, float] = (0.0, 255.0),
        std_range: tuple[float, float] = (0.0, 25.0),
        deform: bool = True,
        rotate_range: Sequence[float] | float = 0.26,
        scale_range: Sequence[float] | float = 0.15,
        shear_range: Sequence[float] | float = 0.012,
        translate_range: Sequence[float] | float = 0.0,
        elastic_magnitude: float = 3.0,
        elastic_points: int = 6,
        padding_mode: str = "border",
        blur_sigma_range: tuple[float, float] = (0.3, 1.0),
        blur_prob: float = 1.0,
        bias_coeff_range: tuple[float, float] = (-0.15, 0.15),
        bias_degree: int = 3,
        bias_prob: float = 1.0,
        noise_std: float = 0.03,
        noise_prob: float = 1.0,
        gamma_range: tuple[float, float] = (0.7, 1.5),
        gamma_prob: float = 0.5,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        self.mean_range = (float(mean_range[0]), float(mean_range[1]))
        self.std_range = (float(std_range[0]), float(std_range[1]))
        if self.mean_range[0] > self.mean_range[1] or not 0 <= self.std_range[0] <= self.std_range[1]:
            raise ValueError(f"invalid mean_range {mean_range} or std_range {std_range}.")
        self.deform = deform
        self.elastic_magnitude = float(elastic_magnitude)
        self.elastic_points = max(2, int(elastic_points))
        self.padding_mode = padding_mode
        self.dtype = dtype
        self.affine_grid = RandAffineGrid(
            rotate_range=rotate_range, shear_range=shear_range, translate_range=translate_range, scale_range=scale_range
        )
        self.resampler = Resample(mode="nearest", padding_mode=padding_mode, norm_coords=True, dtype=torch.float32)
        self.blur = RandGaussianSmooth(blur_sigma_range, blur_sigma_range, blur_sigma_range, prob=blur_prob)
        self.bias = RandBiasField(degree=bias_degree, coeff_range=bias_coeff_range, prob=bias_prob)
        self.noise = RandGaussianNoise(prob=noise_prob, mean=0.0, std=noise_std, sample_std=True)
        self.gamma = RandAdjustContrast(prob=gamma_prob, gamma=gamma_range)
        self.scale = ScaleIntensity(minv=0.0, maxv=1.0)
        self._inner = (self.affine_grid, self.blur, self.bias, self.noise, self.gamma)
        self._share_state()
        self.labels = torch.zeros(0)
        self.means = np.zeros(0)
        self.stds = np.zeros(0)

    def _share_state(self) -> None:
        for t in self._inner:
            t.set_random_state(state=self.R)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """Seed this transform and its MONAI components (they all draw from one random stream)."""
        super().set_random_state(seed, state)
        self._share_state()
        return self

    @property
    def intensity_table(self) -> dict[float, tuple[float, float]]:
        """``{label: (mean, std)}`` drawn by the last call (before blur, bias, noise and normalisation)."""
        return {float(v): (float(m), float(s)) for v, m, s in zip(self.labels.tolist(), self.means, self.stds)}

    def randomize(self, data: Any = None) -> None:
        """Draw the per-label means and stds for the labels present in ``data`` (a label tensor)."""
        super().randomize(None)
        self.labels = self._present_labels(data) if data is not None else torch.zeros(0)
        n = int(self.labels.numel())
        self.means = self.R.uniform(*self.mean_range, n)
        self.stds = self.R.uniform(*self.std_range, n)

    @staticmethod
    def _present_labels(lab: torch.Tensor) -> torch.Tensor:
        if lab.dtype == torch.bool:
            lab = lab.to(torch.uint8)
        if lab.is_complex():
            raise TypeError(f"label map must be numeric, got {lab.dtype}.")
        lo, hi = float(lab.min()), float(lab.max())
        integral = not lab.is_floating_point() or bool(torch.equal(lab, torch.round(lab)))
        if integral and lo >= 0 and hi < 2**20:
            counts = torch.bincount(lab.reshape(-1).long(), minlength=int(hi) + 1)
            return torch.nonzero(counts).reshape(-1).to(torch.float64)
        return torch.unique(lab).to(torch.float64)

    def _deform(self, label: torch.Tensor) -> torch.Tensor:
        spatial = label.shape[1:]
        grid = create_grid(spatial, dtype=torch.float32, backend="torch", device=label.device)
        if self.elastic_magnitude > 0:
            std = self.R.uniform(0.0, self.elastic_magnitude)
            coarse = self.R.normal(0.0, 1.0, (len(spatial),) + (self.elastic_points,) * len(spatial)) * std
            coarse_t = torch.as_tensor(coarse, dtype=torch.float32, device=label.device)
            field = Resize(spatial, mode="trilinear", align_corners=True)(coarse_t)
            grid[: len(spatial)] += convert_to_tensor(field, track_meta=False)
        grid = self.affine_grid(grid=grid)
        lab = label.as_tensor() if isinstance(label, MetaTensor) else label
        out = self.resampler(lab.to(torch.float32), convert_to_tensor(grid, track_meta=False))
        out = convert_to_tensor(out, track_meta=False).to(label.dtype)
        return _like(out, label)

    def __call__(self, label: Any, randomize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthesize an image from ``label`` (channel-first ``[1, D, H, W]``).

        Args:
            label: label map.
            randomize: draw new parameters (default); ``False`` re-uses the per-label intensities of the last
                call (the deformation, blur, bias, noise and gamma are always drawn anew).

        Returns:
            ``(image, deformed_label)``: the SYNTHETIC image (``dtype``, in [0, 1], ``meta["synthetic"] = True``)
            and the deformed label map it is aligned with (same dtype as ``label``).
        """
        label = convert_to_tensor(label, track_meta=get_track_meta())
        if self.deform:
            label = self._deform(label)
        lab = label.as_tensor() if isinstance(label, MetaTensor) else label
        if randomize:
            self.randomize(lab)
        labels = self.labels.to(device=lab.device)
        means = torch.as_tensor(self.means, dtype=torch.float32, device=lab.device)
        stds = torch.as_tensor(self.stds, dtype=torch.float32, device=lab.device)
        idx = torch.searchsorted(labels, lab.to(torch.float64).contiguous()).clamp_(max=max(len(labels) - 1, 0))
        if not bool((labels[idx] == lab).all()):
            raise ValueError("the label map has labels without sampled intensities; call with randomize=True.")
        img = means[idx]
        if float(self.std_range[1]) > 0:
            gauss = torch.as_tensor(self.R.standard_normal(tuple(lab.shape)), dtype=torch.float32, device=lab.device)
            img = img + stds[idx] * gauss
        img = convert_to_tensor(self.blur(img), track_meta=False)
        img = convert_to_tensor(self.bias(img), track_meta=False)
        img = convert_to_tensor(self.noise(self.scale(img)), track_meta=False)
        img = self.scale(convert_to_tensor(self.gamma(img), track_meta=False))
        img = torch.clamp(convert_to_tensor(img, track_meta=False), 0.0, 1.0).to(self.dtype)
        return _like(img, label, synthetic=True), label
