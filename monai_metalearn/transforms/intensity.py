"""Intensity handling chosen per image, body masks, and the ignore label of meta-training masks.

Every datalist item of :mod:`monai_metalearn.data.sources` says what its intensities are (``item["intensity"]``):

* ``"ct_hu"``: CT in Hounsfield units: clipped to the abdominal window :data:`CT_WINDOW` and scaled to ``[0, 1]``;
* ``"ct_windowed"``: CT already display-windowed (e.g. BTCV as preprocessed for SSL-ALPNet, 8-bit 0..255);
* ``"mr"``: MRI of any scale;
* ``"binary"``: shape masks (AdrenalMNIST3D).

Only ``ct_hu`` gets the HU window. Windowed CT and MRI are scaled per image, through their 0.5 and 99.5
percentiles: a HU window on 8-bit or MR intensities would clip everything to one value. When a task file or a user's
scan does not say what it holds, :func:`infer_intensity` decides from the values (Hounsfield air below -500 means
``ct_hu``) and never assumes HU otherwise.

:func:`body_mask` is the subject's body (largest connected component above a threshold on the scaled image, holes
filled): the trivial "whole body" reference of the segmentation protocols and the start of the box-aligned one.

:data:`IGNORE_LABEL` marks voxels of a binary meta-training mask that no loss, no prototype and no patch centre may
use: the held-out test structures of the training scans in setting 2 of the abdominal protocol.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = [
    "CT_WINDOW",
    "INTENSITY_KINDS",
    "IGNORE_LABEL",
    "check_intensity_kind",
    "infer_intensity",
    "scale_intensity",
    "body_mask",
    "ScaleIntensityByKind",
    "ScaleIntensityByKindd",
    "BodyMask",
    "BodyMaskd",
]

#: CT intensities in Hounsfield units are clipped to this window and scaled to [0, 1]: soft-tissue organs keep their
#: contrast. Applied to ``"ct_hu"`` images only.
CT_WINDOW = (-250.0, 350.0)

#: The intensity kinds an item can declare (``item["intensity"]``).
INTENSITY_KINDS = ("ct_hu", "ct_windowed", "mr", "binary")

#: Value of the voxels of a meta-training mask that must be ignored (neither structure nor background).
IGNORE_LABEL = -1


def check_intensity_kind(kind: Any) -> str:
    """``kind`` if it is one of :data:`INTENSITY_KINDS`, else a ``ValueError`` listing them."""
    if kind not in INTENSITY_KINDS:
        raise ValueError(f"unknown intensity kind {kind!r}; expected one of {list(INTENSITY_KINDS)}.")
    return str(kind)


def infer_intensity(image: torch.Tensor | np.ndarray, modality: str | None = None) -> str:
    """The intensity kind of an image whose item does not declare one.

    * ``modality="MR"``: ``"mr"``;
    * Hounsfield-like air (minimum below -500): ``"ct_hu"``;
    * ``modality="CT"`` without such air: ``"ct_windowed"`` (scaled per image, never through the HU window);
    * only the values 0 and 1: ``"binary"``;
    * otherwise ``"mr"`` (scaled per image).

    Args:
        image: the image, any shape.
        modality: ``"CT"``, ``"MR"`` or ``None`` (unknown).

    Raises:
        ValueError: for a modality other than ``"CT"``, ``"MR"`` or ``None``.
    """
    mod = None if modality is None else str(modality).upper()
    if mod not in (None, "CT", "MR"):
        raise ValueError(f"modality must be 'CT', 'MR' or None, got {modality!r}.")
    if mod == "MR":
        return "mr"
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if float(x.min()) < -500:
        return "ct_hu"
    if mod == "CT":
        return "ct_windowed"
    if x.numel() and bool(((x == 0) | (x == 1)).all()):
        return "binary"
    return "mr"


def _percentiles(x: torch.Tensor, low: float = 0.005, high: float = 0.995) -> tuple[float, float]:
    flat = x.reshape(-1)
    nonzero = flat[flat != 0]
    ref = nonzero if nonzero.numel() > 0.05 * flat.numel() else flat
    if ref.numel() > 2_000_000:  # quantile on a subsample: same figure, a fraction of the time
        ref = ref[torch.randperm(ref.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]
    lo, hi = (float(v) for v in torch.quantile(ref.float(), torch.tensor([low, high])))
    return lo, hi


def scale_intensity(image: torch.Tensor, intensity: str | None) -> torch.Tensor:
    """``image`` scaled to ``[0, 1]`` by its intensity kind (see the module docstring).

    ``"ct_hu"``: through :data:`CT_WINDOW`; ``"binary"``: unchanged (as float); ``"ct_windowed"`` / ``"mr"``: through
    the image's own 0.5 and 99.5 percentiles, computed on the non-zero voxels when the background is exactly zero
    (skull-stripped MRI, the air of windowed CT). ``None``: :func:`infer_intensity` decides. For backward
    compatibility ``"CT"`` means ``"ct_hu"`` and ``"MR"`` means ``"mr"``.

    Raises:
        ValueError: for an unknown kind.
    """
    x = torch.as_tensor(image).float()
    kind = {"CT": "ct_hu", "MR": "mr"}.get(str(intensity).upper(), intensity) if intensity is not None else None
    kind = infer_intensity(x) if kind is None else check_intensity_kind(kind)
    if kind == "binary":
        return x.clone()
    lo, hi = CT_WINDOW if kind == "ct_hu" else _percentiles(x)
    if hi <= lo:
        return torch.zeros_like(x)
    return ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)


def body_mask(image: torch.Tensor, threshold: float = 0.1, fill_holes: bool = True) -> torch.Tensor:
    """The body of a scaled scan: the largest connected component of ``image > threshold``, holes filled.

    Args:
        image: an intensity-scaled scan (``[0, 1]``, see :func:`scale_intensity`), ``[*S]`` or ``[1, *S]``.
        threshold: intensity separating air (and MR background) from tissue; 0.1 of the scaled range keeps fat in
            CT (about -190 HU through :data:`CT_WINDOW`, about 25/255 in 8-bit windowed CT) and MR soft tissue.
        fill_holes: fill enclosed air (lungs, bowel gas) in 3D and in every axial slice.

    Returns:
        A bool tensor of the shape of ``image`` on its device; empty when no voxel exceeds ``threshold``.
    """
    from scipy import ndimage

    x = torch.as_tensor(image)
    arr = (x.detach().float().cpu().numpy() > float(threshold))
    squeeze = arr.ndim == 4 and arr.shape[0] == 1
    vol = arr[0] if squeeze else arr
    labels, n = ndimage.label(vol)
    if n == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(sizes.argmax())
    if fill_holes:
        body = ndimage.binary_fill_holes(body)
        for k in range(body.shape[-1]):
            body[..., k] = ndimage.binary_fill_holes(body[..., k])
    out = torch.from_numpy(body[None] if squeeze else body)
    return out.to(x.device)


class ScaleIntensityByKind(Transform):
    """Array version of :func:`scale_intensity`: ``ScaleIntensityByKind("ct_windowed")(image)``.

    Args:
        intensity: one of :data:`INTENSITY_KINDS`, or ``None`` to infer it per image (:func:`infer_intensity`).
        modality: passed to :func:`infer_intensity` when ``intensity`` is ``None``.
    """

    def __init__(self, intensity: str | None = None, modality: str | None = None) -> None:
        self.intensity = None if intensity is None else check_intensity_kind(intensity)
        self.modality = modality

    def __call__(self, img: torch.Tensor, intensity: str | None = None) -> torch.Tensor:
        kind = intensity or self.intensity or infer_intensity(img, self.modality)
        return scale_intensity(img, kind)


class ScaleIntensityByKindd(MapTransform):
    """Dictionary version of :class:`ScaleIntensityByKind`: the kind is read from ``d[intensity_key]`` (a datalist
    item's ``intensity``), else inferred from ``d[modality_key]`` and the values.

    Args:
        keys: image keys to scale.
        intensity_key: key of the item's intensity kind.
        modality_key: key of the item's modality (``"CT"``/``"MR"``), used when the kind is absent.
        allow_missing_keys: skip absent image keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        intensity_key: str = "intensity",
        modality_key: str = "modality",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.intensity_key, self.modality_key = intensity_key, modality_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            kind = d.get(self.intensity_key) or infer_intensity(d[key], d.get(self.modality_key))
            d[key] = scale_intensity(d[key], kind)
        return d


class BodyMask(Transform):
    """Array version of :func:`body_mask`."""

    def __init__(self, threshold: float = 0.1, fill_holes: bool = True) -> None:
        self.threshold, self.fill_holes = float(threshold), bool(fill_holes)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return body_mask(img, self.threshold, self.fill_holes)


class BodyMaskd(MapTransform):
    """Dictionary version of :func:`body_mask`: ``d[output_key] = body_mask(d[key])`` (a float 0/1 mask).

    Args:
        keys: the image key (one).
        output_key: where the mask goes (default ``"body"``).
        threshold, fill_holes: see :func:`body_mask`.
    """

    def __init__(self, keys: KeysCollection, output_key: str = "body", threshold: float = 0.1,
                 fill_holes: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_key = output_key
        self.body = BodyMask(threshold, fill_holes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = self.body(d[key]).float()
        return d
