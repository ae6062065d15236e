"""Pairwise 3D registration by instance optimisation: initial alignment, affine, deformable; warping in world space.

:func:`register` aligns a moving scan to a fixed scan, both channel-first ``MetaTensor``\\ s ``[1, *S]`` with their
affines (any orientation or spacing, e.g. as read by :func:`~monai_metalearn.data.scan_reader`):

* every image is normalised between two of its own percentiles (never assuming Hounsfield units) and resampled to
  a pyramid of isotropic spacings on its *own* field of view (Gaussian anti-aliasing); the fixed levels are cropped
  to the fixed body (plus a margin), so the optimisation runs on the body, not on the air around it;
* ``"initial"``: :func:`~monai_metalearn.registration.initial.initial_alignment` (body masks, search along the body
  axis, in-plane centring), scored by the chosen similarity;
* ``"affine"``: 12 parameters around the fixed body centre (``x -> c + (I + M)(x - c) + L t``, ``L`` the half
  extent of the body), Adam, a fixed number of iterations per level, coarse to fine;
* ``"deformable"``: a dense displacement field (or, with ``diffeomorphic=True``, a stationary velocity field
  integrated by ``monai.networks.blocks.DVF2DDF``) on each level's grid, Gaussian-smoothed, applied with
  ``monai.networks.blocks.Warp`` to the affinely pre-warped moving features, regularised by
  ``monai.losses.BendingEnergyLoss`` (and optionally ``DiffusionLoss``), Adam, coarse to fine.

The result is a transform of world points, ``phi(x) = T(x + u(x))`` (``T`` the affine, ``u`` the displacement in mm
on the working grid), so :class:`RegistrationResult` carries the moving image, a label map or a soft mask onto the
fixed image's *own* grid with one interpolation.

Example::

    from monai_metalearn.data import scan_reader
    from monai_metalearn.registration import register

    read = scan_reader(["image", "label"])
    atlas = read({"image": ".../image_3.nii.gz", "label": ".../label_3.nii.gz"})
    query = read({"image": ".../image_7.nii.gz", "label": ".../label_7.nii.gz"})
    result = register(atlas["image"], query["image"], similarity="lncc")
    labels = result.warp_label(atlas["label"])        # on query's grid, query's affine
    print(result.dice(atlas["label"], query["label"], labels=(1, 2, 3, 6)), result.timings)
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .grid import Grid, crop_grid, downsample, grid_points, image_grid, sample, smooth, world_to_voxel
from .initial import INITIAL_METHODS, body_mask, initial_alignment
from .similarity import SIMILARITIES, Similarity, normalize_intensity

__all__ = ["AFFINE_DOF", "STAGES", "RegistrationConfig", "RegistrationResult", "register", "dice_per_label"]

STAGES = ("initial", "affine", "deformable")
"""Stage names, in the order they run."""

AFFINE_DOF = (6, 7, 9, 12)
"""Degrees of freedom of an affine level: rigid, + isotropic scale, + anisotropic scale, full affine."""


def _tuple(value: Any, n: int | None = None) -> tuple:
    if isinstance(value, (list, tuple, range)):
        return tuple(value)
    return (value,) * (n or 1)


@dataclass
class RegistrationConfig:
    """Settings of :func:`register` (defaults measured on BTCV pairs of subjects 0-4, see
    ``benchmarks/bench_registration.py``).

    Args:
        similarity: one of :data:`~monai_metalearn.registration.similarity.SIMILARITIES`: ``"lncc"`` (mono-modal
            default), ``"ncc"``, ``"mi"``, ``"mind"`` (cross-modal).
        stages: which of ``("initial", "affine", "deformable")`` to run (in that order; empty: identity).
        spacing: finest working spacing (mm, isotropic).
        levels: deformable pyramid, as multiples of ``spacing`` (coarse to fine).
        iterations: deformable Adam iterations per level (one value for all levels, or one per level).
        affine_levels: affine pyramid, as multiples of ``spacing``.
        affine_iterations: affine Adam iterations per level.
        affine_dof: degrees of freedom per affine level (one of :data:`AFFINE_DOF`: 6 rigid, 7 + isotropic scale,
            9 + anisotropic scale, 12 full affine): a coarse level restricted to rigid + scale cannot shear into a
            wrong optimum.
        affine_similarity: similarity of the affine stage (default: ``similarity``).
        affine_scale_penalty: weight of ``sum_i log(sigma_i)^2`` over the singular values of the affine's linear
            part: subjects differ in size by tens of percent, not by factors, and without it a field of view that
            cuts the body lets the affine shrink towards a wrong optimum.
        affine_lr: Adam learning rate of the affine parameters (matrix entries, and translation in units of the
            body half extent).
        deformable_lr: Adam learning rate of the displacement (voxels of each level).
        regularization: weight of ``BendingEnergyLoss`` on the displacement (voxel units).
        diffusion: weight of ``DiffusionLoss`` (first derivatives).
        field_sigma: Gaussian smoothing (voxels) of the optimised field before use: a cheap B-spline-like prior.
        diffeomorphic: optimise a stationary velocity field, integrated by scaling and squaring (``DVF2DDF``).
        kernel_size: LNCC window (voxels of each level, odd).
        num_bins: MI bins.
        mind_radius: MIND-SSC patch radius (voxels).
        mind_dilation: MIND-SSC neighbour distance (voxels).
        initial: initial alignment method (:data:`~monai_metalearn.registration.initial.INITIAL_METHODS`).
        initial_spacing: spacing (mm) of the initial search.
        initial_similarity: similarity of the initial search; default ``"mind"`` (the most reliable on BTCV pairs,
            and cross-modal).
        min_overlap: the initial search keeps translations whose body overlap is at least this fraction of the
            shorter body.
        initial_scale: let the initial alignment scale isotropically by the ratio of body cross-sections.
        initial_candidates: multi-start: the best this many initial candidates (translations at least three search
            steps apart) each get ``initial_refine_iterations`` affine iterations at the coarsest affine level;
            the one with the lowest loss goes on.
        initial_refine_iterations: see ``initial_candidates`` (0: no multi-start).
        initial_rotations: in-plane rotations (degrees, about ``body_axis``) the initial search tries for every
            translation: ``(0,)`` for axial scans; e.g. ``range(0, 360, 30)`` for cardiac short-axis stacks, whose
            in-plane orientation differs between patients. Candidates at least 45 degrees apart count as distinct
            starts of the multi-start.
        body_axis: world axis along the body (2: superior-inferior in RAS/LPS).
        body_threshold: body mask threshold of the normalised images (default: Otsu).
        mask: ``"body"``: the similarity is taken over the fixed body mask (dilated by ``mask_margin``) inside the
            moving field of view; ``"fov"``: only the moving field of view; ``"none"``: everywhere.
        mask_margin: dilation (mm) of the fixed body mask, and margin of the crop of the working grid.
        percentiles: intensity normalisation (percent, per image).
    """

    similarity: str = "lncc"
    stages: tuple[str, ...] = STAGES
    spacing: float = 4.0
    levels: tuple[float, ...] = (4, 2, 1)
    iterations: int | tuple[int, ...] = (80, 60, 40)
    affine_levels: tuple[float, ...] = (4, 2)
    affine_iterations: int | tuple[int, ...] = (100, 60)
    affine_dof: int | tuple[int, ...] = (7, 12)
    affine_lr: float = 0.01
    affine_similarity: str | None = None
    affine_scale_penalty: float = 0.1
    deformable_lr: float = 0.3
    regularization: float = 1.0
    diffusion: float = 0.0
    field_sigma: float = 1.0
    diffeomorphic: bool = False
    kernel_size: int = 7
    num_bins: int = 32
    mind_radius: int = 1
    mind_dilation: int = 2
    initial: str = "search"
    initial_spacing: float = 8.0
    initial_similarity: str | None = None
    min_overlap: float = 0.5
    initial_scale: bool = True
    initial_candidates: int = 3
    initial_refine_iterations: int = 40
    initial_rotations: tuple[float, ...] = (0.0,)
    body_axis: int = 2
    body_threshold: float | None = None
    mask: str = "body"
    mask_margin: float = 10.0
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        self.stages = tuple(self.stages)
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stages {unknown}; choose from {STAGES}.")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}.")
        if self.affine_similarity is not None and self.affine_similarity not in SIMILARITIES:
            raise ValueError(f"affine_similarity must be one of {SIMILARITIES}, got {self.affine_similarity!r}.")
        if self.initial_similarity is not None and self.initial_similarity not in SIMILARITIES:
            raise ValueError(f"initial_similarity must be one of {SIMILARITIES}, got {self.initial_similarity!r}.")
        if self.initial not in INITIAL_METHODS:
            raise ValueError(f"initial must be one of {INITIAL_METHODS}, got {self.initial!r}.")
        if self.mask not in ("body", "fov", "none"):
            raise ValueError(f"mask must be 'body', 'fov' or 'none', got {self.mask!r}.")
        if float(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}.")
        self.initial_rotations = tuple(float(v) for v in _tuple(self.initial_rotations))
        if not self.initial_rotations:
            raise ValueError("initial_rotations needs at least one angle (0 for none).")
        self.levels = tuple(float(v) for v in _tuple(self.levels))
        self.affine_levels = tuple(float(v) for v in _tuple(self.affine_levels))
        for name, lv, it in (("iterations", self.levels, self.iterations),
                             ("affine_iterations", self.affine_levels, self.affine_iterations),
                             ("affine_dof", self.affine_levels, self.affine_dof)):
            its = _tuple(it, len(lv))
            if len(its) != len(lv):
                raise ValueError(f"{name} has {len(its)} values for {len(lv)} levels.")
            if any(int(i) < 0 for i in its):
                raise ValueError(f"{name} must be >= 0, got {it}.")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}.")
        bad = [d for d in _tuple(self.affine_dof) if int(d) not in AFFINE_DOF]
        if bad:
            raise ValueError(f"affine_dof must be in {AFFINE_DOF}, got {bad}.")

    def level_iterations(self, stage: str) -> list[tuple]:
        """``[(spacing_mm, iterations), ...]`` of the deformable pyramid, ``[(spacing_mm, iterations, dof), ...]``
        of the affine one, coarse to fine."""
        if stage == "affine":
            lv, it = self.affine_levels, _tuple(self.affine_iterations, len(self.affine_levels))
            dof = _tuple(self.affine_dof, len(lv))
            return [(float(f) * float(self.spacing), int(i), int(d)) for f, i, d in zip(lv, it, dof)]
        lv, it = self.levels, _tuple(self.iterations, len(self.levels))
        return [(float(f) * float(self.spacing), int(i)) for f, i in zip(lv, it)]


def dice_per_label(pred: Tensor, target: Tensor, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each label id between two label maps of one grid (``nan`` where both lack the label).

    Raises:
        ValueError: the shapes differ.
    """
    p = pred.as_tensor() if hasattr(pred, "as_tensor") else pred
    t = target.as_tensor() if hasattr(target, "as_tensor") else target
    if p.shape != t.shape:
        raise ValueError(f"label maps differ in shape: {tuple(p.shape)} vs {tuple(t.shape)}.")
    p, t = p.reshape(-1).round().long(), t.reshape(-1).round().long().to(p.device)
    out = {}
    for lab in labels:
        a, b = p == int(lab), t == int(lab)
        denom = int(a.sum()) + int(b.sum())
        out[int(lab)] = float("nan") if denom == 0 else 2.0 * int((a & b).sum()) / denom
    return out


