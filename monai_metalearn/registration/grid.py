"""Physical space for registration: voxel grids with affines, world coordinates, resampling between grids.

Every image here is a channel-first tensor ``[C, *S]`` (or ``[1, C, *S]``) on a :class:`Grid`: its spatial shape and
the 4x4 affine from voxel indices to world coordinates in mm (MONAI's ``MetaTensor.affine``; RAS after
``scan_reader``, but any orientation works, since nothing here assumes a direction). A transform is a function of
world points: it maps a point ``x`` of the fixed image's space to the point of the moving image's space whose value
it takes, so resampling is "pull": for each output voxel, its world point, the transform, then the source voxel
index through the inverse of the source affine, and ``torch.nn.functional.grid_sample`` (``align_corners=True``:
index ``i`` is the centre of voxel ``i``).

A working grid (:func:`working_grid`) keeps the fixed image's axes and field of view at another spacing, so the
optimisation runs on a few hundred thousand voxels while labels are finally carried onto the fixed image's own grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Grid",
    "image_grid",
    "working_grid",
    "crop_grid",
    "grid_points",
    "world_to_voxel",
    "sample",
    "resample",
    "smooth",
    "downsample",
    "spacing_of",
]

_MODES = {"nearest": "nearest", "linear": "bilinear", "bilinear": "bilinear", "trilinear": "bilinear"}


def spacing_of(affine: Tensor) -> Tensor:
    """Voxel spacing (mm) per voxel axis: the column norms of the affine's 3x3 part (float64)."""
    return torch.linalg.norm(torch.as_tensor(affine, dtype=torch.float64)[:3, :3], dim=0)


@dataclass(frozen=True)
class Grid:
    """A voxel grid in world space.

    Args:
        shape: spatial shape ``(n0, n1, n2)``.
        affine: 4x4 voxel index -> world (mm) matrix, float64, on the CPU.
    """

    shape: tuple[int, int, int]
    affine: Tensor

    def __post_init__(self) -> None:
        affine = torch.as_tensor(self.affine, dtype=torch.float64).detach().cpu()
        if affine.shape != (4, 4):
            raise ValueError(f"a grid affine must be 4x4, got {tuple(affine.shape)}.")
        if len(self.shape) != 3 or any(int(n) < 1 for n in self.shape):
            raise ValueError(f"a grid shape must be 3 positive sizes, got {self.shape}.")
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))

    @property
    def spacing(self) -> Tensor:
        """Spacing (mm) per voxel axis."""
        return spacing_of(self.affine)

    @property
    def numel(self) -> int:
        """Number of voxels."""
        return int(math.prod(self.shape))

    def centre(self) -> Tensor:
        """World coordinates (mm, float64) of the grid centre."""
        idx = torch.tensor([(n - 1) / 2.0 for n in self.shape] + [1.0], dtype=torch.float64)
        return (self.affine @ idx)[:3]

    def same_as(self, other: Grid, atol: float = 1e-4) -> bool:
        """Whether ``other`` has the same shape and (to ``atol``) affine."""
        return self.shape == other.shape and bool(torch.allclose(self.affine, other.affine, atol=atol))


def image_grid(image: Tensor) -> Grid:
    """The :class:`Grid` of a channel-first ``MetaTensor`` ``[C, *S]`` (3 spatial dims) with an affine.

    Raises:
        ValueError: ``image`` is not ``[C, D, H, W]`` or has no ``affine`` (a plain tensor, or a MetaTensor whose
            affine is not 4x4).
    """
    if not isinstance(image, Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"expected a channel-first 3D image [C, D, H, W], got {shape}.")
    affine = getattr(image, "affine", None)
    if affine is None or not hasattr(image, "meta"):
        raise ValueError("the image has no affine: pass a monai.data.MetaTensor as loaded by scan_reader.")
    affine = torch.as_tensor(affine, dtype=torch.float64)
    if affine.ndim == 3:  # batched meta
        affine = affine[0]
    if affine.shape != (4, 4):
        raise ValueError(f"the image affine must be 4x4 for a 3D image, got {tuple(affine.shape)}.")
    if abs(float(torch.linalg.det(affine[:3, :3]))) < 1e-12:
        raise ValueError("the image affine is singular.")
    return Grid(tuple(image.shape[1:]), affine)


