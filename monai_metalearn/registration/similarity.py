"""Image similarity for registration: intensity normalisation, MIND-SSC, and masked losses selectable by name.

Every loss is *lower is better* and takes ``(moved, fixed, mask=None)``: ``[1, C, *S]`` tensors on one grid and an
optional weight/mask ``[1, 1, *S]`` (e.g. the fixed body mask times the region where the moving image is defined),
so that partial overlap does not reward the padding outside a field of view.

* ``"ncc"``: global (masked) normalised cross-correlation, signed: ``-1`` for ``moved = a * fixed + b`` with
  ``a > 0``, ``+1`` for ``a < 0``. Mono-modal, cheap.
* ``"lncc"``: ``monai.losses.LocalNormalizedCrossCorrelationLoss`` (squared local NCC in a box window), averaged
  over the mask. Mono-modal; robust to slow intensity changes; insensitive to the sign of the local correlation.
* ``"mi"``: ``monai.losses.GlobalMutualInformationLoss`` (Parzen windows) on the voxels inside the mask; images in
  ``[0, 1]`` (see :func:`normalize_intensity`). Cross-modal.
* ``"mind"``: sum of squared differences between MIND-SSC descriptors (:func:`mind_ssc`, Heinrich et al., MICCAI
  2013); each image is turned into its 12-channel descriptor once (:meth:`Similarity.features`), and the moving
  descriptor is what gets warped. Cross-modal and robust to monotone intensity changes.

Intensities are never assumed to be Hounsfield units (BTCV here is 8-bit display-windowed): each image is scaled
between two of its own percentiles.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss
from torch import Tensor, nn

__all__ = ["SIMILARITIES", "Similarity", "get_similarity", "mind_ssc", "normalize_intensity", "masked_mean"]

SIMILARITIES = ("ncc", "lncc", "mi", "mind")
"""Names accepted by :func:`get_similarity`."""


def normalize_intensity(image: Tensor, lower: float = 0.5, upper: float = 99.5, mask: Tensor | None = None) -> Tensor:
    """``image`` mapped linearly so that its ``lower`` / ``upper`` percentiles become 0 / 1, clipped to ``[0, 1]``.

    Args:
        image: any float tensor.
        lower: low percentile (0-100).
        upper: high percentile.
        mask: take the percentiles over these voxels only (nonzero).

    Returns:
        float32 tensor of the same shape (plain ``torch.Tensor``). A constant image gives zeros.
    """
    x = image.as_tensor() if hasattr(image, "as_tensor") else image
    x = x.float()
    values = x[mask.bool()] if mask is not None else x.reshape(-1)
    if values.numel() == 0:
        raise ValueError("normalize_intensity: the mask selects no voxels.")
    if values.numel() > 2_000_000:  # quantile has a size limit; a regular subsample is enough for percentiles
        values = values[:: values.numel() // 1_000_000 + 1]
    q = torch.quantile(values, torch.tensor([lower / 100.0, upper / 100.0], device=values.device))
    lo, hi = float(q[0]), float(q[1])
    if hi - lo < 1e-8:
        return torch.zeros_like(x)
    return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` ``[1, C, *S]`` over channels and the voxels weighted by ``mask`` ``[1, 1, *S]``."""
    if mask is None:
        return values.mean()
    w = mask.to(values.dtype)
    return (values * w).sum() / (w.sum() * values.shape[1]).clamp_min(1e-6)


# six-neighbourhood of a voxel, and the 12 pairs of neighbours at distance sqrt(2) (the MIND-SSC self-similarity
# context: every pair of orthogonal neighbours, not the 3 opposite pairs)
_SIX = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
_SSC_PAIRS = tuple(
    (a, b) for a in range(6) for b in range(a + 1, 6)
    if sum((p - q) ** 2 for p, q in zip(_SIX[a], _SIX[b])) == 2
)


def _shift(padded: Tensor, offset: tuple[int, int, int], pad: int, shape: tuple[int, ...]) -> Tensor:
    """``x(i + offset)`` for every voxel ``i`` of the unpadded ``shape``, read from ``padded`` (padded by ``pad``)."""
    s = [slice(pad + o, pad + o + n) for o, n in zip(offset, shape)]
    return padded[:, :, s[0], s[1], s[2]]


