"""Initial alignment that survives partial overlap: body masks, in-plane centring and a 1D search along the body.

Two scans of different subjects rarely share a field of view: one starts at the lungs, the other at the liver
dome; one ends at the kidneys, the other at the thighs. Aligning their centres of gravity then puts the liver of
one onto the kidneys of the other, and no local optimiser recovers from that. :func:`initial_alignment` instead

1. thresholds each image into a body mask (:func:`body_mask`: two-level Otsu threshold, opening,
   largest connected component, holes filled slice by slice, so lungs and bowel gas are inside the body);
2. for every candidate translation ``t`` along the body axis (world axis 2, superior-inferior, for axial scans
   in RAS or LPS) on a grid of ``step`` mm, such that the two bodies overlap over at least ``min_overlap`` of
   the shorter one, centres the bodies in-plane *over the overlapping slices only* (area-weighted mean of the
   per-slice centroid differences), optionally scales by the ratio of their widths (where not cut by the field
   of view: BTCV scans with a small field of view cut the body at the sides);
3. scores every candidate by the registration similarity at a coarse level, over the fixed body inside the moving
   field of view, and keeps the best.

The ``"centroid"`` method (centres of gravity of the body masks, the usual default of toolkits) and ``"moments"``
(centres plus principal axes) are kept for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .grid import Grid, grid_points, sample
from .similarity import Similarity

__all__ = ["INITIAL_METHODS", "body_mask", "initial_alignment", "translation_matrix", "mask_moments"]

INITIAL_METHODS = ("search", "centroid", "moments", "none")
"""Methods of :func:`initial_alignment`."""


def body_mask(image: Tensor, threshold: float | None = None, axis: int | None = None, opening: int = 1) -> Tensor:
    """Body (foreground) mask of a coarse image: threshold, opening, largest component, 2D hole filling.

    Args:
        image: ``[1, 1, *S]`` or ``[1, *S]`` or ``[*S]``, intensities normalised to ``[0, 1]``.
        threshold: intensity threshold; default: Otsu's threshold of the voxels below the image's Otsu threshold
            (one Otsu split separates bright from dark tissue; the second separates air from dark tissue).
        axis: voxel axis along the body; holes are filled in the slices across it (default: every axis in turn).
        opening: iterations of binary opening (removes the CT table and thin lines before the largest component).

    Returns:
        bool tensor of the same shape and device as ``image``.

    Raises:
        ValueError: nothing is above the threshold.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    x = image.detach().float().cpu().numpy()
    vol = x.reshape(x.shape[-3:])
    if threshold is None:
        # two-level Otsu: the first splits bright tissue from the rest, the second splits air / background from
        # the dark tissue (fat, lung parenchyma, dark MR tissue) inside the lower class
        upper = float(threshold_otsu(vol))
        low = vol[vol < upper]
        thr = float(threshold_otsu(low)) if low.size > 16 and float(low.max()) > float(low.min()) else upper
    else:
        thr = float(threshold)
    mask = vol > thr
    if opening > 0:
        opened = ndimage.binary_opening(mask, iterations=opening)
        mask = opened if opened.any() else mask
    lab, n = ndimage.label(mask)
    if n == 0:
        raise ValueError(f"body_mask: no voxel above the threshold {thr:.3g}; pass a lower threshold.")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    mask = lab == int(sizes.argmax())
    mask = ndimage.binary_closing(mask, iterations=1) | mask
    axes = [axis] if axis is not None else [0, 1, 2]
    for ax in axes:
        mask = np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(mask, ax, 0)], axis=0)
        mask = np.moveaxis(mask, 0, ax)
    return torch.from_numpy(mask.reshape(x.shape)).to(image.device)


def translation_matrix(offset: Any) -> Tensor:
    """4x4 float64 matrix of ``x -> x + offset``."""
    m = torch.eye(4, dtype=torch.float64)
    m[:3, 3] = torch.as_tensor(offset, dtype=torch.float64)
    return m


def mask_moments(mask: Tensor, grid: Grid) -> tuple[Tensor, Tensor]:
    """World centroid (mm) and 3x3 covariance of a binary mask on ``grid`` (float64)."""
    pts = grid_points(grid, dtype=torch.float64)[mask.reshape(grid.shape).cpu()]
    if pts.shape[0] == 0:
        raise ValueError("mask_moments: empty mask.")
    centre = pts.mean(0)
    d = pts - centre
    return centre, d.T @ d / pts.shape[0]


