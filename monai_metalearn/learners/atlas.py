"""Registration-based atlas segmentation with the learner contract (``adapt(support) -> predictor``).

Each labelled support scan (an *atlas*) is registered to the query (:func:`~monai_metalearn.registration.register`:
initial search along the body axis, affine, deformable), its mask carried onto the query's grid, and the K carried
masks fused:

* ``"majority"``: :func:`~monai_metalearn.registration.majority_vote` of the K carried masks (each thresholded at
  0.5; a tie is background). With K = 1 it is the carried mask.
* ``"weighted"``: :func:`~monai_metalearn.registration.weighted_vote`, each atlas's vote weighted per voxel by the
  local NCC of its registered image with the query.
* ``"staple"``: :func:`~monai_metalearn.registration.staple` (binary STAPLE, EM of each atlas's sensitivity and
  specificity).
* ``"mean"``: the mean of the carried soft masks, thresholded at 0.5.

Nothing is meta-trained (``trainable = False``): the bundle's ``inference.json`` and ``evaluate.json`` run these
learners without a checkpoint. Volumes are whole scans (``whole_volume = True``): ``MetaTensor``\\ s with their
affines, or plain tensors on a RAS grid of ``spacing`` mm (what the project's loaders give).

Example::

    from monai_metalearn.learners import AtlasSegmenter

    atlas = AtlasSegmenter(spacing=(3, 3, 3))
    predictor = atlas.adapt([support_image], [support_mask])      # [1, *S] each
    mask = predictor(query_image[None]).argmax(1)                  # [1, *S']
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .references import VolumeLearner, _as_volumes, mask_logits

__all__ = ["AtlasIntensitySegmenter", "AtlasSegmenter", "MultiAtlasSegmenter", "FUSIONS", "as_meta", "atlas_intensity_posterior"]

FUSIONS = ("majority", "weighted", "staple", "mean")


def as_meta(volume: Tensor, spacing: Sequence[float]) -> Tensor:
    """``volume`` ``[1, *S]`` as a ``MetaTensor`` with its own affine, or (a plain tensor) the affine of a RAS grid of
    ``spacing`` mm with its origin at voxel 0."""
    from monai.data import MetaTensor

    if isinstance(volume, MetaTensor) and volume.affine is not None:
        return volume
    affine = torch.diag(torch.tensor([*map(float, spacing), 1.0], dtype=torch.float64))
    return MetaTensor(torch.as_tensor(volume).float(), affine=affine)


def _fingerprint(x: Tensor) -> str:
    """Content hash of a volume (cache key of a registration)."""
    data = x.detach().float().cpu().contiguous()
    return hashlib.sha1(data.numpy().tobytes()).hexdigest() + str(tuple(data.shape))


def _check_registration_fields(settings: Mapping[str, Any], where: str) -> None:
    """ValueError naming the keys of ``settings`` that are not :class:`RegistrationConfig` fields."""
    from monai_metalearn.registration import RegistrationConfig

    fields = {f.name for f in dataclasses.fields(RegistrationConfig)}
    bad = sorted(set(settings) - fields)
    if bad:
        raise ValueError(f"{where}: unknown registration settings {bad}; RegistrationConfig has {sorted(fields)}")


class AtlasSegmenter(VolumeLearner):
    """Atlas (K = 1) and multi-atlas (K > 1) segmentation by pairwise registration and label fusion.

    Args:
        fusion: one of :data:`FUSIONS` (K > 1; with K = 1 every fusion gives the carried mask).
        spacing: voxel size (mm) of plain-tensor inputs (``MetaTensor`` inputs use their affines).
        similarity: registration similarity: ``"auto"`` (``"lncc"`` when atlases and queries share a modality,
            ``"mind"`` when they do not, as :meth:`prepare_protocol` is told; ``"lncc"`` until then), ``"lncc"``
            (mono-modal), ``"mind"`` (cross-modal, e.g. CT atlas to MR query), ``"ncc"``, ``"mi"``.
        registration: further :class:`~monai_metalearn.registration.RegistrationConfig` fields (e.g.
            ``{"spacing": 4.0, "stages": ["initial", "affine"]}``).
        weighted_sigma: Gaussian window (voxels of the query grid) of the ``"weighted"`` fusion's local NCC.
        device: where registrations run (default: the query's device).
        seed: registration seed (runs are deterministic on the CPU).
        cache_size: registrations kept per (atlas, query) pair: segmenting several structures of one atlas in one
            query registers once.
        progress: progress bars over the registration iterations.
        atlas_batch_size: the atlases of one query (those not cached) are registered together, up to this many in
            one problem (:func:`~monai_metalearn.registration.register_many`: the query side prepared once, one
            optimisation for all). On the CPU the results are those of one
            :func:`~monai_metalearn.registration.register` per atlas bit for bit, at the same peak memory and as
            fast or faster (0.97x for 3 atlases, 1.18x for 5 on a shared machine:
            ``benchmarks/bench_registration_scale.py``), hence the default 8; on CUDA the batch runs batched kernels
            (equal up to float rounding; speed not measured yet, no GPU lent). 1: one registration at a time.

    Raises:
        ValueError: unknown ``fusion`` or similarity, an unknown ``registration`` field, or ``atlas_batch_size`` not
            a positive integer.
    """

    def __init__(
        self,
        fusion: str = "majority",
        spacing: Sequence[float] = (3.0, 3.0, 3.0),
        similarity: str = "auto",
        registration: Mapping[str, Any] | None = None,
        weighted_sigma: float = 2.0,
        device: str | torch.device | None = None,
        seed: int = 0,
        cache_size: int = 8,
        progress: bool = False,
        atlas_batch_size: int = 8,
    ) -> None:
        super().__init__()
        from monai_metalearn.registration import RegistrationConfig

        from monai_metalearn.registration import SIMILARITIES

        if similarity != "auto" and similarity not in SIMILARITIES:
            raise ValueError(f"AtlasSegmenter: similarity must be 'auto' or one of {SIMILARITIES}, got {similarity!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"AtlasSegmenter: fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        self.spacing = tuple(float(s) for s in (spacing if isinstance(spacing, Sequence) else [spacing] * 3))
        if len(self.spacing) != 3:
            raise ValueError(f"AtlasSegmenter: spacing needs 3 values, got {spacing!r}")
        _check_registration_fields(registration or {}, "AtlasSegmenter")
        self.similarity = str(similarity)
        self.registration = dict(registration or {})
        self.config = RegistrationConfig(similarity="lncc" if similarity == "auto" else similarity,
                                         **self.registration)
        self.weighted_sigma = float(weighted_sigma)
        self.device = device
        self.seed = int(seed)
        self.cache_size = int(cache_size)
        self.progress = bool(progress)
        if isinstance(atlas_batch_size, bool) or not isinstance(atlas_batch_size, int) or atlas_batch_size < 1:
            raise ValueError(f"AtlasSegmenter: atlas_batch_size must be a positive integer, got {atlas_batch_size!r}")
        self.atlas_batch_size = int(atlas_batch_size)
        self._cache: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
        self.last_timings: list[dict[str, float]] = []

    def extra_repr(self) -> str:
        return f"fusion={self.fusion!r}, similarity={self.similarity!r}, spacing={self.spacing}"

    def prepare_protocol(self, spacing: Sequence[float] | None = None, support_modalities: Sequence[str] = (),
                         query_modalities: Sequence[str] = (), registration: Mapping[str, Any] | None = None) -> None:
        """Called by the evaluation and inference apps before a protocol or task: the voxel spacing of plain-tensor
        volumes, with ``similarity="auto"`` the similarity (MIND-SSC when the atlases' and queries' modalities
        differ, LNCC otherwise) and, with ``registration``, the registration settings the protocol's sources need
        (:func:`~monai_metalearn.data.registration_settings`, e.g. ACDC's in-plane rotation search): they replace
        those of the previous protocol, and a field set in the constructor's ``registration`` keeps its value.

        Raises:
            ValueError: ``registration`` names a field :class:`~monai_metalearn.registration.RegistrationConfig`
                does not have.
        """
        if registration is not None:
            from monai_metalearn.registration import RegistrationConfig

            _check_registration_fields(registration, "AtlasSegmenter.prepare_protocol")
            merged = {**{k: v for k, v in registration.items() if k != "similarity"}, **self.registration}
            self.config = RegistrationConfig(similarity=self.config.similarity, **merged)
        if spacing is not None:
            sp = [float(v) for v in (spacing if isinstance(spacing, Sequence) else [spacing] * 3)]
            self.spacing = tuple(sp if len(sp) == 3 else sp[:1] * 3)
        if self.similarity == "auto":
            cross = bool(set(support_modalities)) and bool(set(query_modalities)) and \
                set(support_modalities) != set(query_modalities)
            self.config = dataclasses.replace(self.config, similarity="mind" if cross else "lncc")

    # ------------------------------------------------------------------------------------------ registration
    def cache_key(self, atlas_image: Tensor, query_image: Tensor) -> tuple[str, str, str]:
        """The registration cache's key of a pair: both volumes' contents and the registration settings (a protocol
        that changes them, e.g. the similarity across modalities, never reuses a registration made with others)."""
        return _fingerprint(atlas_image), _fingerprint(query_image), repr(self.config)

    def register_pair(self, atlas_image: Tensor, query_image: Tensor):
        """:class:`~monai_metalearn.registration.RegistrationResult` of ``atlas_image`` registered to
        ``query_image`` (both ``[1, *S]``), cached by content."""
        from monai_metalearn.registration import register

        key = self.cache_key(atlas_image, query_image)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        result = register(as_meta(atlas_image, self.spacing), as_meta(query_image, self.spacing),
                          config=self.config, device=self.device, seed=self.seed, progress=self.progress)
        self._keep(key, result)
        return result

    def _keep(self, key: tuple[str, str, str], result: Any) -> None:
        self.last_timings.append(dict(result.timings))
        if self.cache_size > 0:
            self._cache[key] = result
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def register_atlases(self, atlas_images: Sequence[Tensor], query_image: Tensor) -> list:
        """The :class:`~monai_metalearn.registration.RegistrationResult` of every atlas registered to
        ``query_image`` (cached by content): the atlases not in the cache (each distinct one once) are registered
        together, ``atlas_batch_size`` per :func:`~monai_metalearn.registration.register_many` problem, or one by
        one (:meth:`register_pair`) when ``atlas_batch_size`` is 1 or a single atlas is missing."""
        from monai_metalearn.registration import register_many

        keys = [self.cache_key(a, query_image) for a in atlas_images]
        found: dict[tuple[str, str, str], Any] = {}
        todo: dict[tuple[str, str, str], Tensor] = {}
        for key, image in zip(keys, atlas_images):
            if key in self._cache:
                self._cache.move_to_end(key)
                found[key] = self._cache[key]
            elif key not in todo:
                todo[key] = image
        if len(todo) == 1 or (todo and self.atlas_batch_size == 1):
            for key, image in todo.items():
                found[key] = self.register_pair(image, query_image)
        elif todo:
            results = register_many([as_meta(a, self.spacing) for a in todo.values()],
                                    as_meta(query_image, self.spacing), config=self.config, device=self.device,
                                    seed=self.seed, progress=self.progress, batch_size=self.atlas_batch_size)
            for key, result in zip(todo, results):
                found[key] = result
                self._keep(key, result)
        return [found[key] for key in keys]

    def carry(self, atlas_images: Sequence[Tensor], atlas_masks: Sequence[Tensor], query: Tensor):
        """Soft masks ``[K, *S]`` and images ``[K, 1, *S]`` of the K atlases on the query's grid ``[1, *S]``."""
        soft, images = [], []
        for image, mask, result in zip(atlas_images, atlas_masks, self.register_atlases(atlas_images, query)):
            soft.append(result.warp_soft(as_meta(mask.float(), self.spacing)).as_tensor()[0])
            images.append(result.warp_image(as_meta(image, self.spacing)).as_tensor())
        return torch.stack(soft), torch.stack(images)

    def fuse(self, soft: Tensor, images: Tensor, query: Tensor) -> Tensor:
        """Foreground probability ``[1, *S]`` from the K carried soft masks ``[K, *S]`` (see the module docstring)."""
        from monai_metalearn.registration import majority_vote, staple, weighted_vote

        if soft.shape[0] == 1 or self.fusion == "mean":
            return soft.mean(0, keepdim=True)
        hard = (soft >= 0.5).to(torch.uint8)
        if self.fusion == "majority":
            return majority_vote(hard, label_ids=[1]).float().reshape(1, *soft.shape[1:])
        if self.fusion == "weighted":
            fused = weighted_vote(hard, images, query, sigma=self.weighted_sigma, label_ids=[1])
            return fused.float().reshape(1, *soft.shape[1:])
        _, probability, _, _ = staple(hard)
        return probability.float().reshape(1, *soft.shape[1:])

    # ------------------------------------------------------------------------------------------ contract
    def adapt(self, support_x, support_y):
        images, masks = _as_volumes(support_x, "support_x"), _as_volumes(support_y, "support_y")
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} support images but {len(masks)} support masks")
        masks = [(m > 0).float() for m in masks]
        for k, (i, m) in enumerate(zip(images, masks)):
            if tuple(i.shape[1:]) != tuple(m.shape[1:]):
                raise ValueError(f"support {k}: image {tuple(i.shape[1:])} and mask {tuple(m.shape[1:])} differ in "
                                 "shape")
            if not bool(m.any()):
                raise ValueError(f"support {k}: the mask is empty: the structure has no voxel in that scan")

        def predict(x: Tensor) -> Tensor:
            out = []
            for q in x:
                soft, warped = self.carry(images, masks, q)
                out.append(self.fuse(soft.to(q.device), warped.to(q.device), q))
            return mask_logits(torch.stack(out))  # foreground where p > 0.5 (a tie is background)

        return predict


class MultiAtlasSegmenter(AtlasSegmenter):
    """:class:`AtlasSegmenter` with locally weighted voting (``fusion="weighted"``) as its default fusion: the
    ``multiatlas`` learner of the bundles."""

    def __init__(self, fusion: str = "weighted", **kwargs: Any) -> None:
        super().__init__(fusion=fusion, **kwargs)


def atlas_intensity_posterior(prior: Tensor, image: Tensor, sigma: float = 2.0, iterations: int = 3,
                              bins: int = 32, floor: float = 0.01) -> Tensor:
    """Refines a carried mask on the query's own intensities: the classical atlas-prior EM segmentation.

    The carried soft mask ``prior`` ``[1, *S]`` (the atlases' fused probability), smoothed by a Gaussian of ``sigma``
    voxels, is a spatial prior ``pi(x)``; the structure's and its surroundings' intensity distributions are learned
    *on the query itself* (histograms of ``bins`` bins over the region where ``pi > floor``, weighted by the current
    posterior and its complement), and the posterior ``pi f(I) / (pi f(I) + (1 - pi) b(I))`` is re-estimated
    ``iterations`` times. Outside that region the posterior is 0. The atlases' pseudo-labels teach the intensity
    model, the boundary voxels where they are unsure weigh little, and the query's own contrast (another phase,
    another scanner) decides where the boundary goes.

    Args:
        prior: carried foreground probability on the query grid, ``[1, *S]`` in ``[0, 1]``.
        image: the query image ``[1, *S]`` (any intensity scale).
        sigma: prior smoothing (voxels): how far the boundary may move, about.
        iterations: EM iterations.
        bins: histogram bins between the region's 1st and 99th intensity percentiles.
        floor: the region of interest is ``pi > floor``.

    Returns:
        posterior ``[1, *S]`` in ``[0, 1]``.
    """
    from monai_metalearn.registration.grid import smooth

    p0 = prior.float().reshape(1, 1, *prior.shape[-3:])
    pi = smooth(p0, [sigma] * 3).clamp(1e-4, 1 - 1e-4)[0]
    x = torch.as_tensor(image).float().reshape(pi.shape)
    region = pi > floor
    if not bool(region.any()):
        return torch.zeros_like(pi)
    xv, piv = x[region], pi[region]
    lo, hi = torch.quantile(xv[:: max(1, xv.numel() // 100000)], torch.tensor([0.01, 0.99]))
    idx = ((xv - lo) / (hi - lo).clamp_min(1e-6) * bins).long().clamp(0, bins - 1)
    post = p0[0][region].clamp(0, 1)
    kernel = torch.tensor([0.25, 0.5, 0.25])
    for _ in range(int(iterations)):
        hists = []
        for w in (post, 1 - post):
            h = torch.zeros(bins).index_add_(0, idx, w)
            h = torch.nn.functional.conv1d(h[None, None], kernel[None, None], padding=1)[0, 0] + 1e-3
            hists.append(h / h.sum())
        f, b = hists[0][idx], hists[1][idx]
        post = piv * f / (piv * f + (1 - piv) * b)
    out = torch.zeros_like(pi)
    out[region] = post
    return out


class AtlasIntensitySegmenter(AtlasSegmenter):
    """Registration as a data engine for the query itself: the fused carried mask (:class:`AtlasSegmenter`, fusion
    ``"mean"`` by default) becomes the spatial prior and the pseudo-labels of an intensity model learned on the query
    (:func:`atlas_intensity_posterior`); the ``atlas_em`` learner of the bundles.

    Args:
        sigma, iterations, bins: see :func:`atlas_intensity_posterior`.
        kwargs: :class:`AtlasSegmenter` arguments.
    """

    def __init__(self, fusion: str = "mean", sigma: float = 2.0, iterations: int = 3, bins: int = 32,
                 **kwargs: Any) -> None:
        super().__init__(fusion=fusion, **kwargs)
        self.sigma, self.iterations, self.bins = float(sigma), int(iterations), int(bins)

    def fuse(self, soft: Tensor, images: Tensor, query: Tensor) -> Tensor:
        prior = super().fuse(soft, images, query)
        return atlas_intensity_posterior(prior, query, self.sigma, self.iterations, self.bins)