def mind_ssc(image: Tensor, radius: int = 1, dilation: int = 2, eps: float = 1e-6) -> Tensor:
    """MIND-SSC descriptor (Heinrich et al., "Towards realtime multimodal fusion for image-guided interventions
    using self-similarities", MICCAI 2013) of a 3D image.

    For each of the 12 pairs ``(p, q)`` of six-neighbourhood offsets (scaled by ``dilation``) at distance
    ``sqrt(2) * dilation``, the patch distance ``D_pq(x) = mean_{patch} (I(x + p) - I(x + q))^2`` (box patch of
    ``2 * radius + 1`` voxels); then ``MIND = exp(-(D - min_pq D) / V(x))`` with ``V`` the mean of ``D - min D`` over
    the 12 channels (clamped to ``[1e-3, 1e3]`` times its image mean). It depends only on intensity differences
    relative to their local spread, so an affine intensity map ``a * I + b`` (``a != 0``, e.g. ``1 - I``) leaves it
    unchanged and monotone maps change it little.

    Args:
        image: ``[1, 1, D, H, W]`` or ``[1, D, H, W]`` float tensor.
        radius: patch radius (voxels).
        dilation: neighbour distance (voxels).
        eps: floor of the variance.

    Returns:
        ``[1, 12, D, H, W]`` descriptor in ``(0, 1]``.

    Raises:
        ValueError: not a single-channel 3D image.
    """
    x = image.as_tensor() if hasattr(image, "as_tensor") else image
    if x.ndim == 4:
        x = x[None]
    if x.ndim != 5 or x.shape[:2] != (1, 1):
        raise ValueError(f"mind_ssc expects one single-channel 3D image [1, 1, D, H, W], got {tuple(image.shape)}.")
    x = x.float()
    shape = tuple(x.shape[2:])
    padded = F.pad(x, [dilation] * 6, mode="replicate")
    neighbours = [_shift(padded, tuple(dilation * c for c in off), dilation, shape) for off in _SIX]
    diffs = torch.cat([(neighbours[a] - neighbours[b]) ** 2 for a, b in _SSC_PAIRS], dim=1)
    k = 2 * radius + 1
    dist = F.avg_pool3d(F.pad(diffs, [radius] * 6, mode="replicate"), k, stride=1)
    dist = dist - dist.min(dim=1, keepdim=True).values
    var = dist.mean(dim=1, keepdim=True)
    mean_var = var.mean().detach().clamp_min(eps)
    var = var.clamp(min=float(mean_var) * 1e-3, max=float(mean_var) * 1e3)
    return torch.exp(-dist / var)


class Similarity(nn.Module):
    """A masked image dissimilarity (lower is better) chosen by name.

    Args:
        name: one of :data:`SIMILARITIES`.
        kernel_size: LNCC window (voxels, odd).
        num_bins: MI histogram bins.
        mind_radius: MIND patch radius (voxels).
        mind_dilation: MIND neighbour distance (voxels).

    Raises:
        ValueError: unknown ``name`` or an even ``kernel_size``.
    """

    def __init__(self, name: str = "lncc", kernel_size: int = 7, num_bins: int = 32, mind_radius: int = 1,
                 mind_dilation: int = 2) -> None:
        super().__init__()
        if name not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {name!r}.")
        self.name = name
        self.mind_radius, self.mind_dilation = int(mind_radius), int(mind_dilation)
        if name == "lncc":
            if kernel_size % 2 == 0:
                raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
            self.lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=kernel_size,
                                                            kernel_type="rectangular", reduction="none")
        if name == "mi":
            self.mi = GlobalMutualInformationLoss(num_bins=num_bins, reduction="mean")

    def features(self, image: Tensor) -> Tensor:
        """What gets warped and compared for an image ``[1, 1, *S]`` in ``[0, 1]``: the image itself, or its
        MIND-SSC descriptor ``[1, 12, *S]`` for ``"mind"``."""
        return mind_ssc(image, self.mind_radius, self.mind_dilation) if self.name == "mind" else image

    def forward(self, moved: Tensor, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
        """Scalar loss of ``moved`` against ``fixed`` (features ``[1, C, *S]``) over ``mask`` ``[1, 1, *S]``."""
        if moved.shape != fixed.shape:
            raise ValueError(f"moved and fixed must have the same shape, got {tuple(moved.shape)}, "
                             f"{tuple(fixed.shape)}.")
        if self.name == "ncc":
            return -_masked_ncc(moved, fixed, mask)
        if self.name == "lncc":
            return masked_mean(self.lncc(moved, fixed), mask)
        if self.name == "mind":
            return masked_mean((moved - fixed) ** 2, mask)
        # mi: the voxels inside the mask, as one sample
        if mask is not None:
            keep = mask.reshape(-1) > 0.5
            return self.mi(moved.reshape(1, -1)[:, keep], fixed.reshape(1, -1)[:, keep])
        return self.mi(moved.reshape(1, -1), fixed.reshape(1, -1))

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def _masked_ncc(a: Tensor, b: Tensor, mask: Tensor | None, eps: float = 1e-8) -> Tensor:
    """Weighted Pearson correlation of ``a`` and ``b`` over ``mask`` (all voxels when None)."""
    w = torch.ones_like(a[:, :1]) if mask is None else mask.to(a.dtype)
    total = w.sum().clamp_min(eps) * a.shape[1]
    ma = (a * w).sum() / total
    mb = (b * w).sum() / total
    da, db = a - ma, b - mb
    cov = (da * db * w).sum()
    return cov / torch.sqrt((da * da * w).sum() * (db * db * w).sum() + eps)


def get_similarity(name: str | Similarity = "lncc", **kwargs: Any) -> Similarity:
    """:class:`Similarity` by name (an instance is returned as is)."""
    return name if isinstance(name, Similarity) else Similarity(name, **kwargs)
