"""Trivial references of few-shot segmentation, with the learner contract: what a result must beat to mean anything.

Both work on whole volumes (``whole_volume = True``: the evaluation gives them the support scans whole, not patches,
and calls the predictor on the whole query instead of a sliding window) and learn nothing:

* :class:`WholeBodyReference`: the query's body (:func:`~monai_metalearn.transforms.body_mask`) as the structure.
  Any method whose Dice is not above it has learned nothing about the structure.
* :class:`BoxAlignedReference`: the support's mask placed in the query by aligning the bounding boxes of the two
  bodies (a per-axis scale and shift, no registration), averaged over the K supports and thresholded at 0.5. It
  knows where the structure lies in a body, and nothing about the query's anatomy.

Volumes share one voxel grid convention (RAS at one spacing, as :func:`~monai_metalearn.apps.segmentation.
load_segmentation_subjects` gives them), so box coordinates are physical up to the common spacing.

Example::

    ref = BoxAlignedReference()
    predictor = ref.adapt(support_volume[None], support_mask[None])   # [1, 1, *S], [1, 1, *S]
    mask = predictor(query_volume[None]).argmax(1)                      # [1, *S']
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from monai_metalearn.transforms.intensity import body_mask
from monai_metalearn.transforms.array import structure_bounding_box

from .base import Learner

__all__ = ["VolumeLearner", "WholeBodyReference", "BoxAlignedReference", "place_by_body_box", "mask_logits"]


def mask_logits(probability: Tensor) -> Tensor:
    """Two-channel logits ``[B, 2, *S]`` of a foreground probability ``[B, 1, *S]``: their arg-max is
    ``probability > 0.5`` (a tie, 0.5, is background)."""
    p = probability.float()
    return torch.cat([0.5 - p, p - 0.5], dim=1)


def _as_volumes(x: Tensor | Sequence[Tensor], what: str) -> list[Tensor]:
    """Whole volumes ``[1, *S]`` from ``[K, 1, *S]`` or a list of ``[1, *S]`` / ``[1, 1, *S]`` tensors."""
    items = list(x) if isinstance(x, (list, tuple)) or (isinstance(x, Tensor) and x.dim() == 5) else [x]
    out = []
    for v in items:
        v = torch.as_tensor(v)
        v = v[0] if v.dim() == 5 and v.shape[0] == 1 else v
        if v.dim() != 4 or v.shape[0] != 1:
            raise ValueError(f"{what} must be whole volumes [K, 1, D, H, W] (or a list of [1, D, H, W]), got "
                             f"shape {tuple(v.shape)}")
        out.append(v)
    if not out:
        raise ValueError(f"{what} is empty")
    return out


class VolumeLearner(Learner):
    """Base of the learners that take whole support volumes and segment whole query volumes, with nothing to
    meta-train (references, registration-based atlas learners).

    Subclasses implement :meth:`adapt` on ``support_x`` / ``support_y`` given as ``[K, 1, *S]`` tensors or lists of
    ``[1, *S]`` volumes (K scans of different sizes); the predictor maps a query ``[B, 1, *S']`` to logits
    ``[B, 2, *S']``. :meth:`outer_step` and :meth:`meta_batch_step` change nothing and return NaN metrics;
    :meth:`meta_loss` scores the query (no graph).
    """

    whole_volume = True
    trainable = False

    def meta_loss(self, support_x, support_y, query_x, query_y) -> tuple[Tensor, dict[str, float]]:
        from monai_metalearn.metrics import binary_dice

        with torch.no_grad():
            logits = self.adapt(support_x, support_y)(query_x)
            target = query_y if query_y.dim() == logits.dim() else query_y.unsqueeze(1)
            dice = float(binary_dice(logits.argmax(1, keepdim=True), (target > 0).long()))
        return torch.tensor(1.0 - dice), {"loss": 1.0 - dice, "dice": dice}

    def outer_step(self, support_x, support_y, query_x, query_y, optimizer=None, scaler=None) -> dict[str, float]:
        return {"loss": math.nan, "dice": math.nan}

    def meta_batch_step(self, episodes, optimizer=None, scaler=None) -> dict[str, float]:
        return {"loss": math.nan, "dice": math.nan, "tasks": float(len(list(episodes)))}


class WholeBodyReference(VolumeLearner):
    """The query's body as the structure: the reference that knows nothing.

    Args:
        threshold: body threshold on the scaled image (see :func:`~monai_metalearn.transforms.body_mask`).
    """

    def __init__(self, threshold: float = 0.1) -> None:
        super().__init__()
        self.threshold = float(threshold)

    def adapt(self, support_x, support_y):
        _as_volumes(support_x, "support_x")  # checked, then ignored

        def predict(x: Tensor) -> Tensor:
            return mask_logits(torch.stack([body_mask(v, self.threshold).float() for v in x]))

        return predict


def place_by_body_box(
    support_image: Tensor, support_mask: Tensor, query_image: Tensor, threshold: float = 0.1
) -> Tensor:
    """The support's mask ``[1, *S]`` carried to the query's grid ``[1, *S']`` by aligning the bounding boxes of the
    two bodies: a query voxel at fraction ``f`` of the query body's box along an axis takes the mask value at fraction
    ``f`` of the support body's box (trilinear interpolation of the mask, so the result is a probability in
    ``[0, 1]``; 0 outside the support's grid).

    Raises:
        ValueError: when either scan has no body voxel (an empty or constant image).
    """
    boxes = []
    for name, img in (("support", support_image), ("query", query_image)):
        body = body_mask(img, threshold)
        if not bool(body.any()):
            raise ValueError(f"the {name} image has no body voxel above {threshold}: cannot place the mask")
        lo, hi = structure_bounding_box(body)
        boxes.append((torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)))
    (s_lo, s_hi), (q_lo, q_hi) = boxes
    s_size = torch.tensor(support_mask.shape[1:], dtype=torch.float64)
    q_shape = query_image.shape[1:]
    # support voxel coordinate of every query voxel centre, per axis (voxel centres at i + 0.5 in box units)
    axes = []
    for a in range(3):
        q = torch.arange(q_shape[a], dtype=torch.float64)
        s = s_lo[a] + (q + 0.5 - q_lo[a]) * (s_hi[a] - s_lo[a]) / (q_hi[a] - q_lo[a]) - 0.5
        axes.append(2.0 * s / max(float(s_size[a]) - 1.0, 1.0) - 1.0)  # align_corners=True normalisation
    gd, gh, gw = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([gw, gh, gd], dim=-1)[None].to(device=support_mask.device, dtype=torch.float32)
    placed = F.grid_sample(support_mask[None].float(), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=True)
    return placed[0]


class BoxAlignedReference(VolumeLearner):
    """The support masks placed by aligning body bounding boxes (:func:`place_by_body_box`), averaged over the K
    supports; the structure is where the average exceeds 0.5.

    Args:
        threshold: body threshold on the scaled image (see :func:`~monai_metalearn.transforms.body_mask`).
    """

    def __init__(self, threshold: float = 0.1) -> None:
        super().__init__()
        self.threshold = float(threshold)

    def adapt(self, support_x, support_y):
        images, masks = _as_volumes(support_x, "support_x"), _as_volumes(support_y, "support_y")
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} support images but {len(masks)} support masks")
        masks = [(m > 0).float() for m in masks]
        if not all(bool(m.any()) for m in masks):
            raise ValueError("support mask is empty: the structure has no voxel in a support scan")

        def predict(x: Tensor) -> Tensor:
            out = []
            for q in x:
                p = torch.stack([place_by_body_box(i, m, q, self.threshold) for i, m in zip(images, masks)]).mean(0)
                out.append(p)
            return mask_logits(torch.stack(out))

        return predict