@dataclass
class RegistrationResult:
    """A fixed -> moving transform ``phi(x) = T(x + u(x))`` of world points, and what it took to find it.

    Args:
        fixed_grid: the fixed image's own grid (outputs of the ``warp_*`` methods live here).
        affine: ``T``, 4x4 float64 (``moving_point = T @ fixed_point``).
        field: ``u``, world displacement (mm) ``[3, *field_grid.shape]``, or None (affine only).
        field_grid: the working grid of ``field``.
        fixed_meta: the fixed image's meta dict (copied onto the outputs).
        timings: seconds per stage (and ``"prepare"``, ``"total"``).
        losses: per stage, one list of losses per level (the initial stage: the scores of its candidates).
        initial: diagnostics of the initial alignment.
        config: the settings used.
    """

    fixed_grid: Grid
    affine: Tensor
    field: Tensor | None = None
    field_grid: Grid | None = None
    fixed_meta: Mapping[str, Any] | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    losses: dict[str, list[list[float]]] = dataclasses.field(default_factory=dict)
    initial: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: RegistrationConfig | None = None

    # ------------------------------------------------------------------------------------------ points
    def transform_points(self, points: Tensor) -> Tensor:
        """Moving-space world points ``phi(x)`` of fixed-space world points ``x`` ``[..., 3]`` (mm)."""
        pts = points.float()
        if self.field is not None:
            shape = pts.shape
            flat = pts.reshape(-1, 3)
            u = sample(self.field.to(pts.device), self.field_grid.affine, flat, mode="linear", padding_mode="border")
            pts = (flat + u.reshape(3, -1).T).reshape(shape)
        t = self.affine.to(device=pts.device, dtype=pts.dtype)
        return pts @ t[:3, :3].T + t[:3, 3]

    def _pull(self, image: Tensor, mode: str, padding_mode: str = "zeros", slab: int = 32) -> Tensor:
        """``image`` (on its own grid) sampled at ``phi`` of every fixed voxel, ``[C, *fixed_grid.shape]``."""
        src = image_grid(image)
        data = image.as_tensor() if hasattr(image, "as_tensor") else image
        if not data.is_floating_point():
            data = data.float()
        out = []
        n = self.fixed_grid.shape[2]
        for start in range(0, n, slab):
            pts = grid_points(self.fixed_grid, device=data.device, slices=slice(start, min(n, start + slab)))
            out.append(sample(data, src.affine, self.transform_points(pts), mode=mode, padding_mode=padding_mode)[0])
        return torch.cat(out, dim=-1)

    def _wrap(self, data: Tensor) -> Tensor:
        from monai.data import MetaTensor

        meta = {k: v for k, v in (self.fixed_meta or {}).items() if k != "affine"}
        return MetaTensor(data, affine=self.fixed_grid.affine.clone(), meta=meta)

    # ------------------------------------------------------------------------------------------ warping
    def warp_image(self, image: Tensor, mode: str = "linear") -> Tensor:
        """The moving ``image`` ``[C, *S]`` (``MetaTensor``) on the fixed grid: a ``MetaTensor`` with the fixed
        affine (zeros outside the moving field of view)."""
        return self._wrap(self._pull(image, mode))

    def warp_soft(self, mask: Tensor) -> Tensor:
        """A soft or binary moving mask carried by trilinear interpolation, clipped to ``[0, 1]``: a float
        ``MetaTensor`` on the fixed grid (threshold it at 0.5 for a mask)."""
        return self._wrap(self._pull(mask.float() if not mask.is_floating_point() else mask, "linear").clamp(0, 1))

    def warp_label(self, label: Tensor, mode: str = "nearest", labels: Sequence[int] | None = None) -> Tensor:
        """A moving label map ``[1, *S]`` carried onto the fixed grid.

        Args:
            label: integer-valued label map (``MetaTensor``).
            mode: ``"nearest"`` (nearest neighbour), or ``"linear"``: each label's indicator is interpolated
                trilinearly and every voxel takes the label of the largest value when that value is at least 0.5
                (else background 0); for one label this is "interpolate the binary mask, threshold at 0.5".
            labels: label ids for ``"linear"`` (default: those present).

        Returns:
            label map ``MetaTensor`` ``[1, *fixed S]`` with the input dtype and the fixed affine.
        """
        if mode == "nearest":
            out = self._pull(label, "nearest")
            return self._wrap(out.round().to(label.dtype))
        if mode != "linear":
            raise ValueError(f"mode must be 'nearest' or 'linear', got {mode!r}.")
        data = label.as_tensor() if hasattr(label, "as_tensor") else label
        ids = [int(v) for v in torch.unique(data).tolist() if int(v) != 0] if labels is None else list(labels)
        best = torch.full((1, *self.fixed_grid.shape), 0.5, device=data.device)
        arg = torch.zeros((1, *self.fixed_grid.shape), device=data.device, dtype=data.dtype)
        for i in ids:
            p = self._pull(self._like(label, (data == i).float()), "linear")
            take = p > best
            best = torch.where(take, p, best)
            arg = torch.where(take, torch.as_tensor(i, dtype=arg.dtype, device=arg.device), arg)
            # a value of exactly 0.5 counts as the structure
            tie = (p == 0.5) & (arg == 0)
            arg = torch.where(tie, torch.as_tensor(i, dtype=arg.dtype, device=arg.device), arg)
        return self._wrap(arg)

    @staticmethod
    def _like(ref: Tensor, data: Tensor) -> Tensor:
        from monai.data import MetaTensor

        meta = {k: v for k, v in getattr(ref, "meta", {}).items() if k != "affine"}
        return MetaTensor(data, affine=ref.affine, meta=meta)

    def dice(self, moving_label: Tensor, fixed_label: Tensor, labels: Sequence[int] | None = None,
             mode: str = "nearest") -> dict[int, float]:
        """Dice per label id of the carried ``moving_label`` against ``fixed_label`` (on the fixed grid).

        Raises:
            ValueError: ``fixed_label`` is not on the fixed grid.
        """
        if not image_grid(fixed_label).same_as(self.fixed_grid, atol=1e-3):
            raise ValueError("fixed_label is not on the fixed image's grid.")
        warped = self.warp_label(moving_label, mode=mode)
        if labels is None:
            labels = [int(v) for v in torch.unique(fixed_label.as_tensor()).tolist() if int(v) != 0]
        return dice_per_label(warped, fixed_label, labels)

    def jacobian_determinant(self) -> Tensor | None:
        """Determinant of the Jacobian of ``x -> x + u(x)`` on the working grid (interior voxels), or None."""
        if self.field is None:
            return None
        vox = _world_to_vox_field(self.field[None], self.field_grid)[0]
        grads = []
        for d in range(3):
            g = torch.gradient(vox[d], dim=(0, 1, 2))
            grads.append(torch.stack(g, 0))
        jac = torch.stack(grads, 0) + torch.eye(3, device=vox.device)[:, :, None, None, None]
        return torch.linalg.det(jac.permute(2, 3, 4, 0, 1))


