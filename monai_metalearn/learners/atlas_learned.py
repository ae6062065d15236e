"""Registration as a data engine: an appearance model trained on the query from the masks registration carries.

:class:`AtlasSelfTrainingSegmenter` (the ``atlas_selftrain`` learner of the bundles) registers the K labelled support
scans to the query like :class:`~monai_metalearn.learners.AtlasSegmenter`, then uses what registration produced as
training data for a small per-voxel network fitted on the spot, in the spirit of Brainstorm / DeepAtlas
(registration makes the labelled examples; a learned model decides the structure from its appearance):

* **pseudo-labels on the query itself**: the fused carried mask, eroded by ``margin`` voxels, is foreground; the
  query outside the carried mask dilated by ``margin`` is background; the band between (where a registration error
  of a few voxels changes the label) and, with K > 1, every voxel where the atlases disagree, is left out of the
  loss (weight 0). So the model decides the boundary from the query's own contrast, where registration is unsure;
* **the registered atlases** (same modality only): each atlas image warped onto the query with its mask warped by
  the same transform is an exactly labelled example of the structure under a real inter-subject deformation.

Training is confined to a box around the carried mask (``roi_margin`` voxels); intensities are z-scored per image
inside that box (never an HU window). The model is an MLP (``channels`` wide, two hidden layers) on per-voxel
features (the intensity; optional context features, ``feature_sigmas``), trained from a fixed seed with Adam for
``steps`` full-batch steps of class-balanced binary cross-entropy. Its log-odds are added to the log-odds of the
smoothed carried prior (``sigma`` voxels): the output is the atlas prior corrected by the learned appearance, like
:class:`~monai_metalearn.learners.AtlasIntensitySegmenter` (whose intensity model is two histograms re-estimated by
EM on every voxel near the prior), here learned from the confident voxels only. Outside the box the output is
background.

Nothing is meta-trained (``trainable = False``): the model is fitted per (support, query) pair at ``adapt``-time,
deterministically for a seed. Registration is shared with the other atlas learners (same cache), so scoring several
structures of one atlas in one query registers once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .atlas import AtlasSegmenter

__all__ = ["AtlasSelfTrainingSegmenter", "self_training_posterior"]


def _features(x: Tensor, sigmas: Sequence[float] = ()) -> Tensor:
    """Per-voxel appearance features ``[F, *S]`` of a z-scored box ``[*S]``: the intensity, and its Gaussian
    smoothings and local standard deviations at ``sigmas`` voxels."""
    from monai_metalearn.registration.grid import smooth

    v = x[None, None]
    out = [x]
    for s in sigmas:
        g = smooth(v, [s] * 3)[0, 0]
        out += [g, (smooth(v * v, [s] * 3)[0, 0] - g * g).clamp_min(0).sqrt()]
    return torch.stack(out)


def _net(n_features: int, channels: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_features, channels), nn.LeakyReLU(0.1), nn.Linear(channels, channels),
                         nn.LeakyReLU(0.1), nn.Linear(channels, 1))


def _zscore(x: Tensor) -> Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-6)


def self_training_posterior(
    soft: Tensor,
    query: Tensor,
    atlas_images: Tensor | None = None,
    margin: int = 2,
    roi_margin: int = 8,
    sigma: float = 2.0,
    steps: int = 200,
    lr: float = 1e-2,
    channels: int = 32,
    seed: int = 0,
    feature_sigmas: Sequence[float] = (),
    max_samples: int | None = 60000,
) -> Tensor:
    """Foreground probability ``[1, *S]`` of the query from the K carried soft masks (see the module docstring).

    Args:
        soft: carried soft masks ``[K, *S]`` on the query grid, in ``[0, 1]``.
        query: the query image ``[1, *S]`` (any intensity scale).
        atlas_images: the K atlas images warped onto the query grid ``[K, 1, *S]``, used as labelled examples with
            their carried masks (None: only the query's pseudo-labels; what cross-modality registration should pass).
        margin: half-width (voxels) of the band around the carried boundary left out of the loss.
        roi_margin: margin (voxels) of the training box around the carried mask.
        sigma: smoothing (voxels) of the prior whose log-odds the network corrects.
        steps: Adam steps.
        lr: their learning rate.
        channels: width of the network.
        seed: seed of the network's initialisation.
        feature_sigmas: context features besides the intensity (Gaussian smoothing and local standard deviation at
            these widths, voxels). Default none: measured on BTCV, context features pull the boundary inward (a
            voxel near the edge looks like its surroundings once smoothed) and lose to the intensity alone.
        max_samples: training voxels drawn (seeded, uniformly) from the labelled ones; None: all of them.

    Returns:
        probability ``[1, *S]``; all zeros when the carried masks are empty.

    Raises:
        ValueError: ``soft`` and ``query`` of different spatial shapes.
    """
    from monai_metalearn.registration.grid import smooth

    soft = soft.float()
    shape = tuple(soft.shape[-3:])
    if tuple(query.shape[-3:]) != shape:
        raise ValueError(f"self_training_posterior: carried masks {shape} and query {tuple(query.shape[-3:])} differ")
    mean = soft.mean(0)
    fg = mean >= 0.5
    out = torch.zeros(1, *shape)
    if not bool(fg.any()):
        return out
    # the training box: the carried mask's bounding box plus roi_margin voxels
    idx = fg.nonzero()
    lo = (idx.min(0).values - roi_margin).clamp_min(0).tolist()
    hi = [min(s, int(v) + roi_margin + 1) for s, v in zip(shape, idx.max(0).values)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    hard = soft[(slice(None), *box)] >= 0.5
    agree = hard.all(0) | (~hard).all(0)
    fg_box = fg[box]
    target = fg_box.float()
    from monai_metalearn.registration.pairwise import _dilate

    inner = ~_dilate(~fg_box[None, None], margin)[0, 0]  # erosion: the background dilated
    outer = ~_dilate(fg_box[None, None], margin)[0, 0]
    weight = (inner | outer) & agree
    feats = [_features(_zscore(query.float().reshape(shape)[box]), feature_sigmas)]
    targets, weights = [target], [weight.float()]
    if atlas_images is not None:
        for k in range(atlas_images.shape[0]):
            img = atlas_images[k].float().reshape(shape)[box]
            inside = img.abs() > 0  # outside the atlas's field of view the warped image is 0: no label there
            feats.append(_features(_zscore(img), feature_sigmas))
            targets.append(hard[k].float())
            weights.append(inside.float())
    n_feat = feats[0].shape[0]
    x = torch.cat([f.reshape(n_feat, -1).T for f in feats])
    y = torch.cat([t.reshape(-1) for t in targets])
    w = torch.cat([v.reshape(-1) for v in weights])
    keep = (w > 0).nonzero()[:, 0]
    gen = torch.Generator().manual_seed(seed)
    if max_samples and keep.numel() > max_samples:  # a seeded subsample: the cost no longer grows with the organ
        keep = keep[torch.randperm(keep.numel(), generator=gen)[: int(max_samples)]]
    x, y, w = x[keep], y[keep], w[keep]
    if not bool((y > 0).any()) or not bool((y == 0).any()):  # nothing to contrast: keep the carried prior
        return smooth(mean[None, None], [sigma] * 3)[0]
    # class balance: foreground and background weigh the same in the loss
    w = w * torch.where(y > 0, 0.5 / (w * y).sum(), 0.5 / (w * (1 - y)).sum())
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    cpu_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = _net(n_feat, channels)
    torch.random.set_rng_state(cpu_state)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    xs = (x - mu) / sd
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        for _ in range(int(steps)):
            opt.zero_grad(set_to_none=True)
            loss = (F.binary_cross_entropy_with_logits(net(xs)[:, 0], y, reduction="none") * w).sum()
            loss.backward()
            opt.step()
    with torch.no_grad():
        q = (feats[0].reshape(n_feat, -1).T - mu) / sd
        logit = net(q)[:, 0].reshape(hard.shape[1:])
        prior = smooth(mean[None, None], [sigma] * 3)[0, 0][box].clamp(1e-3, 1 - 1e-3)
        out[(0, *box)] = torch.sigmoid(logit + torch.log(prior / (1 - prior)))
    return out


class AtlasSelfTrainingSegmenter(AtlasSegmenter):
    """Registration as a data engine (see the module docstring); the ``atlas_selftrain`` learner of the bundles.

    Args:
        margin, roi_margin, sigma, steps, lr, channels, feature_sigmas, max_samples: see :func:`self_training_posterior`.
        use_atlas_images: train on the registered atlas images too (only when atlas and query share a modality,
            i.e. the registration similarity is not ``"mind"``).
        kwargs: :class:`~monai_metalearn.learners.AtlasSegmenter` arguments (``spacing``, ``similarity``,
            ``registration``, ``seed`` ...).

    Raises:
        ValueError: a negative ``margin`` / ``roi_margin``, ``steps`` < 1, or a non-positive ``lr`` / ``channels``;
            and what :class:`AtlasSegmenter` raises.
    """

    def __init__(self, fusion: str = "mean", margin: int = 2, roi_margin: int = 8, sigma: float = 2.0,
                 steps: int = 200, lr: float = 1e-2, channels: int = 32, use_atlas_images: bool = True,
                 feature_sigmas: Sequence[float] = (), max_samples: int | None = 60000, **kwargs: Any) -> None:
        super().__init__(fusion=fusion, **kwargs)
        if int(margin) < 0 or int(roi_margin) < 0:
            raise ValueError(f"AtlasSelfTrainingSegmenter: margin and roi_margin must be >= 0, got {margin}, "
                             f"{roi_margin}")
        if int(steps) < 1 or float(lr) <= 0 or int(channels) < 1:
            raise ValueError(f"AtlasSelfTrainingSegmenter: steps >= 1, lr > 0 and channels >= 1 are required, got "
                             f"steps={steps}, lr={lr}, channels={channels}")
        self.margin, self.roi_margin, self.sigma = int(margin), int(roi_margin), float(sigma)
        self.steps, self.lr, self.channels = int(steps), float(lr), int(channels)
        self.use_atlas_images = bool(use_atlas_images)
        self.feature_sigmas = tuple(float(v) for v in feature_sigmas)
        self.max_samples = None if max_samples is None else int(max_samples)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, steps={self.steps}"

    def fuse(self, soft: Tensor, images: Tensor, query: Tensor) -> Tensor:
        same_modality = self.config.similarity != "mind"
        return self_training_posterior(
            soft.cpu(), query.cpu(), images.cpu() if (self.use_atlas_images and same_modality) else None,
            margin=self.margin, roi_margin=self.roi_margin, sigma=self.sigma, steps=self.steps, lr=self.lr,
            channels=self.channels, seed=self.seed, feature_sigmas=self.feature_sigmas,
            max_samples=self.max_samples).to(query.device)