def _profiles(mask: Tensor, grid: Grid, axis: int, step: float) -> dict[str, np.ndarray]:
    """Per slab (``step`` mm along world ``axis``): body area (mm^3 per slab), in-plane centroid, slab position,
    width along each world axis and whether the body touches the field of view's edge there (then its width and
    area are truncated)."""
    m = mask.reshape(grid.shape).cpu()
    idx = torch.nonzero(m).to(torch.float64)
    pts = (idx @ grid.affine[:3, :3].T + grid.affine[:3, 3]).numpy()
    z = pts[:, axis]
    lo = float(z.min())
    bins = np.floor((z - lo) / step).astype(np.int64)
    nb = int(bins.max()) + 1
    count = np.bincount(bins, minlength=nb).astype(np.float64)
    cent = np.stack([np.bincount(bins, weights=pts[:, a], minlength=nb) for a in range(3)], axis=1)
    cent = cent / np.maximum(count, 1.0)[:, None]
    width = np.zeros((nb, 3))
    touch = np.zeros((nb, 3), dtype=bool)
    vox = idx.numpy()
    shape = np.array(grid.shape)
    edge = (vox <= 0) | (vox >= shape - 1)  # [N, 3] voxel axes
    vox_of_world = np.abs(grid.affine[:3, :3].numpy()).argmax(axis=1)  # voxel axis most aligned with each world axis
    for a in range(3):
        mx = np.full(nb, -np.inf)
        mn = np.full(nb, np.inf)
        np.maximum.at(mx, bins, pts[:, a])
        np.minimum.at(mn, bins, pts[:, a])
        width[:, a] = np.where(count > 0, mx - mn, 0.0)
        np.logical_or.at(touch[:, a], bins, edge[:, vox_of_world[a]])
    pos = lo + (np.arange(nb) + 0.5) * step
    return {"area": count * float(torch.prod(grid.spacing)), "centroid": cent, "pos": pos, "width": width,
            "touch": touch}


def _scale_estimate(prof_f: dict, prof_m: dict, zf: np.ndarray, t: float, plane: Sequence[int]) -> float:
    """Isotropic scale from the ratio of body widths over the overlapping slabs, on in-plane axes where neither
    body touches its field of view's edge (geometric mean over axes; 1 when no axis qualifies)."""
    jf = np.clip(np.searchsorted(prof_f["pos"], zf), 0, len(prof_f["pos"]) - 1)
    jm = np.clip(np.searchsorted(prof_m["pos"], zf + t), 0, len(prof_m["pos"]) - 1)
    logs = []
    for a in plane:
        ok = ~prof_f["touch"][jf, a] & ~prof_m["touch"][jm, a] & (prof_f["width"][jf, a] > 0) & (
            prof_m["width"][jm, a] > 0)
        if ok.sum() >= 2:
            logs.append(float(np.median(np.log(prof_m["width"][jm[ok], a] / prof_f["width"][jf[ok], a]))))
    return float(np.exp(np.mean(logs))) if logs else 1.0