# ------------------------------------------------------------------------------------------------ helpers
def _check_image(x: Any, name: str) -> Grid:
    try:
        return image_grid(x)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _vox_to_world_field(ddf: Tensor, grid: Grid) -> Tensor:
    """Displacement in voxel units ``[1, 3, *S]`` -> world mm (the grid's linear part)."""
    lin = grid.affine[:3, :3].to(device=ddf.device, dtype=ddf.dtype)
    return torch.einsum("ij,bj...->bi...", lin, ddf)


def _world_to_vox_field(u: Tensor, grid: Grid) -> Tensor:
    lin = torch.linalg.inv(grid.affine[:3, :3]).to(device=u.device, dtype=u.dtype)
    return torch.einsum("ij,bj...->bi...", lin, u)


def _pyramid(image: Tensor, affine: Tensor, spacings: Sequence[float]) -> dict[float, tuple[Tensor, Grid]]:
    """``{spacing: (image, grid)}`` on the image's own field of view, computed from fine to coarse."""
    out: dict[float, tuple[Tensor, Grid]] = {}
    cur, cur_aff = image, affine
    for s in sorted(set(spacings)):
        img, g = downsample(cur, cur_aff, s)
        out[s] = (img, g)
        cur, cur_aff = img, g.affine
    return out


