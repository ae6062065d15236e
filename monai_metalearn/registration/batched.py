"""Several registrations to one fixed image as one problem: K atlases -> one query on one device.

:func:`register_many` returns what K separate :func:`~monai_metalearn.registration.register` calls (one per moving
image, the same fixed image, settings and seed) return, computed together:

* **shared, once for the K items** (the fixed = query side): intensity normalisation, the pyramid, the body mask, the
  comparison region and the crop box of the working grid, the affine's centre and scale; per level the cropped
  working grid, its points and weight, the fixed features (MIND-SSC descriptors computed once) and, for LNCC, the
  fixed image's local sums and variance (:class:`_FixedLNCC`: two of LNCC's five box filterings depend on the
  fixed image alone and run once per level instead of once per item and iteration);
* **per item** (no gradient): the moving image's normalisation, pyramid, body mask and features, and the
  ``"initial"`` search (:func:`~monai_metalearn.registration.initial.initial_alignment`: a few dozen candidates at
  the initial spacing, scored against the shared fixed features);
* **one optimisation for all items**: the multi-start restarts (every candidate of every item together), the
  ``"affine"`` stage and the ``"deformable"`` stage: one optimiser and one Adam step per iteration for the K items,
  whose loss is the sum of the per-item losses.

How the optimised stages compute (``vectorize``):

* ``vectorize=True`` (default on CUDA): batched tensors, one kernel per operation for the K items: affine parameters
  ``[K, ...]``, fields ``[K, 3, *S]`` (smoothing, ``DVF2DDF``, ``Warp``, bending energy over the batch), per-item
  masked similarity reductions. The K moving feature maps of a level are zero-padded at the far end of each voxel
  axis onto one canvas ``[K, C, *max shape]``, each keeping its own affine, and sampled at their items' transformed
  points by one ``grid_sample`` (padding at the far end with zeros is exactly ``grid_sample``'s zero padding of each
  image on its own grid).
* ``vectorize=False`` (default on the CPU): the same optimisation with per-item kernels (each item's parameters its
  own tensors; inside each iteration the items' forward and backward passes run in turn, so one item's autograd
  graph is in memory at a time), i.e. exactly the arithmetic of :func:`register`: on the
  CPU PyTorch gains nothing from a batch here, and runs the batched (grouped) 3D convolutions of smoothing and LNCC
  with oneDNN kernels whose backward pass is several times slower than the single-image kernels
  (``benchmarks/bench_registration_scale.py`` measures both).

Independence: each item's loss is the loss of :func:`register` (similarity over the item's own mask, scale penalty,
bending energy, each a mean over that item only) and depends on its own parameters only; Adam is elementwise; no
stage stops early (fixed iteration counts). So each item follows the optimisation path it follows alone: with
``vectorize=False`` bit for bit on the CPU (tested), with ``vectorize=True`` up to float rounding (reductions in
another order, coordinates normalised by the canvas size), which the thresholds of the masks (inside the moving
field of view, fixed body weight) and Adam's normalised steps can grow over the iterations into differences of a
fraction of a millimetre: as far as the separate registration itself moves when the query is scaled by
``1 + 1e-6`` (measured on BTCV pairs at 6 mm: 0.3 and 0.8 mm mean over the body, against 0.2 and 0.8 mm;
``tests/registration/test_batched.py`` bounds them).
The ``timings`` of each result are those of the batch it ran in (``"batch_size"``: how many items it had;
``"prepare"`` and ``"initial"`` are the item's own, ``"prepare"`` including the shared fixed side).

Example::

    from monai_metalearn.registration import register_many

    results = register_many([atlas1["image"], atlas2["image"], atlas3["image"]], query["image"])
    labels = [r.warp_label(a["label"]) for r, a in zip(results, (atlas1, atlas2, atlas3))]
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .grid import Grid, grid_points, sample, smooth
from .initial import body_mask, initial_alignment
from .pairwise import (
    RegistrationConfig,
    RegistrationResult,
    _AffineParams,
    _check_image,
    _crop_to,
    _detached,
    _dilate,
    _iterate,
    _pyramid,
    _vox_to_world_field,
    _world_to_vox_field,
)
from .similarity import Similarity, masked_mean, normalize_intensity

__all__ = ["register_many", "item_losses"]


# ------------------------------------------------------------------------------------------------ losses
class _FixedLNCC:
    """MONAI's ``LocalNormalizedCrossCorrelationLoss`` (``reduction="none"``) of moved images against one fixed
    image whose local sums and variance are computed once (MONAI's formula, in MONAI's order of operations, so
    the values are MONAI's)."""

    def __init__(self, sim: Similarity, fixed: Tensor) -> None:
        from monai.networks.layers import separable_filtering

        lncc = sim.lncc
        self._filter = separable_filtering
        self.kernels = [lncc.kernel.to(fixed)] * 3
        self.vol = lncc.kernel_vol.to(fixed)
        self.smooth_nr, self.smooth_dr = lncc.smooth_nr, lncc.smooth_dr
        self.target = fixed
        self.t_sum = separable_filtering(fixed, kernels=self.kernels)
        t2_sum = separable_filtering(fixed * fixed, kernels=self.kernels)
        t_avg = self.t_sum / self.vol
        self.t_var = torch.max(t2_sum - t_avg * self.t_sum,
                               torch.as_tensor(self.smooth_dr, dtype=t2_sum.dtype, device=t2_sum.device))

    def __call__(self, pred: Tensor) -> Tensor:
        """Negated squared local NCC ``[B, C, *S]`` of ``pred`` ``[B, C, *S]`` against the fixed image."""
        # MONAI's order of creating the graph's nodes, so that the backward pass sums pred's gradient in its order
        p2, tp = pred * pred, self.target * pred
        p_sum = self._filter(pred, kernels=self.kernels)
        p2_sum = self._filter(p2, kernels=self.kernels)
        tp_sum = self._filter(tp, kernels=self.kernels)
        p_avg = p_sum / self.vol
        cross = tp_sum - p_avg * self.t_sum
        p_var = torch.max(p2_sum - p_avg * p_sum,
                          torch.as_tensor(self.smooth_dr, dtype=p2_sum.dtype, device=p2_sum.device))
        return ((cross * cross + self.smooth_nr) / (self.t_var * p_var)).neg()


def _per_item_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """:func:`~monai_metalearn.registration.similarity.masked_mean` of each item of a batch: ``[B]``."""
    dims = tuple(range(1, values.ndim))
    if mask is None:
        return values.mean(dims)
    w = mask.to(values.dtype)
    return (values * w).sum(dims) / (w.sum(dims) * values.shape[1]).clamp_min(1e-6)


def _per_item_ncc(a: Tensor, b: Tensor, mask: Tensor | None, eps: float = 1e-8) -> Tensor:
    """Weighted Pearson correlation of each item of ``a`` ``[B, C, *S]`` with ``b`` ``[1, C, *S]``: ``[B]``."""
    dims = tuple(range(1, a.ndim))
    view = (-1,) + (1,) * (a.ndim - 1)
    w = torch.ones_like(a[:, :1]) if mask is None else mask.to(a.dtype)
    total = w.sum(dims).clamp_min(eps) * a.shape[1]
    ma = (a * w).sum(dims) / total
    mb = (b * w).sum(dims) / total
    da, db = a - ma.reshape(view), b - mb.reshape(view)
    cov = (da * db * w).sum(dims)
    return cov / torch.sqrt((da * da * w).sum(dims) * (db * db * w).sum(dims) + eps)


def item_losses(sim: Similarity, moved: Tensor, fixed: Tensor, mask: Tensor | None = None,
                lncc: _FixedLNCC | None = None, vectorize: bool = True) -> Tensor:
    """The loss of every item of a batch against one fixed image: ``out[b] = sim(moved[b:b+1], fixed, mask[b:b+1])``.

    Args:
        sim: the similarity.
        moved: moved features ``[B, C, *S]``.
        fixed: fixed features ``[1, C, *S]``.
        mask: per-item weights ``[B, 1, *S]`` (or None: everywhere).
        lncc: the fixed image's LNCC sums computed once (:class:`_FixedLNCC` of ``fixed``), for ``"lncc"``.
        vectorize: LNCC, MIND-SSC and NCC as batched reductions (MI is always taken one item at a time); False:
            ``sim`` called on each item, exactly :func:`register`'s arithmetic.

    Returns:
        ``[B]`` losses.

    Raises:
        ValueError: ``moved`` and ``fixed`` differ in channels or spatial shape, or ``fixed`` has a batch.
    """
    if moved.shape[1:] != fixed.shape[1:] or fixed.shape[0] != 1:
        raise ValueError(f"moved [B, C, *S] and fixed [1, C, *S] must agree, got {tuple(moved.shape)} and "
                         f"{tuple(fixed.shape)}.")
    if not vectorize or sim.name == "mi":
        out = []
        for b in range(moved.shape[0]):
            m, w = moved[b:b + 1], None if mask is None else mask[b:b + 1]
            out.append(masked_mean(lncc(m), w) if sim.name == "lncc" and lncc is not None else sim(m, fixed, w))
        return torch.stack(out)
    if sim.name == "lncc":
        values = lncc(moved) if lncc is not None else sim.lncc(moved, fixed.expand_as(moved))
        return _per_item_mean(values, mask)
    if sim.name == "mind":
        return _per_item_mean((moved - fixed) ** 2, mask)
    return -_per_item_ncc(moved, fixed, mask)


# ------------------------------------------------------------------------------------------------ sides
class _Fixed:
    """Everything about the fixed image that :func:`register` computes before its stages, computed once."""

    def __init__(self, fixed: Tensor, fgrid: Grid, fixed_mask: Tensor | None, cfg: RegistrationConfig, dev) -> None:
        lo, hi = cfg.percentiles
        f_data = fixed.as_tensor().to(dev).float() if hasattr(fixed, "as_tensor") else fixed.to(dev).float()
        self.grid = fgrid
        self.pyr = _pyramid(normalize_intensity(f_data, lo, hi), fgrid.affine, _spacings(cfg))
        s0 = float(cfg.initial_spacing)
        self.f0, self.fg0 = self.pyr[s0]
        self.body = body_mask(self.f0, cfg.body_threshold, axis=_vox_axis(self.fg0, cfg.body_axis))
        if fixed_mask is not None:
            fm = fixed_mask.as_tensor() if hasattr(fixed_mask, "as_tensor") else fixed_mask
            fm = fm.to(dev).float().reshape(1, 1, *fgrid.shape)
            region, region_grid = fm, fgrid
            region_s0 = sample(fm, fgrid.affine, grid_points(self.fg0, device=dev)) > 0.5
        else:
            region, region_grid, region_s0 = self.body.float(), self.fg0, self.body
        self.margin_vox = int(math.ceil(cfg.mask_margin / s0))
        pts0 = grid_points(self.fg0, device=dev, dtype=torch.float64)[region_s0.reshape(self.fg0.shape)]
        if pts0.shape[0] == 0:
            raise ValueError("the fixed mask (or body mask) is empty.")
        pad = cfg.mask_margin + s0
        self.box = (pts0.min(0).values.cpu() - pad, pts0.max(0).values.cpu() + pad)
        if cfg.mask == "body":
            radius = self.margin_vox if region_grid is self.fg0 else int(math.ceil(
                cfg.mask_margin / float(region_grid.spacing.min())))
            self.weight_full = (_dilate(region.reshape(1, 1, *region_grid.shape) > 0.5, radius).float(), region_grid)
            self.weight0 = _dilate(region_s0.reshape(1, 1, *self.fg0.shape), self.margin_vox)
        else:
            self.weight_full, self.weight0 = None, None
        self.centre = (self.box[0] + self.box[1]).to(torch.float32) / 2
        self.half = float((self.box[1] - self.box[0]).max()) / 2
        self.meta = dict(getattr(fixed, "meta", {}) or {})
        self.dev = dev
        self._features: dict = {}
        self._levels: dict = {}

    def features(self, spacing: float, sim: Similarity) -> Tensor:
        key = (spacing, sim.name)
        if key not in self._features:
            self._features[key] = sim.features(self.pyr[spacing][0])
        return self._features[key]

    def level(self, spacing: float, sim: Similarity) -> dict[str, Any]:
        """The cropped working grid of a level, its points, weight, fixed features (and LNCC sums)."""
        key = (spacing, sim.name)
        if key not in self._levels:
            grid, sl = _crop_to(self.pyr[spacing][1], *self.box)
            fixed = self.features(spacing, sim)[(slice(None), slice(None), *sl)].contiguous()
            points = grid_points(grid, device=self.dev).reshape(-1, 3)
            if self.weight_full is not None:
                w, wg = self.weight_full
                weight = (sample(w, wg.affine, points, mode="linear") > 0.5).float().reshape(1, 1, *grid.shape)
            else:
                weight = torch.ones((1, 1, *grid.shape), device=self.dev)
            lncc = _FixedLNCC(sim, fixed) if sim.name == "lncc" else None
            self._levels[key] = {"grid": grid, "fixed": fixed, "points": points, "weight": weight, "lncc": lncc}
        return self._levels[key]


class _Moving:
    """One moving image's normalisation, pyramid, body mask, features and optional mask."""

    def __init__(self, moving: Tensor, mgrid: Grid, moving_mask: Tensor | None, cfg: RegistrationConfig, dev) -> None:
        lo, hi = cfg.percentiles
        m_data = moving.as_tensor().to(dev).float() if hasattr(moving, "as_tensor") else moving.to(dev).float()
        self.pyr = _pyramid(normalize_intensity(m_data, lo, hi), mgrid.affine, _spacings(cfg))
        self.m0, self.mg0 = self.pyr[float(cfg.initial_spacing)]
        self.body = body_mask(self.m0, cfg.body_threshold, axis=_vox_axis(self.mg0, cfg.body_axis))
        self.weight = None
        if moving_mask is not None:
            mm = moving_mask.as_tensor() if hasattr(moving_mask, "as_tensor") else moving_mask
            self.weight = (mm.to(dev).float().reshape(1, 1, *mgrid.shape), mgrid)
        self._features: dict = {}

    def features(self, spacing: float, sim: Similarity) -> Tensor:
        key = (spacing, sim.name)
        if key not in self._features:
            self._features[key] = sim.features(self.pyr[spacing][0])
        return self._features[key]


def _spacings(cfg: RegistrationConfig) -> set[float]:
    aff = cfg.level_iterations("affine") if "affine" in cfg.stages else []
    dfm = cfg.level_iterations("deformable") if "deformable" in cfg.stages else []
    return {float(cfg.initial_spacing)} | {a[0] for a in aff} | {s for s, _ in dfm}


def _vox_axis(grid: Grid, body_axis: int) -> int:
    return int(torch.argmax(torch.abs(grid.affine[body_axis, :3])))


class _MovingLevel:
    """The K moving feature maps of one level, sampled per item at world points: item by item on their own grids
    (``vectorize=False``), or from one zero-padded canvas ``[K, C, *max shape]`` with one ``grid_sample``."""

    def __init__(self, feats: Sequence[Tensor], grids: Sequence[Grid], masks: Sequence[Any], vectorize: bool,
                 dev) -> None:
        self.feats, self.grids, self.masks, self.vectorize = list(feats), list(grids), list(masks), vectorize
        if vectorize:
            shape = [max(g.shape[d] for g in grids) for d in range(3)]
            self.data = torch.zeros((len(feats), feats[0].shape[1], *shape), device=dev, dtype=feats[0].dtype)
            self.ones = torch.zeros((len(feats), 1, *shape), device=dev, dtype=feats[0].dtype)
            for k, (f, g) in enumerate(zip(feats, grids)):
                n0, n1, n2 = g.shape
                self.data[k, :, :n0, :n1, :n2] = f[0]
                self.ones[k, :, :n0, :n1, :n2] = 1.0
            inv = torch.stack([torch.linalg.inv(g.affine) for g in grids])  # float64, as world_to_voxel
            self.inv = inv.to(device=dev, dtype=torch.float32)
            sizes = torch.tensor(shape, device=dev, dtype=torch.float32)
            self.scale = 2.0 / (sizes - 1).clamp_min(1.0)
        else:
            self.item_ones = [torch.ones((1, 1, *g.shape), device=dev) for g in grids]

    def _canvas(self, src: Tensor, y: Tensor, index: Tensor | None, shape: Sequence[int]) -> Tensor:
        inv = self.inv if index is None else self.inv[index]
        src = src if index is None else src[index]
        idx = y @ inv[:, :3, :3].transpose(1, 2) + inv[:, None, :3, 3]
        norm = (idx * self.scale - 1.0).flip(-1)
        out = F.grid_sample(src, norm.reshape(y.shape[0], 1, 1, -1, 3), mode="bilinear", padding_mode="zeros",
                            align_corners=True)
        return out.reshape(y.shape[0], src.shape[1], *shape)

    def pull(self, y: Tensor, index: Tensor | None, shape: Sequence[int]) -> Tensor:
        """Items ``index`` ``[B]`` (None: all, in order) sampled at their moving-world points ``y`` ``[B, N, 3]``:
        ``[B, C, *shape]``."""
        if self.vectorize:
            return self._canvas(self.data, y, index, shape)
        ids = range(y.shape[0]) if index is None else index.tolist()
        return torch.cat([self.pull_one(int(k), y[b], shape) for b, k in enumerate(ids)])

    def pull_one(self, k: int, y: Tensor, shape: Sequence[int]) -> Tensor:
        """Item ``k`` at points ``y`` ``[N, 3]``: ``[1, C, *shape]`` (``_Level.pull`` of :func:`register`)."""
        f = self.feats[k]
        return sample(f, self.grids[k].affine, y).reshape(1, f.shape[1], *shape)

    def inside(self, y: Tensor, index: Tensor | None, shape: Sequence[int], use_fov: bool) -> Tensor:
        """Per item: inside its moving field of view, times its moving mask, at the points ``y`` ``[B, N, 3]``."""
        ids = list(range(y.shape[0])) if index is None else [int(i) for i in index.tolist()]
        if self.vectorize:
            w = torch.ones((y.shape[0], 1, *shape), device=y.device)
            if use_fov:
                w = w * (self._canvas(self.ones, y, index, shape) > 0.999).float()
            if any(self.masks[k] is not None for k in ids):
                w = torch.cat([w[b:b + 1] * (1.0 if self.masks[k] is None else sample(
                    self.masks[k][0], self.masks[k][1].affine, y[b]).reshape(1, 1, *shape))
                    for b, k in enumerate(ids)])
            return w
        return torch.cat([self.inside_one(k, y[b], shape, use_fov) for b, k in enumerate(ids)])

    def inside_one(self, k: int, y: Tensor, shape: Sequence[int], use_fov: bool) -> Tensor:
        """``_Level.inside`` of :func:`register` for item ``k``: ``[1, 1, *shape]``."""
        w = torch.ones((1, 1, *shape), device=y.device)
        if use_fov:
            w = w * (sample(self.item_ones[k], self.grids[k].affine, y) > 0.999).float().reshape(1, 1, *shape)
        if self.masks[k] is not None:
            m, mg = self.masks[k]
            w = w * sample(m, mg.affine, y).reshape(1, 1, *shape)
        return w


class _BatchAffine:
    """Affine parameters of a batch (:class:`~monai_metalearn.registration.pairwise._AffineParams`: ``x -> c +
    (R(w) diag(exp(s + a)) + M)(x - c) + L t``, one parameter set per item, the same centre and scale for all):
    batched ``[B, ...]`` tensors (``vectorize``), or one ``_AffineParams`` per item."""

    def __init__(self, n: int, vectorize: bool, device) -> None:
        self.vectorize = vectorize
        if vectorize:
            z = lambda *shape: torch.zeros(n, *shape, device=device, requires_grad=True)  # noqa: E731
            self.w, self.s, self.a, self.m, self.t = z(3), z(1), z(3), z(3, 3), z(3)
        else:
            self.items = [_AffineParams(device) for _ in range(n)]

    def free(self, dof: int) -> list[Tensor]:
        if not self.vectorize:
            return [p for it in self.items for p in it.free(dof)]
        return [self.w, self.t] + ([self.s] if dof >= 7 else []) + ([self.a] if dof >= 9 else []) + (
            [self.m] if dof >= 12 else [])

    def matrices(self, centre: Tensor, half: float) -> Tensor:
        """``[B, 4, 4]``."""
        if not self.vectorize:
            return torch.stack([it.matrix(centre, half) for it in self.items])
        w = self.w
        zero = torch.zeros_like(w[:, 0])
        skew = torch.stack([torch.stack([zero, -w[:, 2], w[:, 1]], -1), torch.stack([w[:, 2], zero, -w[:, 0]], -1),
                            torch.stack([-w[:, 1], w[:, 0], zero], -1)], 1)
        a = torch.linalg.matrix_exp(skew) * torch.exp(self.s + self.a)[:, None, :] + self.m
        b = centre - (a @ centre) + half * self.t
        top = torch.cat([a, b[:, :, None]], dim=2)
        bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=a.dtype, device=a.device).expand(a.shape[0], 1, 4)
        return torch.cat([top, bottom], dim=1)