def initial_alignment(
    moving: Tensor,
    moving_grid: Grid,
    fixed: Tensor,
    fixed_grid: Grid,
    similarity: Similarity,
    moving_body: Tensor,
    fixed_body: Tensor,
    method: str = "search",
    axis: int = 2,
    step: float | None = None,
    min_overlap: float = 0.5,
    scale: bool = False,
    fixed_weight: Tensor | None = None,
    scales: Sequence[float] = (1.0,),
    top_k: int = 1,
    separation: float = 3.0,
    outside: str = "penalize",
    rotations: Sequence[float] = (0.0,),
) -> tuple[Tensor, dict[str, Any]]:
    """A first transform from the fixed to the moving world space.

    Args:
        moving: moving features ``[1, C, *Sm]`` on ``moving_grid`` (a coarse level, e.g. 8 mm).
        moving_grid: its grid.
        fixed: fixed features ``[1, C, *Sf]`` on ``fixed_grid``.
        fixed_grid: its grid.
        similarity: scores the candidates (lower is better).
        moving_body: moving body mask on ``moving_grid`` (bool, any shape with ``prod(Sm)`` elements).
        fixed_body: fixed body mask on ``fixed_grid``.
        method: ``"search"`` (see the module docstring), ``"centroid"`` (body centres of gravity), ``"moments"``
            (centres and principal axes, sign-corrected towards the identity), ``"none"`` (identity).
        axis: world axis along the body (2: superior-inferior in RAS/LPS).
        step: search step (mm); default the fixed grid's largest spacing.
        min_overlap: candidates must overlap over this fraction of the shorter body extent along ``axis``.
        scale: also scale isotropically by the ratio of the body widths in the overlap (median over slabs, on the
            in-plane axes where neither body is cut by its field of view; clipped to ``[0.8, 1.25]``).
        fixed_weight: where candidates are scored (default ``fixed_body``).
        scales: further isotropic scale factors tried for every translation (times the cross-section estimate
            when ``scale``), e.g. ``(0.9, 1.0, 1.1)``: anatomy differs in size between subjects more than the
            cross-section tells.
        top_k: also return (``info["top"]``) this many best candidates whose translations along the body axis are
            at least ``separation`` steps apart, for a multi-start refinement.
        separation: see ``top_k`` (in steps).
        outside: fixed body voxels that fall outside the moving field of view: ``"penalize"`` (they are scored
            against zero padding, so a candidate that explains less of the fixed body scores worse: without it,
            a small overlap of similar-looking anatomy wins, e.g. a pelvis for an upper abdomen) or ``"ignore"``
            (scored over the overlap only).
        rotations: in-plane rotations (degrees, about ``axis`` through the overlap's body centre) tried for every
            translation and scale. ``(0,)`` for scans of one orientation (axial CT and MR); a full circle (e.g.
            every 30 degrees) where subjects are imaged in differently rotated planes, such as cardiac short-axis
            stacks, whose in-plane rotation varies from patient to patient.

    Returns:
        the 4x4 float64 matrix ``T`` with ``moving_point = T @ fixed_point`` and a dict of diagnostics
        (``"offset"``, ``"scale"``, ``"score"``, ``"rotation"`` (degrees), ``"candidates"``: list of
        ``(t, scale, score)``, ``"candidate_rotations"``: the rotation of each candidate).

    Raises:
        ValueError: unknown ``method``, or no candidate has the required overlap.
    """
    if method not in INITIAL_METHODS:
        raise ValueError(f"initial method must be one of {INITIAL_METHODS}, got {method!r}.")
    if method == "none":
        return torch.eye(4, dtype=torch.float64), {"method": method}
    if method in ("centroid", "moments"):
        cm, covm = mask_moments(moving_body, moving_grid)
        cf, covf = mask_moments(fixed_body, fixed_grid)
        t = torch.eye(4, dtype=torch.float64)
        if method == "moments":
            _, vm = torch.linalg.eigh(covm)
            _, vf = torch.linalg.eigh(covf)
            vm = vm * torch.sign(torch.diagonal(vf.T @ vm)).where(torch.diagonal(vf.T @ vm) != 0, 1.0)[None]
            rot = vm @ vf.T
            t[:3, :3] = rot
            t[:3, 3] = cm - rot @ cf
        else:
            t[:3, 3] = cm - cf
        return t, {"method": method, "offset": t[:3, 3].tolist()}

    if outside not in ("penalize", "ignore"):
        raise ValueError(f"outside must be 'penalize' or 'ignore', got {outside!r}.")
    step = float(step if step is not None else fixed_grid.spacing.max())
    prof_f = _profiles(fixed_body, fixed_grid, axis, step)
    prof_m = _profiles(moving_body, moving_grid, axis, step)
    area_f, cen_f, pos_f = prof_f["area"], prof_f["centroid"], prof_f["pos"]
    area_m, cen_m, pos_m = prof_m["area"], prof_m["centroid"], prof_m["pos"]
    ext_f = (pos_f[0] - step / 2, pos_f[-1] + step / 2)
    ext_m = (pos_m[0] - step / 2, pos_m[-1] + step / 2)
    shorter = min(ext_f[1] - ext_f[0], ext_m[1] - ext_m[0])
    # moving = fixed + t along the axis: overlap of [f0, f1] and [m0 - t, m1 - t]
    t_lo = ext_m[0] - ext_f[1] + min_overlap * shorter
    t_hi = ext_m[1] - ext_f[0] - min_overlap * shorter
    cands = np.arange(np.floor(t_lo / step) * step, t_hi + 1e-6, step)
    cands = cands[(cands >= t_lo - 1e-6) & (cands <= t_hi + 1e-6)]
    if cands.size == 0:
        raise ValueError("initial_alignment: no translation along the body axis gives the required overlap; "
                         "lower min_overlap.")
    pts = grid_points(fixed_grid, device=fixed.device)
    weight = (fixed_body if fixed_weight is None else fixed_weight).reshape(1, 1, *fixed_grid.shape).to(fixed.dtype)
    ones = torch.ones((1, 1, *moving_grid.shape), device=moving.device, dtype=moving.dtype)
    plane = [a for a in range(3) if a != axis]
    results = []
    angles: list[float] = []
    best = None
    mats: list[Tensor] = []
    rots = [(float(a), _rotation(axis, float(a))) for a in rotations]
    with torch.no_grad():
        for t in cands:
            zf = pos_f[(pos_f + t >= ext_m[0]) & (pos_f + t <= ext_m[1])]
            if zf.size == 0:
                continue
            af = np.interp(zf, pos_f, area_f)
            am = np.interp(zf + t, pos_m, area_m)
            w = np.minimum(af, am)
            if w.sum() <= 0:
                continue
            offset = np.zeros(3)
            offset[axis] = t
            for a in plane:
                d = np.interp(zf + t, pos_m, cen_m[:, a]) - np.interp(zf, pos_f, cen_f[:, a])
                offset[a] = float((d * w).sum() / w.sum())
            s_area = float(np.clip(_scale_estimate(prof_f, prof_m, zf, t, plane), 0.8, 1.25)) if scale else 1.0
            centre = np.zeros(3)
            for a in plane:
                centre[a] = float((np.interp(zf, pos_f, cen_f[:, a]) * w).sum() / w.sum())
            centre[axis] = float(zf.mean())
            centre_t = torch.as_tensor(centre)
            for factor in scales:
                s = s_area * float(factor)
                for angle, rot in rots:
                    # moving = centre + offset + s R (fixed - centre)
                    mat = torch.eye(4, dtype=torch.float64)
                    mat[:3, :3] = s * rot
                    mat[:3, 3] = centre_t + torch.as_tensor(offset) - s * rot @ centre_t
                    score = _score(similarity, moving, moving_grid, fixed, pts, weight, ones, mat,
                                   outside == "ignore")
                    results.append((float(t), s, score))
                    angles.append(angle)
                    mats.append(mat)
                    if best is None or score < best[0]:
                        best = (score, mat, offset, s, angle)
    if best is None:
        raise ValueError("initial_alignment: no candidate overlaps the moving body.")
    score, mat, offset, s, angle = best
    return mat, {"method": method, "offset": [float(o) for o in offset], "scale": s, "score": score,
                 "rotation": angle, "candidates": results, "candidate_rotations": angles,
                 "top": _local_minima(results, mats, separation * step, top_k, angles)}