def _crop_to(grid: Grid, lo_world: Tensor, hi_world: Tensor) -> tuple[Grid, tuple[slice, ...]]:
    """The sub-grid of ``grid`` covering the world box ``[lo, hi]``, and the index slices of the crop."""
    corners = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=torch.float64)
    box = lo_world[None] + corners * (hi_world - lo_world)[None]
    idx = world_to_voxel(box, grid.affine)
    lower = torch.floor(idx.min(0).values).long().tolist()
    upper = (torch.ceil(idx.max(0).values).long() + 1).tolist()
    lower = [max(0, v) for v in lower]
    upper = [min(n, v) for n, v in zip(grid.shape, upper)]
    sub = crop_grid(grid, lower, upper)
    return sub, tuple(slice(a, b) for a, b in zip(lower, upper))


def _dilate(mask: Tensor, radius: int) -> Tensor:
    """Binary dilation of ``[1, 1, *S]`` by a cube of ``radius`` voxels (max pooling)."""
    if radius <= 0:
        return mask
    return F.max_pool3d(mask.float(), 2 * radius + 1, stride=1, padding=radius) > 0.5


class _AffineParams:
    """``x -> c + (R(w) diag(exp(s + a)) + M)(x - c) + L t``: rotation vector ``w`` (matrix exponential of its skew
    matrix), isotropic and anisotropic log scales ``s``, ``a``, a free linear term ``M`` and a translation ``t`` in
    units of the body half extent ``L``; a level with fewer degrees of freedom leaves the others as they are."""

    def __init__(self, device) -> None:
        z = lambda *shape: torch.zeros(*shape, device=device, requires_grad=True)  # noqa: E731
        self.w, self.s, self.a, self.m, self.t = z(3), z(1), z(3), z(3, 3), z(3)

    def free(self, dof: int) -> list[Tensor]:
        if dof not in AFFINE_DOF:
            raise ValueError(f"affine degrees of freedom must be one of {AFFINE_DOF}, got {dof}.")
        return [self.w, self.t] + ([self.s] if dof >= 7 else []) + ([self.a] if dof >= 9 else []) + (
            [self.m] if dof >= 12 else [])

    def matrix(self, centre: Tensor, half: float) -> Tensor:
        w = self.w
        zero = torch.zeros((), device=w.device)
        skew = torch.stack([torch.stack([zero, -w[2], w[1]]), torch.stack([w[2], zero, -w[0]]),
                            torch.stack([-w[1], w[0], zero])])
        a = torch.linalg.matrix_exp(skew) * torch.exp(self.s + self.a)[None, :] + self.m
        b = centre - a @ centre + half * self.t
        top = torch.cat([a, b[:, None]], dim=1)
        bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=a.dtype, device=a.device)
        return torch.cat([top, bottom], dim=0)