def working_grid(grid: Grid, spacing: float | Sequence[float]) -> Grid:
    """The same axes and field of view as ``grid`` at another ``spacing``.

    ``n' = max(1, round(n * s / s'))`` voxels per axis, centred on the old grid's centre, so the box of voxel edges
    is kept to within half a new voxel on each side.

    Args:
        grid: the reference grid (usually the fixed image's).
        spacing: new spacing (mm), one value or one per voxel axis.
    """
    new = torch.as_tensor([float(s) for s in (spacing if isinstance(spacing, Sequence) else [spacing] * 3)],
                          dtype=torch.float64)
    if new.numel() != 3 or bool((new <= 0).any()):
        raise ValueError(f"spacing must be positive, one value or three, got {spacing}.")
    old = grid.spacing
    shape = tuple(max(1, int(round(n * float(o) / float(s)))) for n, o, s in zip(grid.shape, old, new))
    direction = grid.affine[:3, :3] / old
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = direction * new
    old_n = torch.tensor(grid.shape, dtype=torch.float64)
    new_n = torch.tensor(shape, dtype=torch.float64)
    centre = grid.affine[:3, 3] + direction @ (old * (old_n - 1) / 2)
    affine[:3, 3] = centre - direction @ (new * (new_n - 1) / 2)
    return Grid(shape, affine)


def crop_grid(grid: Grid, lower: Sequence[int], upper: Sequence[int]) -> Grid:
    """The sub-grid of voxel indices ``lower <= i < upper`` (clipped to the grid)."""
    lo = [max(0, int(a)) for a in lower]
    hi = [min(n, int(b)) for n, b in zip(grid.shape, upper)]
    if any(b <= a for a, b in zip(lo, hi)):
        raise ValueError(f"empty crop {lo}..{hi} of a grid of shape {grid.shape}.")
    affine = grid.affine.clone()
    affine[:3, 3] = grid.affine[:3, :3] @ torch.tensor(lo, dtype=torch.float64) + grid.affine[:3, 3]
    return Grid(tuple(b - a for a, b in zip(lo, hi)), affine)


def grid_points(grid: Grid, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                slices: slice | None = None) -> Tensor:
    """World coordinates (mm) of the voxel centres, ``[*S, 3]``.

    Args:
        grid: the grid.
        device: where to build them.
        dtype: float type.
        slices: only these indices of the last voxel axis (to work in slabs on large grids).
    """
    axes = [torch.arange(n, device=device, dtype=torch.float64) for n in grid.shape]
    if slices is not None:
        axes[2] = axes[2][slices]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    aff = grid.affine.to(device)
    return (idx @ aff[:3, :3].T + aff[:3, 3]).to(dtype)


def world_to_voxel(points: Tensor, affine: Tensor) -> Tensor:
    """Voxel indices of world ``points`` ``[..., 3]`` under ``affine`` (voxel -> world)."""
    inv = torch.linalg.inv(torch.as_tensor(affine, dtype=torch.float64)).to(device=points.device, dtype=points.dtype)
    return points @ inv[:3, :3].T + inv[:3, 3]


def _as_batch(image: Tensor) -> tuple[Tensor, bool]:
    """``[1, C, *S]`` view of ``[C, *S]`` or ``[1, C, *S]`` (plain tensor), and whether it was unbatched."""
    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    if image.ndim == 4:
        return image[None], True
    if image.ndim == 5:
        return image, False
    raise ValueError(f"expected [C, D, H, W] or [1, C, D, H, W], got {tuple(image.shape)}.")


