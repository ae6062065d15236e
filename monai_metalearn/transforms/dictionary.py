"""Dictionary wrappers of :mod:`monai_metalearn.transforms.array` (MONAI style; names end with ``d``/``D``/``Dict``).

The structure to select or crop can be fixed (``structure=``) or read per item (``structure_key=``, e.g. an
item's ``"class"``), and so can the name map (``label_names=`` or ``label_names_key=``, e.g. an item's
``"structures"`` dict name -> id).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.transforms.transform import MapTransform, RandomizableTransform
from monai.utils import ensure_tuple, ensure_tuple_rep

from monai_metalearn.transforms.array import (
    CropStructure,
    RandCropStructure,
    RandSynthesizeImage,
    RemapLabels,
    SelectStructure,
    StructureSpec,
)

__all__ = [
    "SelectStructured",
    "SelectStructureD",
    "SelectStructureDict",
    "CropStructured",
    "CropStructureD",
    "CropStructureDict",
    "RandCropStructured",
    "RandCropStructureD",
    "RandCropStructureDict",
    "RemapLabelsd",
    "RemapLabelsD",
    "RemapLabelsDict",
    "RandSynthesizeImaged",
    "RandSynthesizeImageD",
    "RandSynthesizeImageDict",
]


def _item_structure(
    d: Mapping, structure: StructureSpec | None, structure_key: Hashable | None
) -> StructureSpec:
    if structure_key is not None:
        if structure_key not in d:
            raise KeyError(f"structure_key {structure_key!r} is not in the data (keys: {list(d)}).")
        return d[structure_key]
    if structure is None:
        raise ValueError("either structure or structure_key must be given.")
    return structure


def _item_names(d: Mapping, label_names: Mapping | None, label_names_key: Hashable | None) -> Mapping | None:
    if label_names_key is not None:
        if label_names_key not in d:
            raise KeyError(f"label_names_key {label_names_key!r} is not in the data (keys: {list(d)}).")
        return d[label_names_key]
    return label_names


def _check_structure_args(structure: Any, structure_key: Any) -> None:
    if (structure is None) == (structure_key is None):
        raise ValueError("give exactly one of structure and structure_key.")


class SelectStructured(MapTransform):
    """Dictionary version of :class:`~monai_metalearn.transforms.array.SelectStructure`.

    Args:
        keys: label map keys.
        structure: fixed structure (id, ids or name); exclusive with ``structure_key``.
        structure_key: key of the item's structure (e.g. ``"class"``).
        label_names: fixed ``{name: id(s)}`` / ``{id: name}`` map.
        label_names_key: key of the item's name map (e.g. ``"structures"``); overrides ``label_names``.
        output_key: where to write the mask(s) (a key, or one per key); ``None`` replaces the label map.
        dtype: mask dtype.
        allow_missing_keys: don't raise if a key is missing.

    Raises:
        KeyError: unknown structure name, or missing ``structure_key``/``label_names_key`` entry.
        ValueError: the structure is absent from the label map (the message names it and the file).

    Example::

        select = SelectStructured("label", structure_key="class", label_names_key="structures", output_key="mask")
        out = select({"label": seg, "class": "liver", "structures": {"liver": 5}})  # out["mask"]: [1, D, H, W]
    """

    def __init__(
        self,
        keys: KeysCollection,
        structure: StructureSpec | None = None,
        structure_key: Hashable | None = None,
        label_names: Mapping | None = None,
        label_names_key: Hashable | None = None,
        output_key: KeysCollection | None = None,
        dtype: DtypeLike | torch.dtype = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        _check_structure_args(structure, structure_key)
        self.structure_key = structure_key
        self.label_names_key = label_names_key
        self.output_keys = ensure_tuple_rep(None, len(self.keys)) if output_key is None else ensure_tuple(output_key)
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"output_key must give one key per key: {len(self.output_keys)} vs {len(self.keys)}.")
        self.selector = SelectStructure(structure if structure is not None else 0, label_names, dtype)
        self.structure = structure

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        structure = _item_structure(d, self.structure, self.structure_key)
        names = _item_names(d, self.selector.label_names, self.label_names_key)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[key if out_key is None else out_key] = self.selector(d[key], structure=structure, label_names=names)
        return d


class CropStructured(MapTransform):
    """Dictionary version of :class:`~monai_metalearn.transforms.array.CropStructure`.

    The box is computed from ``d[label_key]`` and applied to every key; image keys are padded with their
    minimum and resized with ``mode``, the label map (cropped when ``crop_label``, even if not in ``keys``) is
    padded with 0 and resized with ``label_mode``. Margin semantics: see ``CropStructure`` (int = voxels per
    side, float = fraction of the box size per side).

    Args:
        keys: image keys to crop.
        label_key: key of the multi-label map that defines the box.
        structure: fixed structure (id, ids or name); exclusive with ``structure_key``.
        structure_key: key of the item's structure (e.g. ``"class"``).
        label_names: fixed name map.
        label_names_key: key of the item's name map; overrides ``label_names``.
        margin: margin per side (int voxels / float fraction of the box).
        spatial_size: output patch size, ``None`` keeps the box size.
        min_size: minimal box size per axis, voxels.
        mode: image interpolation for resizing, one or one per key.
        label_mode: label interpolation for resizing.
        crop_label: also crop ``d[label_key]``.
        allow_missing_keys: don't raise if a key is missing.

    Raises:
        KeyError: unknown structure name.
        ValueError: the structure is absent from the label map.

    Example::

        crop = CropStructured("image", "label", structure="liver", label_names=names, spatial_size=32)
        out = crop({"image": ct, "label": seg})  # out["image"], out["label"]: [1, 32, 32, 32]
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: Hashable,
        structure: StructureSpec | None = None,
        structure_key: Hashable | None = None,
        label_names: Mapping | None = None,
        label_names_key: Hashable | None = None,
        margin: Sequence[int | float] | int | float = 0.1,
        spatial_size: Sequence[int] | int | None = None,
        min_size: Sequence[int] | int = 1,
        mode: Sequence[str] | str = "trilinear",
        label_mode: str = "nearest-exact",
        crop_label: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        _check_structure_args(structure, structure_key)
        self.label_key = label_key
        self.structure = structure
        self.structure_key = structure_key
        self.label_names_key = label_names_key
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.crop_label = crop_label
        self.cropper = self._make_cropper(
            structure=structure if structure is not None else 0,
            margin=margin,
            spatial_size=spatial_size,
            label_names=label_names,
            min_size=min_size,
            label_mode=label_mode,
        )

    def _make_cropper(self, **kwargs: Any) -> CropStructure:
        return CropStructure(**kwargs)

    def _box(self, d: Mapping) -> tuple[np.ndarray, np.ndarray]:
        structure = _item_structure(d, self.structure, self.structure_key)
        names = _item_names(d, self.cropper.label_names, self.label_names_key)
        return self.cropper.compute_box(d[self.label_key], structure=structure, label_names=names)

    def _apply(self, d: dict, start: np.ndarray, end: np.ndarray) -> dict:
        label = d[self.label_key]
        for key, mode in self.key_iterator(d, self.mode):
            if key != self.label_key:
                d[key] = self.cropper.crop_box(d[key], start, end, mode=mode)
        if self.crop_label or self.label_key in self.keys:
            d[self.label_key] = self.cropper.crop_box(label, start, end, pad_value=0, mode=self.cropper.label_mode)
        return d

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        start, end = self._box(d)
        return self._apply(d, start, end)