class _Level:
    """Everything one pyramid level needs: fixed features, weight mask and points on the cropped working grid,
    moving features on the moving image's own grid at the same spacing."""

    def __init__(self, spacing: float, fixed_pyr, moving_pyr, sim: Similarity, fixed_feat_cache, moving_feat_cache,
                 box: tuple[Tensor, Tensor], weight_full: tuple[Tensor, Grid] | None, moving_weight, device):
        fimg, fgrid = fixed_pyr[spacing]
        self.grid, sl = _crop_to(fgrid, *box)
        key = (spacing, sim.name)
        if key not in fixed_feat_cache:
            fixed_feat_cache[key] = sim.features(fimg)
        self.fixed = fixed_feat_cache[key][(slice(None), slice(None), *sl)].contiguous()
        mimg, self.moving_grid = moving_pyr[spacing]
        if key not in moving_feat_cache:
            moving_feat_cache[key] = sim.features(mimg)
        self.moving = moving_feat_cache[key]
        self.points = grid_points(self.grid, device=device).reshape(-1, 3)
        if weight_full is not None:
            w, wg = weight_full
            self.weight = (sample(w, wg.affine, self.points, mode="linear") > 0.5).float().reshape(
                1, 1, *self.grid.shape)
        else:
            self.weight = torch.ones((1, 1, *self.grid.shape), device=device)
        self.moving_weight = moving_weight  # (mask [1,1,*S], grid) or None
        self.ones = torch.ones((1, 1, *self.moving_grid.shape), device=device)
        self._sources = (spacing, fimg, sl, mimg, fixed_feat_cache, moving_feat_cache)

    def fixed_as(self, sim: Similarity) -> Tensor:
        """The fixed features of another similarity (``affine_similarity``) on the cropped working grid."""
        spacing, fimg, sl, _, fixed_cache, _ = self._sources
        if (spacing, sim.name) not in fixed_cache:
            fixed_cache[(spacing, sim.name)] = sim.features(fimg)
        return fixed_cache[(spacing, sim.name)][(slice(None), slice(None), *sl)].contiguous()

    def moving_as(self, sim: Similarity) -> Tensor:
        """The moving features of another similarity on the moving image's own grid."""
        spacing, _, _, mimg, _, moving_cache = self._sources
        if (spacing, sim.name) not in moving_cache:
            moving_cache[(spacing, sim.name)] = sim.features(mimg)
        return moving_cache[(spacing, sim.name)]

    def pull(self, feat: Tensor, y: Tensor) -> Tensor:
        return sample(feat, self.moving_grid.affine, y).reshape(1, feat.shape[1], *self.grid.shape)

    def inside(self, y: Tensor, use_fov: bool) -> Tensor:
        """Weight of the points ``y`` (moving world): inside the moving field of view, times the moving mask."""
        w = torch.ones((1, 1, *self.grid.shape), device=y.device)
        if use_fov:
            w = w * (sample(self.ones, self.moving_grid.affine, y) > 0.999).float().reshape(1, 1, *self.grid.shape)
        if self.moving_weight is not None:
            m, mg = self.moving_weight
            w = w * sample(m, mg.affine, y).reshape(1, 1, *self.grid.shape)
        return w