def _rotation(axis: int, degrees: float) -> Tensor:
    """3x3 float64 rotation by ``degrees`` about world ``axis`` (right-handed)."""
    a = np.deg2rad(degrees)
    c, s = float(np.cos(a)), float(np.sin(a))
    i, j = [k for k in range(3) if k != axis]
    rot = torch.eye(3, dtype=torch.float64)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def _local_minima(results: list[tuple[float, float, float]], mats: list[Tensor], separation: float,
                  k: int, angles: Sequence[float] | None = None, angle_separation: float = 45.0) -> list[
                      tuple[float, Tensor]]:
    """The ``k`` best candidates whose translations are at least ``separation`` mm apart (or, with ``angles``,
    whose rotations differ by at least ``angle_separation`` degrees), best first: ``[(score, matrix), ...]``."""
    order = sorted(range(len(results)), key=lambda i: results[i][2])
    kept: list[int] = []

    def apart(i: int, j: int) -> bool:
        if abs(results[i][0] - results[j][0]) >= separation:
            return True
        if angles is None:
            return False
        d = abs((angles[i] - angles[j] + 180.0) % 360.0 - 180.0)
        return d >= angle_separation

    for i in order:
        if len(kept) >= k:
            break
        if not np.isfinite(results[i][2]):
            continue
        if all(apart(i, j) for j in kept):
            kept.append(i)
    return [(results[i][2], mats[i]) for i in kept]


def _score(similarity: Similarity, moving: Tensor, moving_grid: Grid, fixed: Tensor, pts: Tensor, weight: Tensor,
           ones: Tensor, mat: Tensor, only_inside: bool) -> float:
    """Similarity of ``fixed`` and ``moving`` pulled through ``mat`` over ``weight`` (and only inside the moving
    field of view when ``only_inside``)."""
    m = mat.to(device=pts.device, dtype=pts.dtype)
    y = pts @ m[:3, :3].T + m[:3, 3]
    moved = sample(moving, moving_grid.affine, y)
    inside = (sample(ones, moving_grid.affine, y) > 0.999).to(weight.dtype)
    w = weight * inside if only_inside else weight
    if float((weight * inside).sum()) < 1:
        return float("inf")
    return float(similarity(moved, fixed, w))