def sample(image: Tensor, affine: Tensor, points: Tensor, mode: str = "linear", padding_mode: str = "zeros") -> Tensor:
    """Values of ``image`` (on the grid of ``affine``) at world ``points``.

    Args:
        image: ``[C, *S]`` or ``[1, C, *S]`` float tensor.
        affine: its voxel -> world matrix.
        points: world coordinates ``[*T, 3]`` (same device as ``image``).
        mode: ``"linear"`` (trilinear) or ``"nearest"``.
        padding_mode: outside the image: ``"zeros"``, ``"border"`` or ``"reflection"``.

    Returns:
        ``[1, C, *T]``.
    """
    batch, _ = _as_batch(image)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}.")
    idx = world_to_voxel(points, affine)
    sizes = torch.tensor(batch.shape[2:], device=idx.device, dtype=idx.dtype)
    norm = idx * (2.0 / (sizes - 1).clamp_min(1.0)) - 1.0
    norm = norm.flip(-1)  # grid_sample wants (x, y, z) = (last, ..., first) voxel axis
    if batch.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        batch = batch.float()
    out_shape = norm.shape[:-1]
    if norm.ndim != 4:  # grid_sample on a 3D image wants [1, D, H, W, 3]
        norm = norm.reshape(1, 1, -1, 3)
    out = F.grid_sample(batch, norm[None].to(batch.dtype), mode=_MODES[mode], padding_mode=padding_mode,
                        align_corners=True)
    return out.reshape(batch.shape[0], batch.shape[1], *out_shape)


def resample(image: Tensor, affine: Tensor, grid: Grid, mode: str = "linear", padding_mode: str = "zeros") -> Tensor:
    """``image`` (on ``affine``) resampled onto ``grid`` by identity in world space: ``[1, C, *grid.shape]``."""
    return sample(image, affine, grid_points(grid, device=image.device), mode=mode, padding_mode=padding_mode)


def smooth(image: Tensor, sigma: Sequence[float]) -> Tensor:
    """Separable Gaussian smoothing of ``[1, C, *S]`` with ``sigma`` (voxels, per axis; 0 leaves an axis alone).

    Replicate padding, kernels truncated at 3 sigma; the same ops on CPU and CUDA.
    """
    out = image
    channels = image.shape[1]
    for axis, s in enumerate(sigma):
        s = float(s)
        if s <= 0.1:
            continue
        radius = max(1, int(math.ceil(3.0 * s)))
        x = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
        kernel = torch.exp(-0.5 * (x / s) ** 2)
        kernel = kernel / kernel.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        weight = kernel.reshape(shape).repeat(channels, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), weight, groups=channels)
    return out


def downsample(image: Tensor, affine: Tensor, spacing: float | Sequence[float], mode: str = "linear") -> tuple[
        Tensor, Grid]:
    """``image`` on its own field of view at a coarser ``spacing``, anti-aliased first.

    Anti-aliasing: box averaging by the integer part ``k = floor(s' / s)`` of the spacing ratio per axis (cheap
    on large scans), then a Gaussian of ``0.5 * sqrt((s' / (k s))^2 - 1)`` of the pooled voxels (none where the new
    spacing is not coarser). ``mode="nearest"`` skips both.

    Returns:
        the resampled image ``[1, C, *S']`` and its :class:`Grid`.
    """
    batch, _ = _as_batch(image)
    src = Grid(tuple(batch.shape[2:]), affine)
    dst = working_grid(src, spacing)
    if mode == "nearest":
        return resample(batch, affine, dst, mode="nearest", padding_mode="border"), dst
    ratio = (dst.spacing / src.spacing).tolist()
    k = [max(1, min(int(math.floor(r + 1e-6)), n)) for r, n in zip(ratio, src.shape)]
    data, src_affine = batch.float(), src.affine
    if max(k) > 1:
        data = F.avg_pool3d(data, kernel_size=k, stride=k)
        src_affine = src.affine.clone()
        kk = torch.tensor(k, dtype=torch.float64)
        src_affine[:3, :3] = src.affine[:3, :3] * kk
        src_affine[:3, 3] = src.affine[:3, 3] + src.affine[:3, :3] @ ((kk - 1) / 2)
        ratio = [r / kv for r, kv in zip(ratio, k)]
    sigma = [0.5 * math.sqrt(r * r - 1.0) if r > 1.0 else 0.0 for r in ratio]
    if max(sigma) > 0.1:
        data = smooth(data, sigma)
    return resample(data, src_affine, dst, mode=mode, padding_mode="border"), dst