def _iterate(n: int, progress: bool, desc: str):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, leave=False)


# ------------------------------------------------------------------------------------------------ register
def register(
    moving: Tensor,
    fixed: Tensor,
    moving_mask: Tensor | None = None,
    fixed_mask: Tensor | None = None,
    similarity: str | None = None,
    stages: Sequence[str] | None = None,
    spacing: float | None = None,
    iterations: int | Sequence[int] | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = False,
    config: RegistrationConfig | None = None,
    **overrides: Any,
) -> RegistrationResult:
    """Registers ``moving`` to ``fixed`` (both ``MetaTensor`` ``[1, *S]`` with affines); see the module docstring.

    Args:
        moving: the moving (atlas) image.
        fixed: the fixed (query) image.
        moving_mask: optional weight/mask on the moving grid: only fixed voxels that map into it are compared.
        fixed_mask: optional mask on the fixed grid: where to compare (replaces the automatic body mask; also sets
            the crop of the working grid).
        similarity: overrides ``config.similarity``.
        stages: overrides ``config.stages``.
        spacing: overrides ``config.spacing`` (finest working spacing, mm).
        iterations: overrides ``config.iterations`` (deformable iterations per level).
        device: where to compute (default: the fixed image's device); the same code runs on CPU and CUDA.
        seed: seeds torch (in a forked RNG state, so the caller's is untouched); CPU runs are bitwise repeatable.
            On CUDA, ``grid_sample``'s backward accumulates with atomics, so runs agree to float tolerance only.
        progress: tqdm bars over the iterations.
        config: a :class:`RegistrationConfig` (default settings when None).
        overrides: further :class:`RegistrationConfig` fields by name.

    Returns:
        :class:`RegistrationResult`.

    Raises:
        ValueError: an input is not a 3D channel-first ``MetaTensor`` with an affine, a mask does not match its
            image's spatial shape, or a setting is invalid.
        TypeError: an unknown keyword in ``overrides``.
    """
    cfg = dataclasses.replace(config) if config is not None else RegistrationConfig()
    names = {f.name for f in dataclasses.fields(RegistrationConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise TypeError(f"register() got unknown settings {bad}; RegistrationConfig has {sorted(names)}.")
    explicit = dict(similarity=similarity, stages=stages, spacing=spacing, iterations=iterations)
    changes = {k: v for k, v in {**explicit, **overrides}.items() if v is not None}
    cfg = dataclasses.replace(cfg, **changes)  # re-validates
    mgrid = _check_image(moving, "moving")
    fgrid = _check_image(fixed, "fixed")
    if moving.shape[0] != 1 or fixed.shape[0] != 1:
        raise ValueError(f"moving and fixed must have one channel, got {moving.shape[0]} and {fixed.shape[0]}.")
    for mask, img, name in ((moving_mask, moving, "moving_mask"), (fixed_mask, fixed, "fixed_mask")):
        if mask is not None and tuple(mask.shape[-3:]) != tuple(img.shape[-3:]):
            raise ValueError(f"{name} has spatial shape {tuple(mask.shape[-3:])}, its image {tuple(img.shape[-3:])}.")
    dev = torch.device(device) if device is not None else fixed.device
    # the optimisation needs autograd even when called under no_grad / inference_mode (evaluation, inference), and
    # runs in float32 also under an evaluator's autocast (its backward passes must not run under autocast)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.inference_mode(False), \
            torch.enable_grad(), torch.autocast(dev.type, enabled=False):
        torch.manual_seed(seed)
        moving, fixed = _detached(moving), _detached(fixed)
        moving_mask = None if moving_mask is None else _detached(moving_mask)
        fixed_mask = None if fixed_mask is None else _detached(fixed_mask)
        return _register(moving, fixed, mgrid, fgrid, moving_mask, fixed_mask, cfg, dev, progress)


def _detached(x: Tensor) -> Tensor:
    """A normal (not inference-mode) copy of ``x`` without graph, keeping a ``MetaTensor``'s meta."""
    return x.detach().clone() if torch.is_inference(x) else x.detach()


def _register(moving, fixed, mgrid, fgrid, moving_mask, fixed_mask, cfg: RegistrationConfig, dev, progress):
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    losses: dict[str, list[list[float]]] = {}
    lo, hi = cfg.percentiles
    m_data = moving.as_tensor().to(dev).float() if hasattr(moving, "as_tensor") else moving.to(dev).float()
    f_data = fixed.as_tensor().to(dev).float() if hasattr(fixed, "as_tensor") else fixed.to(dev).float()
    m_norm = normalize_intensity(m_data, lo, hi)
    f_norm = normalize_intensity(f_data, lo, hi)

    aff_levels = cfg.level_iterations("affine") if "affine" in cfg.stages else []
    def_levels = cfg.level_iterations("deformable") if "deformable" in cfg.stages else []
    spacings = {float(cfg.initial_spacing)} | {a[0] for a in aff_levels} | {s for s, _ in def_levels}
    f_pyr = _pyramid(f_norm, fgrid.affine, spacings)
    m_pyr = _pyramid(m_norm, mgrid.affine, spacings)

    # body masks at the initial spacing, and the fixed weight / crop box
    s0 = float(cfg.initial_spacing)
    f0, fg0 = f_pyr[s0]
    m0, mg0 = m_pyr[s0]
    vox_axis = lambda g: int(torch.argmax(torch.abs(g.affine[cfg.body_axis, :3])))  # noqa: E731
    f_body = body_mask(f0, cfg.body_threshold, axis=vox_axis(fg0))
    m_body = body_mask(m0, cfg.body_threshold, axis=vox_axis(mg0))
    if fixed_mask is not None:
        fm = fixed_mask.as_tensor() if hasattr(fixed_mask, "as_tensor") else fixed_mask
        fm = fm.to(dev).float().reshape(1, 1, *fgrid.shape)
        region, region_grid = fm, fgrid
        region_s0 = sample(fm, fgrid.affine, grid_points(fg0, device=dev)) > 0.5
    else:
        region, region_grid, region_s0 = f_body.float(), fg0, f_body
    margin_vox = int(math.ceil(cfg.mask_margin / s0))
    pts0 = grid_points(fg0, device=dev, dtype=torch.float64)[region_s0.reshape(fg0.shape)]
    if pts0.shape[0] == 0:
        raise ValueError("the fixed mask (or body mask) is empty.")
    pad = cfg.mask_margin + s0
    box = (pts0.min(0).values.cpu() - pad, pts0.max(0).values.cpu() + pad)
    if cfg.mask == "body":
        weight_full = (_dilate(region.reshape(1, 1, *region_grid.shape) > 0.5,
                               margin_vox if region_grid is fg0 else int(math.ceil(cfg.mask_margin / float(
                                   region_grid.spacing.min())))).float(), region_grid)
    else:
        weight_full = None
    use_fov = cfg.mask in ("body", "fov")
    moving_weight = None
    if moving_mask is not None:
        mm = moving_mask.as_tensor() if hasattr(moving_mask, "as_tensor") else moving_mask
        moving_weight = (mm.to(dev).float().reshape(1, 1, *mgrid.shape), mgrid)
    centre = (box[0] + box[1]).to(torch.float32) / 2
    half = float((box[1] - box[0]).max()) / 2
    timings["prepare"] = time.perf_counter() - t_start

    f_cache: dict = {}
    m_cache: dict = {}
    transform = torch.eye(4, dtype=torch.float64)
    info: dict[str, Any] = {}

    # ---------------------------------------------------------------------------------------------- initial
    if "initial" in cfg.stages:
        t0 = time.perf_counter()
        name = cfg.initial_similarity or "mind"
        sim0 = Similarity(name, kernel_size=cfg.kernel_size, num_bins=cfg.num_bins, mind_radius=cfg.mind_radius,
                          mind_dilation=cfg.mind_dilation)
        fixed_w0 = _dilate(region_s0.reshape(1, 1, *fg0.shape), margin_vox) if cfg.mask == "body" else None
        transform, info = initial_alignment(
            sim0.features(m0), mg0, sim0.features(f0), fg0, sim0, m_body, f_body, method=cfg.initial,
            axis=cfg.body_axis, step=s0, min_overlap=cfg.min_overlap, scale=cfg.initial_scale,
            top_k=cfg.initial_candidates if "affine" in cfg.stages else 1,
            fixed_weight=fixed_w0 if fixed_w0 is not None else torch.ones_like(f_body),
            rotations=cfg.initial_rotations,
        )
        losses["initial"] = [[c[-1] for c in info.get("candidates", [])]]
        timings["initial"] = time.perf_counter() - t0

    sim = Similarity(cfg.similarity, kernel_size=cfg.kernel_size, num_bins=cfg.num_bins,
                     mind_radius=cfg.mind_radius, mind_dilation=cfg.mind_dilation).to(dev)

    def level(s: float) -> _Level:
        return _Level(s, f_pyr, m_pyr, sim, f_cache, m_cache, box, weight_full, moving_weight, dev)

    # ---------------------------------------------------------------------------------------------- affine
    c = centre.to(dev)

    asim = sim if (cfg.affine_similarity or cfg.similarity) == cfg.similarity else Similarity(
        cfg.affine_similarity, kernel_size=cfg.kernel_size, num_bins=cfg.num_bins, mind_radius=cfg.mind_radius,
        mind_dilation=cfg.mind_dilation).to(dev)

    def run_affine(base: Tensor, schedule: Sequence[tuple[float, int, int]], tag: str) -> tuple[
            Tensor, list[list[float]]]:
        params = _AffineParams(dev)
        base = base.to(device=dev, dtype=torch.float32)
        curves = []
        for s, n_it, dof in schedule:
            lv = level(s)
            opt = torch.optim.Adam(params.free(dof), lr=cfg.affine_lr)
            curve = []
            for _ in _iterate(n_it, progress, f"{tag} {s:g} mm"):
                opt.zero_grad(set_to_none=True)
                mat = base @ params.matrix(c, half)
                y = lv.points @ mat[:3, :3].T + mat[:3, 3]
                moved = lv.pull(lv.moving if asim is sim else lv.moving_as(asim), y)
                with torch.no_grad():
                    w = lv.weight * lv.inside(y, use_fov)
                loss = asim(moved, lv.fixed if asim is sim else lv.fixed_as(asim), w)
                if cfg.affine_scale_penalty > 0:
                    loss = loss + cfg.affine_scale_penalty * torch.log(torch.linalg.svdvals(mat[:3, :3])).pow(2).sum()
                loss.backward()
                opt.step()
                curve.append(float(loss.detach()))
            curves.append(curve)
        with torch.no_grad():
            return (base @ params.matrix(c, half)).double().cpu(), curves

    if aff_levels:
        t0 = time.perf_counter()
        top = info.get("top", [])
        if len(top) > 1 and cfg.initial_refine_iterations > 0:
            # multi-start: a short affine run at the coarsest level from each of the best initial candidates
            trials = []
            for _, mat in top:
                refined, curves = run_affine(mat, [(aff_levels[0][0], cfg.initial_refine_iterations,
                                                    aff_levels[0][2])], "restart")
                tail = curves[0][-max(1, len(curves[0]) // 5):]
                trials.append((sum(tail) / len(tail), mat))
            info["restarts"] = [float(t[0]) for t in trials]
            info["restart_choice"] = int(min(range(len(trials)), key=lambda i: trials[i][0]))
            transform = trials[info["restart_choice"]][1]
        transform, losses["affine"] = run_affine(transform, aff_levels, "affine")
        timings["affine"] = time.perf_counter() - t0

    # ---------------------------------------------------------------------------------------------- deformable
    field_world, field_grid = None, None
    if def_levels:
        from monai.losses import BendingEnergyLoss, DiffusionLoss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from monai.networks.blocks import DVF2DDF, Warp

            warp = Warp(mode="bilinear", padding_mode="border")
            integrate = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="zeros") if cfg.diffeomorphic else None
        bending, diffusion = BendingEnergyLoss(), DiffusionLoss()
        t0 = time.perf_counter()
        tm = transform.to(device=dev, dtype=torch.float32)
        losses["deformable"] = []
        prev: tuple[Tensor, Grid] | None = None  # (velocity or displacement in world mm, grid)
        for s, n_it in def_levels:
            lv = level(s)
            if min(lv.grid.shape) < 5:  # a thin slab at a coarse level: too few voxels for a smooth field
                info.setdefault("skipped_levels", []).append(s)
                continue
            with torch.no_grad():
                y = lv.points @ tm[:3, :3].T + tm[:3, 3]
                pre = lv.pull(lv.moving, y)  # moving features, affinely on the working grid
                w = lv.weight * lv.inside(y, use_fov)
                if prev is None:
                    init = torch.zeros((1, 3, *lv.grid.shape), device=dev)
                else:
                    up = sample(prev[0], prev[1].affine, lv.points, padding_mode="border")
                    init = _world_to_vox_field(up.reshape(1, 3, *lv.grid.shape), lv.grid)
            par = init.clone().requires_grad_(True)
            opt = torch.optim.Adam([par], lr=cfg.deformable_lr)
            curve = []
            sigma = [cfg.field_sigma] * 3
            for _ in _iterate(n_it, progress, f"deformable {s:g} mm"):
                opt.zero_grad(set_to_none=True)
                vel = smooth(par, sigma) if cfg.field_sigma > 0 else par
                ddf = integrate(vel) if integrate is not None else vel
                moved = warp(pre, ddf)
                loss = sim(moved, lv.fixed, w)
                if cfg.regularization > 0:
                    with warnings.catch_warnings():  # MONAI's BendingEnergyLoss indexes with a list (torch warns)
                        warnings.filterwarnings("ignore", message="Using a non-tuple sequence")
                        loss = loss + cfg.regularization * bending(ddf)
                if cfg.diffusion > 0:
                    loss = loss + cfg.diffusion * diffusion(ddf)
                loss.backward()
                opt.step()
                curve.append(float(loss.detach()))
            losses["deformable"].append(curve)
            with torch.no_grad():
                vel = smooth(par, sigma) if cfg.field_sigma > 0 else par
                prev = (_vox_to_world_field(vel, lv.grid)[0], lv.grid)
                last_ddf = integrate(vel) if integrate is not None else vel
        if prev is not None:  # else every level was too thin: affine only
            field_world = _vox_to_world_field(last_ddf.detach(), prev[1])[0]
            field_grid = prev[1]
        timings["deformable"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    meta = dict(getattr(fixed, "meta", {}) or {})
    return RegistrationResult(
        fixed_grid=fgrid, affine=transform.double().cpu(), field=field_world, field_grid=field_grid,
        fixed_meta=meta, timings=timings, losses=losses, initial=info, config=cfg,
    )