class RandCropStructured(RandomizableTransform, CropStructured):
    """Dictionary version of :class:`~monai_metalearn.transforms.array.RandCropStructure`.

    All keys are cropped with the same random box. Seed with :meth:`set_random_state` (forwarded to the inner
    array transform): the same seed gives identical patches.

    Args:
        keys: image keys to crop.
        label_key: key of the multi-label map that defines the box.
        structure: fixed structure; exclusive with ``structure_key``.
        structure_key: key of the item's structure.
        label_names: fixed name map.
        label_names_key: key of the item's name map.
        margin: margin per side (int voxels / float fraction of the box).
        spatial_size: output patch size, ``None`` keeps the box size.
        min_size: minimal box size per axis, voxels.
        jitter: maximal centre shift, fraction of the box size.
        scale_range: range of the isotropic box scale factor.
        prob: probability of randomising the box (else the deterministic ``CropStructured`` box).
        mode: image interpolation for resizing, one or one per key.
        label_mode: label interpolation for resizing.
        crop_label: also crop ``d[label_key]``.
        allow_missing_keys: don't raise if a key is missing.

    Raises:
        KeyError: unknown structure name.
        ValueError: the structure is absent from the label map.

    Example::

        rand_crop = RandCropStructured("image", "label", structure_key="class", label_names=names, spatial_size=32)
        rand_crop.set_random_state(0)
        view = rand_crop({"image": ct, "label": seg, "class": "liver"})
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: Hashable,
        structure: StructureSpec | None = None,
        structure_key: Hashable | None = None,
        label_names: Mapping | None = None,
        label_names_key: Hashable | None = None,
        margin: Sequence[int | float] | int | float = 0.1,
        spatial_size: Sequence[int] | int | None = None,
        min_size: Sequence[int] | int = 1,
        jitter: float = 0.1,
        scale_range: tuple[float, float] = (0.9, 1.2),
        prob: float = 1.0,
        mode: Sequence[str] | str = "trilinear",
        label_mode: str = "nearest-exact",
        crop_label: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        self._jitter, self._scale_range = jitter, scale_range
        CropStructured.__init__(
            self,
            keys,
            label_key,
            structure,
            structure_key,
            label_names,
            label_names_key,
            margin,
            spatial_size,
            min_size,
            mode,
            label_mode,
            crop_label,
            allow_missing_keys,
        )

    def _make_cropper(self, **kwargs: Any) -> CropStructure:
        return RandCropStructure(**kwargs, jitter=self._jitter, scale_range=self._scale_range, prob=1.0)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandCropStructured:
        super().set_random_state(seed, state)
        self.cropper.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        start, end = self._box(d)
        if self._do_transform:
            self.cropper.randomize()
            start, end = self.cropper.perturb_box(start, end)
        return self._apply(d, start, end)


class RemapLabelsd(MapTransform):
    """Dictionary version of :class:`~monai_metalearn.transforms.array.RemapLabels`.

    Args:
        keys: keys of the labels (class names/ids or label maps).
        classes: the episode's classes in label order; exclusive with ``classes_key``.
        classes_key: key of the item's class list (e.g. an episode's ``"classes"``).
        start: first local label.
        background: value for entries not in ``classes`` (``None``: error).
        inverse_background: :meth:`RemapLabels.invert` value for background entries.
        allow_missing_keys: don't raise if a key is missing.

    Raises:
        KeyError: a value not in ``classes`` (with ``background=None``).

    Example::

        RemapLabelsd("class", classes=["liver", "spleen"])({"class": "spleen"})  # {"class": 1}
    """

    def __init__(
        self,
        keys: KeysCollection,
        classes: Sequence[Hashable] | None = None,
        classes_key: Hashable | None = None,
        start: int = 0,
        background: int | None = None,
        inverse_background: Hashable = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if (classes is None) == (classes_key is None):
            raise ValueError("give exactly one of classes and classes_key.")
        self.classes_key = classes_key
        self.start, self.background, self.inverse_background = start, background, inverse_background
        self.remap = None if classes is None else RemapLabels(classes, start, background, inverse_background)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        remap = self.remap
        if remap is None:
            if self.classes_key not in d:
                raise KeyError(f"classes_key {self.classes_key!r} is not in the data (keys: {list(d)}).")
            remap = RemapLabels(d[self.classes_key], self.start, self.background, self.inverse_background)
        for key in self.key_iterator(d):
            d[key] = remap(d[key])
        return d


class RandSynthesizeImaged(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`~monai_metalearn.transforms.array.RandSynthesizeImage`.

    .. warning::
        The images it writes are **SYNTHETIC** (``meta["synthetic"] = True``) and must be reported as such.

    For each label key, the label map is replaced by its deformed version and the synthetic image aligned
    with it is written to the matching ``image_key``.

    Args:
        keys: label map keys.
        image_key: output image key(s), one per label key.
        prob: probability of synthesising; otherwise the item passes through unchanged (no image is written).
        only_if_missing: synthesise only for items that have no ``image_key`` yet (label-only subjects), leaving
            items with a real image untouched, so one pipeline serves a datalist that mixes both.
        allow_missing_keys: don't raise if a key is missing.
        kwargs: the parameters of :class:`~monai_metalearn.transforms.array.RandSynthesizeImage`.

    Raises:
        ValueError: ``image_key`` does not give one key per label key.

    Example::

        synth = RandSynthesizeImaged("label", image_key="image").set_random_state(0)
        out = synth({"label": brain_labels})  # out["image"] in [0, 1], out["label"] deformed
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: KeysCollection = "image",
        prob: float = 1.0,
        only_if_missing: bool = False,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.only_if_missing = only_if_missing
        self.image_keys = ensure_tuple(image_key)
        if len(self.image_keys) != len(self.keys):
            raise ValueError(f"image_key must give one key per label key: {self.image_keys} vs {self.keys}.")
        self.synth = RandSynthesizeImage(**kwargs)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandSynthesizeImaged:
        super().set_random_state(seed, state)
        self.synth.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key, image_key in self.key_iterator(d, self.image_keys):
            if self.only_if_missing and d.get(image_key) is not None:
                continue
            d[image_key], d[key] = self.synth(d[key])
        return d


SelectStructureD = SelectStructureDict = SelectStructured
CropStructureD = CropStructureDict = CropStructured
RandCropStructureD = RandCropStructureDict = RandCropStructured
RemapLabelsD = RemapLabelsDict = RemapLabelsd
RandSynthesizeImageD = RandSynthesizeImageDict = RandSynthesizeImaged