def _apply(mats: Tensor, points: Tensor, vectorize: bool) -> Tensor:
    """World points ``[N, 3]`` through each of ``mats`` ``[B, 4, 4]``: ``[B, N, 3]``."""
    if vectorize:
        return points[None] @ mats[:, :3, :3].transpose(1, 2) + mats[:, None, :3, 3]
    return torch.stack([points @ m[:3, :3].T + m[:3, 3] for m in mats])


# ------------------------------------------------------------------------------------------------ entry point
def register_many(
    movings: Sequence[Tensor],
    fixed: Tensor,
    moving_masks: Sequence[Tensor | None] | None = None,
    fixed_mask: Tensor | None = None,
    similarity: str | None = None,
    stages: Sequence[str] | None = None,
    spacing: float | None = None,
    iterations: int | Sequence[int] | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = False,
    config: RegistrationConfig | None = None,
    batch_size: int | None = None,
    vectorize: bool | None = None,
    **overrides: Any,
) -> list[RegistrationResult]:
    """Registers every moving image to ``fixed`` in one optimisation (see the module docstring): the results of
    ``[register(m, fixed, ...) for m in movings]``.

    Args:
        movings: the K moving (atlas) images, ``MetaTensor`` ``[1, *S_k]`` with affines (their grids may differ).
        fixed: the fixed (query) image.
        moving_masks: None, or one optional mask per moving image (see :func:`register`).
        fixed_mask: optional mask on the fixed grid (see :func:`register`).
        similarity, stages, spacing, iterations, device, seed, progress, config, overrides: as :func:`register`.
        batch_size: at most this many items are optimised together (memory grows with it); the fixed side is
            still prepared once for all. Default: all K.
        vectorize: batched kernels (True) or per-item kernels in the one optimisation (False, :func:`register`'s
            arithmetic exactly); default True on CUDA, False on the CPU.

    Returns:
        one :class:`~monai_metalearn.registration.RegistrationResult` per moving image, in order.

    Raises:
        ValueError: no moving image, ``moving_masks`` of another length, ``batch_size`` not a positive integer, or
            what :func:`register` raises for an input.
        TypeError: an unknown keyword in ``overrides``.
    """
    cfg = dataclasses.replace(config) if config is not None else RegistrationConfig()
    names = {f.name for f in dataclasses.fields(RegistrationConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise TypeError(f"register_many() got unknown settings {bad}; RegistrationConfig has {sorted(names)}.")
    explicit = dict(similarity=similarity, stages=stages, spacing=spacing, iterations=iterations)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in {**explicit, **overrides}.items() if v is not None})
    movings = list(movings)
    if not movings:
        raise ValueError("register_many: movings is empty; pass at least one moving image.")
    masks = [None] * len(movings) if moving_masks is None else list(moving_masks)
    if len(masks) != len(movings):
        raise ValueError(f"register_many: {len(masks)} moving_masks for {len(movings)} moving images.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"register_many: batch_size must be a positive integer or None, got {batch_size!r}.")
    mgrids = [_check_image(m, f"movings[{k}]") for k, m in enumerate(movings)]
    fgrid = _check_image(fixed, "fixed")
    if fixed.shape[0] != 1 or any(m.shape[0] != 1 for m in movings):
        raise ValueError("moving and fixed images must have one channel, got "
                         f"{[int(m.shape[0]) for m in movings]} and {fixed.shape[0]}.")
    checks = [(m, img, f"moving_masks[{k}]") for k, (m, img) in enumerate(zip(masks, movings))]
    for mask, img, name in checks + [(fixed_mask, fixed, "fixed_mask")]:
        if mask is not None and tuple(mask.shape[-3:]) != tuple(img.shape[-3:]):
            raise ValueError(f"{name} has spatial shape {tuple(mask.shape[-3:])}, its image {tuple(img.shape[-3:])}.")
    dev = torch.device(device) if device is not None else fixed.device
    vec = dev.type == "cuda" if vectorize is None else bool(vectorize)
    size = len(movings) if batch_size is None else int(batch_size)
    # as register: autograd also under no_grad / inference_mode, float32 also under an evaluator's autocast
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.inference_mode(False), \
            torch.enable_grad(), torch.autocast(dev.type, enabled=False):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        fx = _Fixed(_detached(fixed), fgrid, None if fixed_mask is None else _detached(fixed_mask), cfg, dev)
        t_fixed = time.perf_counter() - t0
        out: list[RegistrationResult] = []
        for start in range(0, len(movings), size):
            stop = min(len(movings), start + size)
            out += _register_batch(
                [_detached(m) for m in movings[start:stop]], mgrids[start:stop],
                [None if m is None else _detached(m) for m in masks[start:stop]], fx, cfg, dev, progress, t_fixed,
                vec)
        return out


def _register_batch(movings, mgrids, masks, fx: _Fixed, cfg: RegistrationConfig, dev, progress, t_fixed: float,
                    vec: bool) -> list[RegistrationResult]:
    t_start = time.perf_counter()
    n = len(movings)
    items, prepare = [], []
    for m, g, mask in zip(movings, mgrids, masks):
        t0 = time.perf_counter()
        items.append(_Moving(m, g, mask, cfg, dev))
        prepare.append(t_fixed + time.perf_counter() - t0)
    aff_levels = cfg.level_iterations("affine") if "affine" in cfg.stages else []
    def_levels = cfg.level_iterations("deformable") if "deformable" in cfg.stages else []
    losses: list[dict[str, list[list[float]]]] = [{} for _ in range(n)]
    infos: list[dict[str, Any]] = [{} for _ in range(n)]
    transforms = [torch.eye(4, dtype=torch.float64) for _ in range(n)]
    t_initial = [0.0] * n
    s0 = float(cfg.initial_spacing)

    # ---------------------------------------------------------------------------------------------- initial
    if "initial" in cfg.stages:
        sim0 = Similarity(cfg.initial_similarity or "mind", kernel_size=cfg.kernel_size, num_bins=cfg.num_bins,
                          mind_radius=cfg.mind_radius, mind_dilation=cfg.mind_dilation)
        f_feat0 = fx.features(s0, sim0)
        for k, it in enumerate(items):
            t0 = time.perf_counter()
            transforms[k], infos[k] = initial_alignment(
                sim0.features(it.m0), it.mg0, f_feat0, fx.fg0, sim0, it.body, fx.body, method=cfg.initial,
                axis=cfg.body_axis, step=s0, min_overlap=cfg.min_overlap, scale=cfg.initial_scale,
                top_k=cfg.initial_candidates if "affine" in cfg.stages else 1,
                fixed_weight=fx.weight0 if fx.weight0 is not None else torch.ones_like(fx.body),
                rotations=cfg.initial_rotations,
            )
            losses[k]["initial"] = [[c[-1] for c in infos[k].get("candidates", [])]]
            t_initial[k] = time.perf_counter() - t0

    sim = Similarity(cfg.similarity, kernel_size=cfg.kernel_size, num_bins=cfg.num_bins,
                     mind_radius=cfg.mind_radius, mind_dilation=cfg.mind_dilation).to(dev)
    asim = sim if (cfg.affine_similarity or cfg.similarity) == cfg.similarity else Similarity(
        cfg.affine_similarity, kernel_size=cfg.kernel_size, num_bins=cfg.num_bins, mind_radius=cfg.mind_radius,
        mind_dilation=cfg.mind_dilation).to(dev)
    movers: dict = {}

    def level(s: float, simx: Similarity) -> tuple[dict[str, Any], _MovingLevel]:
        key = (s, simx.name)
        if key not in movers:
            movers[key] = _MovingLevel([it.features(s, simx) for it in items], [it.pyr[s][1] for it in items],
                                        [it.weight for it in items], vec, dev)
        return fx.level(s, simx), movers[key]

    use_fov = cfg.mask in ("body", "fov")

    # ---------------------------------------------------------------------------------------------- affine
    c = fx.centre.to(dev)

    def run_affine(bases: Tensor, index: Tensor | None, schedule, tag: str) -> tuple[Tensor, list[list[list[float]]]]:
        nb = bases.shape[0]
        owners = list(range(nb)) if index is None else [int(i) for i in index.tolist()]
        params = _BatchAffine(nb, vec, dev)
        bases = bases.to(device=dev, dtype=torch.float32)
        curves: list[list[list[float]]] = [[] for _ in range(nb)]
        for s, n_it, dof in schedule:
            lv, mov = level(s, asim)
            shape = lv["grid"].shape
            opt = torch.optim.Adam(params.free(dof), lr=cfg.affine_lr)
            curve: list[list[float]] = []
            for _ in _iterate(n_it, progress, f"{tag} {s:g} mm x{nb}"):
                opt.zero_grad(set_to_none=True)
                if vec:
                    mats = bases @ params.matrices(c, fx.half)
                    y = _apply(mats, lv["points"], True)
                    moved = mov.pull(y, index, shape)
                    with torch.no_grad():
                        w = lv["weight"] * mov.inside(y, index, shape, use_fov)
                    loss = item_losses(asim, moved, lv["fixed"], w, lv["lncc"])
                    if cfg.affine_scale_penalty > 0:
                        pen = torch.log(torch.linalg.svdvals(mats[:, :3, :3])).pow(2).sum(-1)
                        loss = loss + cfg.affine_scale_penalty * pen
                    loss.sum().backward()
                    values = loss.detach().cpu().tolist()
                else:  # each item's forward and backward pass in turn: one item's graph in memory at a time
                    values = []
                    for b, k in enumerate(owners):
                        mat = bases[b] @ params.items[b].matrix(c, fx.half)
                        y = lv["points"] @ mat[:3, :3].T + mat[:3, 3]
                        moved = mov.pull_one(k, y, shape)
                        with torch.no_grad():
                            w = lv["weight"] * mov.inside_one(k, y, shape, use_fov)
                        loss = item_losses(asim, moved, lv["fixed"], w, lv["lncc"], vectorize=False)[0]
                        if cfg.affine_scale_penalty > 0:
                            loss = loss + cfg.affine_scale_penalty * torch.log(
                                torch.linalg.svdvals(mat[:3, :3])).pow(2).sum()
                        loss.backward()
                        values.append(float(loss.detach()))
                opt.step()
                curve.append(values)
            for b in range(nb):
                curves[b].append([v[b] for v in curve])
        with torch.no_grad():
            final = bases @ params.matrices(c, fx.half) if vec else torch.stack(
                [b @ m for b, m in zip(bases, params.matrices(c, fx.half))])
            return final.double().cpu(), curves

    t_affine = 0.0
    if aff_levels:
        t0 = time.perf_counter()
        restart = [k for k in range(n) if len(infos[k].get("top", [])) > 1] if cfg.initial_refine_iterations > 0 \
            else []
        if restart:  # multi-start: every candidate of every item in one run, a short one at the coarsest level
            owner = [k for k in restart for _ in infos[k]["top"]]
            bases = torch.stack([mat for k in restart for _, mat in infos[k]["top"]])
            _, curves = run_affine(bases, torch.tensor(owner, device=dev),
                                   [(aff_levels[0][0], cfg.initial_refine_iterations, aff_levels[0][2])], "restart")
            scores: dict[int, list[float]] = {k: [] for k in restart}
            for b, k in enumerate(owner):
                tail = curves[b][0][-max(1, len(curves[b][0]) // 5):]
                scores[k].append(sum(tail) / len(tail))
            for k in restart:
                infos[k]["restarts"] = [float(v) for v in scores[k]]
                infos[k]["restart_choice"] = int(min(range(len(scores[k])), key=lambda i: scores[k][i]))
                transforms[k] = infos[k]["top"][infos[k]["restart_choice"]][1]
        mats, curves = run_affine(torch.stack(transforms), None, aff_levels, "affine")
        transforms = list(mats)
        for k in range(n):
            losses[k]["affine"] = curves[k]
        t_affine = time.perf_counter() - t0

    # ---------------------------------------------------------------------------------------------- deformable
    fields: list[Tensor] | None = None
    field_grid: Grid | None = None
    t_deform = 0.0
    if def_levels:
        fields, field_grid, t_deform = _deformable(cfg, def_levels, level, sim, transforms, use_fov, n, vec, dev,
                                                   progress, losses, infos)
    total = time.perf_counter() - t_start
    out = []
    for k in range(n):
        timings = {"prepare": prepare[k]}
        if "initial" in cfg.stages:
            timings["initial"] = t_initial[k]
        if aff_levels:
            timings["affine"] = t_affine
        if def_levels:
            timings["deformable"] = t_deform
        timings.update(total=t_fixed + total, batch_size=float(n))
        out.append(RegistrationResult(
            fixed_grid=fx.grid, affine=transforms[k].double().cpu(),
            field=None if fields is None else fields[k], field_grid=field_grid,
            fixed_meta=dict(fx.meta), timings=timings, losses=losses[k], initial=infos[k], config=cfg,
        ))
    return out


def _deformable(cfg, def_levels, level, sim, transforms, use_fov, n, vec, dev, progress, losses, infos):
    """The deformable stage of the batch: ``(fields, field_grid, seconds)``, one field per item in world mm
    ``[3, *S]`` (``fields`` and ``field_grid`` None when every level was too thin: affine only)."""
    from monai.losses import BendingEnergyLoss, DiffusionLoss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from monai.networks.blocks import DVF2DDF, Warp

        warp = Warp(mode="bilinear", padding_mode="border")
        integrate = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="zeros") if cfg.diffeomorphic else None
    reduction = "none" if vec else "mean"
    bending, diffusion = BendingEnergyLoss(reduction=reduction), DiffusionLoss(reduction=reduction)
    t0 = time.perf_counter()
    tm = torch.stack(transforms).to(device=dev, dtype=torch.float32)
    for k in range(n):
        losses[k]["deformable"] = []
    prev: tuple[list[Tensor], Grid] | None = None  # (per item: velocity or displacement, world mm [1, 3, *S]; grid)
    last: list[Tensor] = []
    sigma = [cfg.field_sigma] * 3

    def regularised(loss: Tensor, ddf: Tensor) -> Tensor:
        """Per-item ``loss`` ``[B]`` plus the regularisers of ``ddf`` ``[B, 3, *S]``, added as :func:`register`
        adds them."""
        per_item = (lambda e: e.flatten(1).mean(1)) if vec else (lambda e: e.reshape(1))  # noqa: E731
        if cfg.regularization > 0:
            with warnings.catch_warnings():  # MONAI's BendingEnergyLoss indexes with a list (torch warns)
                warnings.filterwarnings("ignore", message="Using a non-tuple sequence")
                loss = loss + cfg.regularization * per_item(bending(ddf))
        if cfg.diffusion > 0:
            loss = loss + cfg.diffusion * per_item(diffusion(ddf))
        return loss

    for s, n_it in def_levels:
        lv, mov = level(s, sim)
        shape = lv["grid"].shape
        if min(shape) < 5:  # a thin slab at a coarse level: too few voxels for a smooth field
            for k in range(n):
                infos[k].setdefault("skipped_levels", []).append(s)
            continue
        with torch.no_grad():
            y = _apply(tm, lv["points"], vec)
            if vec:
                pre = [mov.pull(y, None, shape)]  # moving features, affinely on the working grid
                w = [lv["weight"] * mov.inside(y, None, shape, use_fov)]
            else:
                pre = [mov.pull_one(k, y[k], shape) for k in range(n)]
                w = [lv["weight"] * mov.inside_one(k, y[k], shape, use_fov) for k in range(n)]
            if prev is None:
                init = [torch.zeros((1, 3, *shape), device=dev) for _ in range(n)]
            else:
                init = [_world_to_vox_field(sample(u[0], prev[1].affine, lv["points"], padding_mode="border")
                                            .reshape(1, 3, *shape), lv["grid"]) for u in prev[0]]
        if vec:
            pars = [torch.cat(init).requires_grad_(True)]
        else:
            pars = [i.clone().requires_grad_(True) for i in init]
        opt = torch.optim.Adam(pars, lr=cfg.deformable_lr)
        curve: list[list[float]] = []
        for _ in _iterate(n_it, progress, f"deformable {s:g} mm x{n}"):
            opt.zero_grad(set_to_none=True)
            values: list[float] = []
            for b, par in enumerate(pars):  # vectorised: one batch; else one item at a time (one graph in memory)
                vel = smooth(par, sigma) if cfg.field_sigma > 0 else par
                ddf = integrate(vel) if integrate is not None else vel
                moved = warp(pre[b], ddf)
                loss = regularised(item_losses(sim, moved, lv["fixed"], w[b], lv["lncc"], vectorize=vec), ddf)
                loss.sum().backward()
                values += loss.detach().cpu().tolist()
            opt.step()
            curve.append(values)
        for k in range(n):
            losses[k]["deformable"].append([v[k] for v in curve])
        with torch.no_grad():
            vels = [smooth(par, sigma) if cfg.field_sigma > 0 else par for par in pars]
            world = [_vox_to_world_field(v, lv["grid"]) for v in vels]
            prev = ([u for wv in world for u in wv.split(1)], lv["grid"])
            last = [integrate(v) if integrate is not None else v for v in vels]
            last = [d for dv in last for d in dv.split(1)]
    seconds = time.perf_counter() - t0
    if prev is None:  # every level was too thin: affine only
        return None, None, seconds
    return [_vox_to_world_field(d.detach(), prev[1])[0] for d in last], prev[1], seconds
