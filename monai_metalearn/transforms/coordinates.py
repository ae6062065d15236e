"""Where a patch lies in the body: body-frame coordinate channels (CoordConv in the patient's own frame).

A structure patch resized to a fixed size has lost two things that tell organs apart in every subject and every
modality: where it sits in the body and how large it is. :func:`body_box` measures the body's bounding box in world
(RAS, mm) coordinates once per scan; :class:`BodyCoordinates` then appends three channels to any patch cut from that
scan, each voxel's world position mapped to ``[-1, 1]`` across the body's box along R, A and S. The patch's
``affine`` (kept by MONAI's crops and resizes) says where its voxels are, so the channels follow any crop, jitter,
padding or resampling, and they mean the same thing in CT and MR, in a 257 x 257 x 148 BTCV scan and a 256 x 256 x 37
CHAOS one.

Example::

    box = body_box(scale_intensity(ct, "ct_windowed"))              # [6]: lo_R, lo_A, lo_S, hi_R, hi_A, hi_S (mm)
    patch = BodyCoordinates()(ct_patch, box)                          # [1 + 3, 32, 32, 32]
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from monai_metalearn.errors import DataError

__all__ = ["body_box", "body_coordinates", "BodyCoordinates", "BodyCoordinatesd", "BodyFrameError"]


class BodyFrameError(DataError):
    """A body box or patch that cannot give body-frame coordinates (names what is wrong)."""


def _affine_of(image: Any, affine: Any | None, what: str) -> np.ndarray:
    if affine is None:
        affine = image.affine if isinstance(image, MetaTensor) else None
    if affine is None:
        raise BodyFrameError(f"{what} has no affine: body-frame coordinates need a MetaTensor (or affine=...)")
    return np.asarray(torch.as_tensor(affine).detach().cpu().double().numpy(), dtype=np.float64)


def body_box(
    image: torch.Tensor, affine: Any | None = None, threshold: float = 0.1, mask: torch.Tensor | None = None
) -> list[float]:
    """The world (RAS, mm) bounding box of the body of a scaled scan, ``[lo_R, lo_A, lo_S, hi_R, hi_A, hi_S]``.

    Args:
        image: an intensity-scaled scan ``[1, *S]`` (see :func:`~monai_metalearn.transforms.scale_intensity`), a
            MetaTensor unless ``affine`` is given.
        affine: voxel -> world matrix (default ``image.affine``).
        threshold: body threshold (see :func:`~monai_metalearn.transforms.body_mask`).
        mask: the body as a boolean map (e.g. ``label > 0`` of a label-only subject); default
            :func:`~monai_metalearn.transforms.body_mask` of ``image``.

    Raises:
        BodyFrameError: no affine, or no body voxel (an empty or constant image).
    """
    from monai_metalearn.transforms.intensity import body_mask

    aff = _affine_of(image, affine, "the image")
    body = body_mask(image, threshold) if mask is None else torch.as_tensor(mask).bool()
    idx = torch.nonzero(body.reshape(body.shape[-3:]))
    if idx.numel() == 0:
        raise BodyFrameError(f"no body voxel above {threshold} in an image of shape {tuple(image.shape)}")
    lo, hi = idx.min(0).values.double().numpy(), idx.max(0).values.double().numpy()
    corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    world = corners @ aff.T
    return [float(v) for v in np.concatenate([world[:, :3].min(0), world[:, :3].max(0)])]


def body_coordinates(shape: Sequence[int], affine: Any, box: Sequence[float]) -> torch.Tensor:
    """``[3, *shape]``: each voxel's world position (R, A, S) mapped to ``[-1, 1]`` across ``box``.

    Raises:
        BodyFrameError: a box that is not 6 finite numbers with ``hi > lo`` on every axis.
    """
    box_t = np.asarray(box, dtype=np.float64).reshape(-1)
    if box_t.size != 6 or not np.all(np.isfinite(box_t)) or np.any(box_t[3:] <= box_t[:3]):
        raise BodyFrameError(f"a body box is [lo_R, lo_A, lo_S, hi_R, hi_A, hi_S] with hi > lo, got {list(box)}")
    aff = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    grids = torch.meshgrid(*[torch.arange(int(n), dtype=torch.float64) for n in shape], indexing="ij")
    vox = torch.stack([*grids, torch.ones_like(grids[0])], 0).reshape(4, -1)
    world = (aff @ vox)[:3]
    lo, hi = torch.as_tensor(box_t[:3])[:, None], torch.as_tensor(box_t[3:])[:, None]
    return (2 * (world - lo) / (hi - lo) - 1).reshape(3, *[int(n) for n in shape]).float()


class BodyCoordinates(Transform):
    """Appends the three body-frame coordinate channels to a patch: ``[C, *S] -> [C + 3, *S]``.

    Args:
        affine: voxel -> world matrix of the patch when it is not a MetaTensor.
    """

    def __call__(self, img: torch.Tensor, box: Sequence[float], affine: Any | None = None) -> torch.Tensor:
        aff = _affine_of(img, affine, "the patch")
        coords = body_coordinates(img.shape[1:], aff, box).to(device=img.device, dtype=img.dtype)
        return torch.cat([img, coords], 0)  # a MetaTensor stays one, with the patch's meta


class BodyCoordinatesd(MapTransform):
    """Dictionary version of :class:`BodyCoordinates`: the box is read from ``d[box_key]`` (:func:`body_box`)."""

    def __init__(self, keys: KeysCollection, box_key: Hashable = "body_box", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.box_key = box_key
        self.op = BodyCoordinates()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.box_key not in d:
            raise BodyFrameError(f"item has no {self.box_key!r} (the body box of its scan); keys: {sorted(map(str, d))}")
        for key in self.key_iterator(d):
            d[key] = self.op(d[key], d[self.box_key])
        return d
