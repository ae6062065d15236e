"""Trivial references of few-shot patch classification, with the learner contract: what a learned result must beat.

Both are nearest-centroid classifiers (squared Euclidean distance to each class's mean support feature; the logits are
the negative distances) on features that need no training:

* :class:`PatchCentroidReference`: the patch's own voxels (the z-scored image channel, optionally average-pooled).
  Within one modality, structures cropped by their bounding box already differ in shape and texture; a learned
  embedding that does not beat the raw voxels has learned nothing about them.
* :class:`BodyPositionReference`: where the patch lies in the body and how large it is, read from the body-frame
  coordinate channels of :class:`~monai_metalearn.transforms.BodyCoordinates` (the mean and the range of each of the
  three channels: six numbers). It knows the anatomy's layout and nothing about the image, so it travels across
  modalities; a method that does not beat it has not used the image.

Example::

    ref = BodyPositionReference()
    logits = ref.adapt(support_x, support_y)(query_x)     # [Q, N]; x: [B, 4, *S] (image + 3 coordinate channels)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..networks.position import body_position_features
from .base import Learner, infer_n_way

__all__ = ["CentroidReference", "PatchCentroidReference", "BodyPositionReference"]


class CentroidReference(Learner):
    """Nearest class centroid on :meth:`features`; nothing to meta-train (``meta_loss`` raises)."""

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def meta_loss(self, support_x, support_y, query_x, query_y):
        raise NotImplementedError(f"{type(self).__name__} is a reference with nothing to meta-train: evaluate it only")

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        n_way = infer_n_way(support_y)
        f = self.features(support_x).float()
        centroids = torch.stack([f[support_y == c].mean(0) for c in range(n_way)])

        def predict(x: Tensor) -> Tensor:
            return -torch.cdist(self.features(x).float(), centroids).pow(2)

        return predict


class PatchCentroidReference(CentroidReference):
    """Nearest centroid on the image channel's voxels.

    Args:
        channel: the image channel (the others, e.g. coordinate channels, are ignored).
        pool: average-pooling factor before flattening (``1``: every voxel).
    """

    def __init__(self, channel: int = 0, pool: int = 2) -> None:
        super().__init__()
        if int(pool) < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        self.channel, self.pool = int(channel), int(pool)

    def features(self, x: Tensor) -> Tensor:
        if x.ndim < 3 or x.shape[1] <= self.channel:
            raise ValueError(f"{type(self).__name__}: patches of shape {tuple(x.shape)} have no channel {self.channel}")
        img = x[:, self.channel : self.channel + 1].float()
        if self.pool > 1:
            pool = {3: F.avg_pool1d, 4: F.avg_pool2d, 5: F.avg_pool3d}[img.ndim]
            img = pool(img, self.pool)
        return img.flatten(1)


class BodyPositionReference(CentroidReference):
    """Nearest centroid on the patch's place in the body: mean and range of the three body-frame coordinate
    channels (``x[:, first:first + 3]``, see :class:`~monai_metalearn.transforms.BodyCoordinates`).

    Args:
        first: index of the first coordinate channel (1 after one image channel).
        use_extent: also use the ranges (the patch's size relative to the body); ``False``: its centre only.
    """

    def __init__(self, first: int = 1, use_extent: bool = True) -> None:
        super().__init__()
        self.first, self.use_extent = int(first), bool(use_extent)

    def features(self, x: Tensor) -> Tensor:
        try:
            return body_position_features(x, self.first, self.use_extent)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from None
