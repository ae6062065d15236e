"""Few-shot 3D segmentation: Dice metric and loss, prototype segmentation (PANet / SSL-ALPNet), fine-tuning baselines
and a factory that also puts MAML, FOMAML, ANIL and Reptile on a segmentation network.

Episodes are tensors: ``support_x`` ``[Ks, 1, D, H, W]`` (float), ``support_y`` ``[Ks, 1, D, H, W]`` (binary mask,
positive is the structure, any dtype), ``query_x`` / ``query_y`` alike. Logits are ``[B, 2, D, H, W]`` (background,
foreground); the predicted mask is their arg-max.

Masks of meta-training episodes may hold :data:`~monai_metalearn.transforms.IGNORE_LABEL` (-1) voxels: neither
structure nor background (setting 2 of the abdominal protocol: the held-out test organs inside the training scans).
Every loss, metric and prototype here leaves them out: :class:`SegmentationLoss` masks them (MONAI's
``MaskedDiceLoss`` and a cross-entropy with ``ignore_index``), :func:`dice_from_logits` does not score them, and
background prototypes are pooled over the voxels equal to 0 only.

* :class:`PrototypeSegmenter`: foreground and background prototypes are masked averages of the support features;
  a query voxel's logit for a class is ``scale`` times its cosine similarity to the class prototype (PANet, Wang et
  al., 2019), or with ``local=True`` a softmax-weighted combination of the similarities to regional prototypes
  (SSL-ALPNet, Ouyang et al., 2020). Training adds PANet's prototype alignment loss. Prototypes are vectors, so the
  predictor works on any spatial size (e.g. windows of ``monai.inferers.SlidingWindowInferer``).
* :class:`SegmentationFineTune`: "pre-trained, then fine-tuned" (supervised pre-training of the backbone with one
  sigmoid channel per meta-train structure, then a copy fine-tuned on each support set) and "from scratch" (a freshly
  initialised network fine-tuned on each support set; nothing is meta-trained).
* :func:`create_segmentation_learner`: every learner above, plus MAML / FOMAML / ANIL / Reptile on
  :class:`~monai_metalearn.networks.SegmentationModel` with the DiceCE loss and the Dice metric.

Mixed precision follows :mod:`monai_metalearn.learners.precision`: the MAML-family and Reptile inner loops take their
gradients through :func:`~monai_metalearn.learners.precision.inner_grads` (float16 losses scaled, overflowing steps
redone in float32); the fine-tuning baselines pre-train with the forward pass under autocast and the backward pass
outside it, and fine-tune on each support set in float32 with autocast disabled.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss, MaskedDiceLoss
from monai.utils import ensure_tuple_rep
from torch import Tensor, nn

from monai_metalearn.metrics import binary_dice
from monai_metalearn.networks.batchnorm import batch_norm_mode, check_batch_norm_mode
from monai_metalearn.networks.segmentation import SegmentationModel, segmentation_features
from monai_metalearn.transforms.intensity import IGNORE_LABEL

from .base import Episode, Learner, average_metrics, check_episode
from .factory import checkpoint_inner_steps, configure_memory, learner_key
from .maml import ANIL, FOMAML, MAML
from .precision import forward_autocast, no_autocast
from .atlas import AtlasIntensitySegmenter, AtlasSegmenter, MultiAtlasSegmenter
from .atlas_learned import AtlasSelfTrainingSegmenter
from .references import BoxAlignedReference, WholeBodyReference
from .reptile import Reptile

__all__ = [
    "SEGMENTATION_LEARNERS",
    "VOLUME_LEARNERS",
    "segmentation_learner_key",
    "PrototypeSegPredictor",
    "PrototypeSegmenter",
    "SegmentationFineTune",
    "SegmentationFineTunedPredictor",
    "SegmentationGlobalLabels",
    "SegmentationLoss",
    "create_segmentation_learner",
    "dice_from_logits",
    "local_prototypes",
    "masked_average_pooling",
    "prototype_segmentation_logits",
    "segmentation_loss",
]

#: Learners that take whole volumes and have nothing to meta-train (the trivial references and the registration-based
#: atlas learners), by name.
VOLUME_LEARNERS: dict[str, type[Learner]] = {"wholebody": WholeBodyReference, "boxaligned": BoxAlignedReference,
                                             "atlas": AtlasSegmenter, "multiatlas": MultiAtlasSegmenter,
                                             "atlas_em": AtlasIntensitySegmenter,
                                             "atlas_selftrain": AtlasSelfTrainingSegmenter}

SEGMENTATION_LEARNERS = ("maml", "fomaml", "anil", "reptile", "protoseg", "finetune", "scratch", *VOLUME_LEARNERS)
"""Names accepted by :func:`create_segmentation_learner`."""


def segmentation_learner_key(name: str) -> str | None:
    """The :data:`SEGMENTATION_LEARNERS` name of ``name`` (case-insensitive, ``-``/``_`` ignored: ``"ATLAS-EM"`` ->
    ``"atlas_em"``), or None for an unknown name."""
    return {learner_key(k): k for k in SEGMENTATION_LEARNERS}.get(learner_key(name))

ALIGN_WITH = ("prediction", "mask")

_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


# --------------------------------------------------------------------------------------------------- metric and loss
def _with_channel(y: Tensor, ndim: int) -> Tensor:
    """``y`` with a channel dimension: ``[B, *S]`` becomes ``[B, 1, *S]`` when the images have ``ndim`` dims."""
    return y.unsqueeze(1) if y.dim() == ndim - 1 else y


def _foreground(y: Tensor, ndim: int) -> Tensor:
    """Binary foreground mask ``[B, 1, *S]`` (bool) of a mask or global-id target (positive is foreground; the
    ignored voxels, ``IGNORE_LABEL``, are not)."""
    return _with_channel(y, ndim) > 0


def _valid(y: Tensor, ndim: int) -> Tensor:
    """The voxels ``[B, 1, *S]`` (bool) that count: all but the ``IGNORE_LABEL`` (negative) ones."""
    return _with_channel(y, ndim) >= 0


def _binary_target(y: Tensor, ndim: int) -> Tensor:
    """Float ``[B, 1, *S]`` target: 1 on the structure, 0 on the background, ``IGNORE_LABEL`` where ignored."""
    y = _with_channel(y, ndim)
    fg = (y > 0).float()
    return torch.where(y < 0, torch.full_like(fg, float(IGNORE_LABEL)), fg)


def dice_from_logits(logits: Tensor, y: Tensor) -> float:
    """Dice of the predicted masks against ``y > 0``, pooled over the batch (all voxels of all samples), ignored
    voxels (``IGNORE_LABEL``) left out.

    Pooling matters for patches: a background-only patch would otherwise score 1.0 for an empty prediction, so a
    model that predicts nothing would look half right on a pos/neg patch batch.

    Args:
        logits: ``[B, C, *S]``; the prediction is the arg-max over channels (``C >= 2``, channel 0 being the
            background) or ``logits > 0`` (``C == 1``).
        y: reference masks ``[B, 1, *S]`` or ``[B, *S]``; positive is foreground, negative ignored.

    Returns:
        :func:`~monai_metalearn.metrics.binary_dice` of the batch taken as one volume (1.0 when prediction and
        reference are both empty), as a Python float.
    """
    logits = logits.detach()
    pred = logits.argmax(1, keepdim=True) if logits.shape[1] > 1 else logits > 0
    valid = _valid(y, logits.dim())
    pred = pred & valid
    return float(binary_dice(pred.reshape(1, -1), _foreground(y, logits.dim()).reshape(1, -1)))


class SegmentationLoss(nn.Module):
    """``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)`` taking masks of any dtype.

    ``y`` ``[B, 1, *S]`` or ``[B, *S]`` is cast to float (DiceCELoss one-hot encodes it and casts it to long for the
    cross-entropy); with 2-channel logits it is binarised first (positive is foreground), so global-id masks work too.

    Voxels of ``y`` equal to ``IGNORE_LABEL`` (any negative value) take no part: the Dice term is MONAI's
    ``MaskedDiceLoss`` over the other voxels and the cross-entropy averages over them only (``ignore_index``), so the
    loss and its gradient do not depend on the logits of ignored voxels. Without ignored voxels the loss is exactly
    ``DiceCELoss``.

    Args:
        kwargs: further ``DiceCELoss`` arguments (``lambda_dice``, ``lambda_ce``, ``smooth_nr`` ...).
    """

    _DICE_ARGS = ("include_background", "squared_pred", "jaccard", "smooth_nr", "smooth_dr", "batch", "weight")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, **kwargs)
        self.masked_dice = MaskedDiceLoss(
            to_onehot_y=True, softmax=True, **{k: v for k, v in kwargs.items() if k in self._DICE_ARGS})
        self.lambda_dice = float(kwargs.get("lambda_dice", 1.0))
        self.lambda_ce = float(kwargs.get("lambda_ce", 1.0))

    def forward(self, logits: Tensor, y: Tensor) -> Tensor:
        """Scalar DiceCE loss of ``logits`` ``[B, C, *S]`` against ``y`` (ignored voxels left out)."""
        y = _with_channel(y, logits.dim())
        valid = y >= 0
        target = (y > 0).float() if logits.shape[1] == 2 else y.float()
        if bool(valid.all()):
            return self.loss(logits, target)
        target = target * valid
        dice = self.masked_dice(logits, target, mask=valid.float())
        if not bool(valid.any()):
            return self.lambda_dice * dice + 0.0 * logits.sum()
        ce = F.cross_entropy(logits, torch.where(valid, target, torch.full_like(target, -100.0))[:, 0].long(),
                             ignore_index=-100)
        return self.lambda_dice * dice + self.lambda_ce * ce


def segmentation_loss(**kwargs: Any) -> SegmentationLoss:
    """The default segmentation loss: :class:`SegmentationLoss` (DiceCE with softmax, one-hot targets)."""
    return SegmentationLoss(**kwargs)


# ------------------------------------------------------------------------------------------------------ prototypes
def _mask_weights(mask: Tensor, features: Tensor) -> Tensor:
    """Voxel weights ``[B, 1, *s]`` of ``mask`` at the resolution of ``features`` ``[B, F, *s]``.

    Floating masks are used as weights (expected in ``[0, 1]``); other dtypes are binarised (nonzero is 1). A mask of
    another spatial size is resized by area averaging (when shrinking every axis: fractional weights at the borders)
    or nearest neighbour (otherwise). Float32, whatever the features' dtype.
    """
    mask = _with_channel(mask, features.dim())
    if mask.dim() != features.dim() or mask.shape[0] != features.shape[0] or mask.shape[1] != 1:
        raise ValueError(
            f"mask {tuple(mask.shape)} must be [B, 1, *S] for features {tuple(features.shape)} ([B, F, *S])"
        )
    w = mask.float() if torch.is_floating_point(mask) else (mask != 0).float()
    size = tuple(features.shape[2:])
    if tuple(w.shape[2:]) != size:
        shrink = all(s <= m for s, m in zip(size, w.shape[2:]))
        w = F.interpolate(w, size=size, mode="area" if shrink else "nearest")
    return w


def masked_average_pooling(features: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``features`` over the voxels of ``mask``, across the whole batch (PANet's masked average pooling).

    Args:
        features: ``[B, F, *S]``.
        mask: ``[B, 1, *S']`` (or ``[B, *S']``); nonzero voxels count (floating masks are weights in ``[0, 1]``). A mask
            of another size than the features is resized to them (area averaging when shrinking, else nearest).

    Returns:
        ``[F]`` float32 (also for half-precision features): ``sum(features * mask) / sum(mask)`` over the batch and
        the voxels.

    Raises:
        ValueError: if the mask is empty (no voxel with a positive weight) or its shape does not fit.
    """
    w = _mask_weights(mask, features)
    total = w.sum()
    if not bool(total > 0):
        raise ValueError(f"the mask is empty: no voxel to average the features over (mask shape {tuple(mask.shape)})")
    dims = [0, *range(2, features.dim())]
    return (features.float() * w).sum(dims) / total


def local_prototypes(
    features: Tensor, mask: Tensor, pool_size: Sequence[int] | int = (4, 4, 4), threshold: float = 0.95
) -> Tensor:
    """Regional prototypes of one class (SSL-ALPNet's local prototypes, in 3D) plus the global one.

    The features and the mask are average-pooled with ``kernel = stride = pool_size`` (clipped to the feature size);
    every window whose mask fraction is at least ``threshold`` gives one prototype, its average feature. The global
    masked average (:func:`masked_average_pooling`) is always appended, so a class always has a prototype.

    Args:
        features: ``[B, F, *S]``.
        mask: ``[B, 1, *S']`` or ``[B, *S']`` (resized to the features like in :func:`masked_average_pooling`).
        pool_size: window size per spatial axis (an int for all axes).
        threshold: minimum fraction of the window inside the mask.

    Returns:
        ``[P, F]`` float32: the local prototypes (``P - 1`` of them, possibly none), then the global one.

    Raises:
        ValueError: if the mask is empty, or ``threshold`` is not in ``(0, 1]``.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    w = _mask_weights(mask, features)
    nd = features.dim() - 2
    pool = tuple(min(int(p), int(s)) for p, s in zip(ensure_tuple_rep(pool_size, nd), features.shape[2:]))
    pooled_f = _AVG_POOL[nd](features.float(), pool, pool)  # [B, F, *s]
    pooled_w = _AVG_POOL[nd](w, pool, pool)  # [B, 1, *s]
    selected = pooled_w[:, 0] >= threshold - 1e-6  # [B, *s]
    local = pooled_f.movedim(1, -1)[selected]  # [P - 1, F]
    return torch.cat([local, masked_average_pooling(features, w)[None]])


def prototype_segmentation_logits(
    features: Tensor, prototypes: Sequence[Tensor], scale: float | Tensor = 20.0
) -> Tensor:
    """Logits ``[B, C, *S]`` of ``features`` ``[B, F, *S]`` against the prototypes of ``C`` classes.

    For class ``c`` with prototypes ``P_c`` ``[P, F]``, ``sims = scale * cos(feature_voxel, P_c)`` and the logit is
    ``sum_p softmax(sims)_p * sims_p`` (SSL-ALPNet); with one prototype this is ``scale * cos(feature_voxel, P_c)``
    (PANet).
    """
    f = F.normalize(features, dim=1)
    out = []
    for p in prototypes:
        sims = scale * torch.einsum("bf...,pf->bp...", f, F.normalize(p.float(), dim=1).to(f.dtype))
        out.append((torch.softmax(sims, dim=1) * sims).sum(1))
    return torch.stack(out, 1)


class PrototypeSegPredictor:
    """Predictor of :class:`PrototypeSegmenter`: ``x -> logits [B, 2, *S]`` against fixed prototypes.

    Works on any spatial size (the prototypes are vectors), e.g. as the network of a ``SlidingWindowInferer``.

    Args:
        learner: the segmenter (its encoder, scale and BatchNorm mode are used).
        prototypes: ``(background, foreground)`` prototypes, each ``[P, F]``.
    """

    def __init__(self, learner: PrototypeSegmenter, prototypes: Sequence[Tensor]) -> None:
        self.learner = learner
        self.prototypes = tuple(prototypes)

    @property
    def background(self) -> Tensor:
        """Background prototypes ``[P, F]``."""
        return self.prototypes[0]

    @property
    def foreground(self) -> Tensor:
        """Foreground prototypes ``[P, F]``."""
        return self.prototypes[1]

    def __call__(self, x: Tensor) -> Tensor:
        return self.learner.logits(self.learner.embed(x), self.prototypes)


class PrototypeSegmenter(Learner):
    """Prototype-based few-shot segmentation: PANet (global prototypes) or SSL-ALPNet (``local=True``).

    The support features are pooled into a foreground prototype (support mask) and a background prototype (its
    complement); each query voxel is labelled by its scaled cosine similarity to them (see
    :func:`prototype_segmentation_logits`). With ``local=True`` each class has regional prototypes
    (:func:`local_prototypes`) and the global one.

    :meth:`meta_loss` is ``loss_fn(query logits, query mask) + align_weight * alignment``. The alignment loss is
    PANet's: prototypes computed from the QUERY features with the query's PREDICTED mask (arg-max of the query logits,
    detached; ``align_with="mask"`` uses the query's reference mask instead) segment the SUPPORT images, scored with
    ``loss_fn`` against the support masks. With ``align_with="prediction"`` it is skipped (zero) for an episode whose
    prediction has no foreground or no background voxel, as in PANet. Gradients flow into the encoder through both
    the support and the query features; the default training step applies.

    Cost of ``local=True``: every query voxel is compared with every prototype, ``B x P x voxels`` similarities, and
    on full-resolution features (a dense UNet's) the background alone gives about ``Ks x voxels / prod(pool_size)``
    windows. SSL-ALPNet pools 4x4 windows of a stride-8 feature map (32-pixel windows); here choose ``pool_size``
    near a quarter of the patch side (16 for 64^3 patches: 64 windows per patch). The default 4 suits small patches
    only: 5 support patches of 64^3 give ~20k prototypes, ~20 GB of similarities per 64^3 query patch.

    Args:
        encoder: maps ``[B, C, *S]`` to features ``[B, F, *S]`` at any resolution (masks are resized to it), e.g.
            :func:`~monai_metalearn.networks.unet_backbone`.
        scale: the temperature multiplying cosine similarities (20 in PANet / SSL-ALPNet).
        local: use regional (SSL-ALPNet) prototypes besides the global ones.
        pool_size: window of the regional prototypes, in feature voxels.
        threshold: minimum mask fraction of a window to make a regional prototype.
        align_weight: weight of the alignment loss (0 disables it).
        loss_fn: ``loss_fn(logits, mask) -> scalar`` with ``mask`` a float 0/1 ``[B, 1, *S]`` tensor; default
            :func:`segmentation_loss`.
        align_with: ``"prediction"`` (PANet) or ``"mask"``: which query mask makes the alignment prototypes.
        batch_norm: ``"transductive"`` or ``"frozen"`` for an encoder with BatchNorm (instance norm needs neither).

    Raises:
        ValueError: for a non-positive ``scale``, a negative ``align_weight``, a ``threshold`` outside ``(0, 1]`` or an
            unknown ``align_with``.

    Example::

        learner = PrototypeSegmenter(unet_backbone(feature_channels=16), local=True)
        loss, metrics = learner.meta_loss(sx, sy, qx, qy)  # metrics: loss, dice
        predictor = learner.adapt(sx, sy)
        logits = SlidingWindowInferer((64, 64, 64))(volume, predictor)
    """

    def __init__(
        self,
        encoder: nn.Module,
        scale: float = 20.0,
        local: bool = False,
        pool_size: Sequence[int] | int = (4, 4, 4),
        threshold: float = 0.95,
        align_weight: float = 1.0,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        align_with: str = "prediction",
        batch_norm: str = "transductive",
    ) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if align_weight < 0:
            raise ValueError(f"align_weight must be >= 0, got {align_weight}")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if align_with not in ALIGN_WITH:
            raise ValueError(f"align_with must be one of {ALIGN_WITH}, got {align_with!r}")
        self.encoder = encoder
        self.scale = float(scale)
        self.local = bool(local)
        self.pool_size = pool_size
        self.threshold = float(threshold)
        self.align_weight = float(align_weight)
        self.loss_fn = loss_fn if loss_fn is not None else segmentation_loss()
        self.align_with = align_with
        self.batch_norm = check_batch_norm_mode(batch_norm)

    def forward(self, x: Tensor) -> Tensor:
        """Encoder features ``[B, F, *S]``."""
        return self.embed(x)

    def embed(self, x: Tensor) -> Tensor:
        """Encoder features ``[B, F, *S]`` under the learner's BatchNorm mode."""
        with batch_norm_mode(self.encoder, self.batch_norm):
            return self.encoder(x)

    def prototypes(self, features: Tensor, mask: Tensor, what: str = "support") -> tuple[Tensor, Tensor]:
        """``(background, foreground)`` prototypes ``[P, F]`` of ``features`` with the foreground ``mask``.

        Args:
            features: ``[B, F, *S]``.
            mask: ``[B, 1, *S']``; positive is foreground, 0 background, negative (``IGNORE_LABEL``) neither.
            what: name used in error messages.

        Raises:
            ValueError: if the mask has no foreground or no background voxel.
        """
        fg = _foreground(mask, features.dim())
        bg = _valid(mask, features.dim()) & ~fg
        if not bool(fg.any()):
            raise ValueError(f"{what} mask is empty: the structure has no voxel in the {what} patches")
        if not bool(bg.any()):
            raise ValueError(f"{what} background mask is empty: the structure fills the whole {what} patches")
        fg, bg = fg.float(), bg.float()
        if self.local:
            return tuple(local_prototypes(features, m, self.pool_size, self.threshold) for m in (bg, fg))
        return masked_average_pooling(features, bg)[None], masked_average_pooling(features, fg)[None]

    def logits(self, features: Tensor, prototypes: Sequence[Tensor]) -> Tensor:
        """Logits ``[B, 2, *S]`` of ``features`` against ``(background, foreground)`` prototypes."""
        return prototype_segmentation_logits(features, prototypes, self.scale)

    def meta_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Query segmentation loss against support prototypes, plus the alignment loss (see the class docstring).

        Returns:
            ``(loss, {"loss", "dice"})``: the total loss (with graph when gradients are enabled) and the query Dice.

        Raises:
            ValueError: for a malformed episode or an empty support mask.
        """
        check_episode(support_x, support_y, query_x, query_y)
        t_s = _binary_target(support_y, support_x.dim())
        t_q = _binary_target(query_y, query_x.dim())
        fs, fq = self.embed(support_x), self.embed(query_x)
        logits = self.logits(fq, self.prototypes(fs, t_s))
        loss = self.loss_fn(logits, t_q)
        if self.align_weight > 0:
            mask_q = logits.detach().argmax(1, keepdim=True) != 0 if self.align_with == "prediction" else t_q > 0
            valid_q = t_q >= 0
            if bool((mask_q & valid_q).any()) and bool((~mask_q & valid_q).any()):
                align_mask = torch.where(valid_q, mask_q.float(), torch.full_like(t_q, float(IGNORE_LABEL)))
                support_logits = self.logits(fs, self.prototypes(fq, align_mask, "query"))
                loss = loss + self.align_weight * self.loss_fn(support_logits, t_s)
        return loss, {"loss": float(loss.detach()), "dice": dice_from_logits(logits, t_q)}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> PrototypeSegPredictor:
        """Prototypes of the support set (detached), as a :class:`PrototypeSegPredictor`.

        Raises:
            ValueError: for a malformed support set, or "support mask is empty: the structure has no voxel in the
                support patches".
        """
        check_episode(support_x, support_y)
        with torch.no_grad():
            prototypes = self.prototypes(self.embed(support_x), _binary_target(support_y, support_x.dim()))
        return PrototypeSegPredictor(self, tuple(p.detach() for p in prototypes))


# ----------------------------------------------------------------------------------------------- fine-tuning
class SegmentationGlobalLabels:
    """``prepare_episode`` for :class:`SegmentationFineTune`'s pre-training: binary masks -> global structure ids.

    The masks of an episode of structure ``s`` become ``(mask > 0) * (index(s) + 1)`` (int64), so a voxel value
    ``v > 0`` means "meta-train structure ``v - 1``" and 0 is background; ignored voxels (``IGNORE_LABEL``) stay
    ignored. Use it as the trainer's
    ``prepare_episode`` for the ``finetune`` learner only; evaluation keeps binary masks.

    Args:
        structures: the meta-train structures, in the order of the base head's channels (names or ids, compared as
            strings with the episode's ``"structure"``).

    Example::

        trainer = MetaTrainer(..., prepare_episode=SegmentationGlobalLabels(["liver", "spleen", "kidney"]))
    """

    def __init__(self, structures: Sequence[Any]) -> None:
        self.structures = [str(s) for s in structures]
        self.index = {s: i for i, s in enumerate(self.structures)}

    def structure_id(self, structure: Any) -> int:
        """The index of an episode's ``"structure"`` (a name, or a one-element list after collation).

        Raises:
            KeyError: for a structure that is not a meta-train structure.
        """
        if isinstance(structure, (list, tuple)) and len(structure) == 1:
            structure = structure[0]
        if isinstance(structure, Tensor) and structure.numel() == 1:
            structure = structure.item()
        name = str(structure)
        if name not in self.index:
            raise KeyError(f"structure {name!r} is not a meta-train structure; known: {self.structures}")
        return self.index[name]

    def __call__(
        self, episode: Mapping[str, Any], device: Any = None, non_blocking: bool = False, **kwargs: Any
    ) -> Episode:
        from monai_metalearn.engines import default_prepare_episode

        sx, sy, qx, qy = default_prepare_episode(episode, device, non_blocking, **kwargs)
        value = self.structure_id(episode["structure"]) + 1

        def relabel(y: Tensor) -> Tensor:
            return torch.where(y < 0, torch.full_like(y, IGNORE_LABEL, dtype=torch.long), (y > 0).long() * value)

        return sx, relabel(sy), qx, relabel(qy)


def _reset_parameters(module: nn.Module) -> None:
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()


class SegmentationFineTunedPredictor:
    """Predictor of :class:`SegmentationFineTune`: the fine-tuned network (eval mode, no gradient): ``x -> logits``.

    Args:
        model: the fine-tuned :class:`~monai_metalearn.networks.SegmentationModel`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, x: Tensor) -> Tensor:
        with torch.no_grad(), forward_autocast():
            return self.model(x)


class SegmentationFineTune(Learner):
    """Fine-tuning baselines of few-shot segmentation: "pre-trained, then fine-tuned" and "from scratch".

    * ``pretrained=True``: meta-training is supervised pre-training of ``encoder`` and a base head
      ``Conv3d(F, n_base_structures, 1)`` with one sigmoid channel per meta-train structure. Targets carry GLOBAL
      structure ids (voxel value ``v > 0`` is structure ``v - 1``; map episodes with
      :class:`SegmentationGlobalLabels`): the loss is ``DiceLoss(sigmoid=True) + BCE`` on the channel of the sample's
      structure only (the other structures are not annotated in its patches), against ``target > 0``.
      :meth:`outer_step` / :meth:`meta_batch_step` are one such step on the support and query patches together.
      Binary masks would be read as structure 0: map them.
    * ``pretrained=False``: nothing is meta-trained. :meth:`outer_step` / :meth:`meta_batch_step` check the episode
      but touch no weight and no optimizer, and return ``{"loss": nan, "dice": nan}``: there is no training loss, and
      NaN (not 0) keeps logs from reading as a perfect fit.

    :meth:`adapt` deep-copies the encoder (re-initialised for ``pretrained=False``), puts a new ``Conv3d(F, 2, 1)``
    head on it (zero-initialised by default; :class:`~monai_metalearn.networks.SegmentationModel`), and trains both
    on the support set with Adam (``finetune_lr``) for ``finetune_steps`` full-batch steps of ``loss_fn``, in float32
    (autocast disabled) and with gradients enabled; the learner's own weights are never modified. Initialisations are
    drawn from ``seed`` (the global random state is left untouched), so adaptation is deterministic. :meth:`meta_loss`
    is evaluation only (adapt on the support set, query loss without graph, Dice).

    Args:
        encoder: dense backbone ``[B, C, *S] -> [B, feature_channels, *S]`` (e.g.
            :func:`~monai_metalearn.networks.unet_backbone`).
        feature_channels: its output channels ``F``.
        n_base_structures: meta-train structures (channels of the base head); required when ``pretrained``.
        pretrained: pre-train on meta-train structures (``True``) or fine-tune from scratch (``False``).
        finetune_steps: Adam steps on each support set.
        finetune_lr: their learning rate.
        loss_fn: fine-tuning (and evaluation) loss ``loss_fn(logits [B, 2, *S], mask [B, 1, *S])``; default
            :func:`segmentation_loss`.
        seed: seed of the re-initialised encoder (``pretrained=False``) and of a randomly initialised new head.
        zero_init_head: start the new head at zero (default): the first steps follow the class differences of the
            features. A random head on pre-trained features, which can be large, often predicts one class everywhere
            and takes many steps to recover (measured: 0.85 -> 0.00 query Dice after 20 steps on a synthetic task).

    Raises:
        ValueError: for ``pretrained`` without a positive ``n_base_structures``, a non-positive ``feature_channels``,
            negative ``finetune_steps`` or a non-positive ``finetune_lr``.

    Example::

        learner = SegmentationFineTune(unet_backbone(feature_channels=16), 16, n_base_structures=10)
        trainer = MetaTrainer(..., learner=learner, prepare_episode=SegmentationGlobalLabels(train_structures))
        predictor = learner.adapt(support_x, support_y)  # fine-tuned copy
        logits = predictor(query_x)  # [B, 2, D, H, W]
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_channels: int,
        n_base_structures: int | None = None,
        pretrained: bool = True,
        finetune_steps: int = 50,
        finetune_lr: float = 1e-3,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        seed: int = 0,
        zero_init_head: bool = True,
    ) -> None:
        super().__init__()
        if feature_channels < 1:
            raise ValueError(f"feature_channels must be >= 1, got {feature_channels}")
        if pretrained and (n_base_structures is None or int(n_base_structures) < 1):
            raise ValueError(
                f"the pre-trained fine-tuning baseline needs n_base_structures >= 1 (the number of meta-train "
                f"structures), got {n_base_structures}"
            )
        if int(finetune_steps) < 0 or finetune_lr <= 0:
            raise ValueError(f"need finetune_steps >= 0 and finetune_lr > 0, got {finetune_steps}, {finetune_lr}")
        self.encoder = encoder
        self.feature_channels = int(feature_channels)
        self.pretrained = bool(pretrained)
        self.n_base_structures = int(n_base_structures) if n_base_structures is not None else None
        self.base_head: nn.Module | None = None
        if self.pretrained:
            ref = next(encoder.parameters(), None)
            head = nn.Conv3d(self.feature_channels, self.n_base_structures, kernel_size=1)
            self.base_head = head.to(ref.device) if ref is not None else head
        self.finetune_steps = int(finetune_steps)
        self.finetune_lr = float(finetune_lr)
        self.loss_fn = loss_fn if loss_fn is not None else segmentation_loss()
        self.seed = int(seed)
        self.zero_init_head = bool(zero_init_head)
        self.pretrain_dice = DiceLoss(sigmoid=True)
        self.pretrain_masked_dice = MaskedDiceLoss(sigmoid=True)
        self.pretrain_bce = nn.BCEWithLogitsLoss()

    # ------------------------------------------------------------------------------------------- pre-training
    def forward(self, x: Tensor) -> Tensor:
        """Base-structure logits ``[B, n_base_structures, *S]`` (one sigmoid channel per meta-train structure).

        Raises:
            RuntimeError: for ``pretrained=False`` (no base head).
        """
        if self.base_head is None:
            raise RuntimeError("the from-scratch baseline has no base head: it is not pre-trained")
        return self.base_head(segmentation_features(self.encoder(x)))

    def structure_ids(self, y: Tensor) -> Tensor:
        """The global structure id ``[B]`` of each sample of global-id masks ``y`` (voxel ``v > 0`` is ``v - 1``).

        When the batch shows a single id, every sample has it (patches without the structure included); otherwise
        each sample must show exactly one.

        Raises:
            ValueError: for masks without any structure voxel, several ids in one sample (or a sample without any in a
                mixed batch), non-integer or negative values, or an id outside ``0..n_base_structures-1``.
        """
        flat = y.detach().reshape(y.shape[0], -1).float()
        flat = torch.where(flat == IGNORE_LABEL, torch.zeros_like(flat), flat)  # ignored voxels show no structure
        values = torch.unique(flat[flat != 0])
        if values.numel() == 0:
            raise ValueError("the masks are empty: cannot tell which structure to pre-train on")
        if bool((values < 0).any()) or bool((values != values.round()).any()):
            raise ValueError(f"global-id masks must hold 0 or structure id + 1, got values {values.tolist()}")
        if int(values.max()) > self.n_base_structures:
            raise ValueError(
                f"masks hold structure ids outside 0..{self.n_base_structures - 1} (values {values.tolist()}); "
                f"episodes must be mapped with SegmentationGlobalLabels(train_structures)"
            )
        if values.numel() == 1:
            return torch.full((y.shape[0],), int(values[0]) - 1, dtype=torch.long, device=y.device)
        high = flat.amax(1)
        low = torch.where(flat != 0, flat, torch.full_like(flat, math.inf)).amin(1)
        if bool((high == 0).any()) or bool((high != low).any()):
            raise ValueError("in a batch of several structures each sample must show exactly one structure id")
        return high.long() - 1

    def pretrain_loss(self, x: Tensor, y: Tensor, structure_ids: Tensor | None = None) -> tuple[Tensor, float]:
        """``DiceLoss(sigmoid) + BCE`` of each sample's structure channel against ``y > 0``; returns ``(loss, dice)``.

        Voxels equal to ``IGNORE_LABEL`` take no part (``MaskedDiceLoss`` and a masked BCE).

        Args:
            x: ``[B, C, *S]``.
            y: global-id masks ``[B, 1, *S]``.
            structure_ids: ``[B]`` global ids; default :meth:`structure_ids` of ``y``.
        """
        y = _with_channel(y, x.dim())
        ids = self.structure_ids(y) if structure_ids is None else structure_ids.to(device=x.device, dtype=torch.long)
        logits = self(x)
        # [B, 1, *S], float32: the Dice sums over all voxels of the batch would overflow in float16
        selected = logits[torch.arange(x.shape[0], device=x.device), ids][:, None].float()
        target = (y > 0).to(selected.dtype)
        valid = y >= 0
        if bool(valid.all()):
            loss = self.pretrain_dice(selected, target) + self.pretrain_bce(selected, target)
            return loss, float(binary_dice(selected.detach() > 0, target))
        w = valid.to(selected.dtype)
        bce = F.binary_cross_entropy_with_logits(selected, target, weight=w, reduction="sum") / w.sum().clamp_min(1.0)
        loss = self.pretrain_masked_dice(selected, target, mask=w) + bce
        return loss, float(binary_dice((selected.detach() > 0) & valid, target))

    def pretrain_step(
        self, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, scaler: Any | None = None
    ) -> dict[str, float]:
        """One supervised pre-training step on a batch of global-id masks; returns ``{"loss", "dice"}``.

        Raises:
            ValueError: see :meth:`structure_ids`.
        """
        return self._pretrain_episodes([(x, y)], optimizer, scaler)

    def _pretrain_episodes(
        self, parts: Sequence[tuple[Tensor, Tensor]], optimizer: torch.optim.Optimizer, scaler: Any | None
    ) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        all_metrics = []
        for x, y in parts:
            with forward_autocast():
                loss, dice = self.pretrain_loss(x, y)
            scaled = loss / len(parts)
            with no_autocast(x.device.type):
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            all_metrics.append({"loss": float(loss.detach()), "dice": dice})
        with no_autocast(parts[0][0].device.type):
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        return average_metrics(all_metrics)

    def outer_step(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: Any | None = None,
    ) -> dict[str, float]:
        """One pre-training step on the episode's support and query patches together (global-id masks).

        For ``pretrained=False`` nothing happens (see the class docstring): ``{"loss": nan, "dice": nan}``.

        Raises:
            ValueError: for a malformed episode or masks that are not global ids (see :meth:`structure_ids`).
        """
        metrics = self.meta_batch_step([(support_x, support_y, query_x, query_y)], optimizer, scaler)
        metrics.pop("tasks")
        return metrics

    def meta_batch_step(
        self, episodes: Sequence[Episode], optimizer: torch.optim.Optimizer | None = None, scaler: Any | None = None
    ) -> dict[str, float]:
        """One pre-training step on several episodes (gradients averaged over episodes), plus ``"tasks"``.

        Each episode's support and query patches are concatenated (they must have the same size) and its structure
        is read from its masks; one episode's graph is alive at a time. For ``pretrained=False`` nothing happens.

        Raises:
            ValueError: for no episode, a malformed episode, or a pre-training step without an optimizer.
        """
        episodes = list(episodes)
        if not episodes:
            raise ValueError("meta_batch_step needs at least one episode")
        parts = []
        for sx, sy, qx, qy in episodes:
            check_episode(sx, sy, qx, qy)
            if sx.shape[2:] != qx.shape[2:]:
                raise ValueError(f"support and query patches differ in size: {tuple(sx.shape)} vs {tuple(qx.shape)}")
            parts.append((torch.cat([sx, qx]), torch.cat([_with_channel(sy, sx.dim()), _with_channel(qy, qx.dim())])))
        if not self.pretrained:
            return {"loss": math.nan, "dice": math.nan, "tasks": float(len(episodes))}
        if optimizer is None:
            raise ValueError("the pre-trained fine-tuning baseline needs an optimizer to pre-train")
        out = self._pretrain_episodes(parts, optimizer, scaler)
        out["tasks"] = float(len(episodes))
        return out

    # ------------------------------------------------------------------------------------------- adaptation
    def _fresh_model(self) -> SegmentationModel:
        """A deep copy of the encoder (re-initialised when not pre-trained) with a new 2-channel head, seeded."""
        ref = next(self.encoder.parameters(), None)
        device = ref.device if ref is not None else torch.device("cpu")
        cuda = []
        if device.type == "cuda":
            cuda = [device.index if device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.seed)
            encoder = copy.deepcopy(self.encoder)
            if not self.pretrained:
                _reset_parameters(encoder)
            model = SegmentationModel(encoder, self.feature_channels, 2, zero_init_head=self.zero_init_head)
        return model.to(device=device, dtype=torch.float32).requires_grad_(True)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> SegmentationFineTunedPredictor:
        """Fine-tune a copy of the (pre-trained or fresh) network on the support set; return its predictor.

        Raises:
            ValueError: for a malformed support set, or "support mask is empty: the structure has no voxel in the
                support patches".
        """
        check_episode(support_x, support_y)
        fg = _foreground(support_y, support_x.dim())
        if not bool(fg.any()):
            raise ValueError("support mask is empty: the structure has no voxel in the support patches")
        model = self._fresh_model()
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=self.finetune_lr)
        x, target = support_x.float(), _binary_target(support_y, support_x.dim())
        with torch.enable_grad(), no_autocast(x.device.type):  # float32 fine-tuning
            for _ in range(self.finetune_steps):
                opt.zero_grad(set_to_none=True)
                self.loss_fn(model(x), target).backward()
                opt.step()
        model.eval().requires_grad_(False)
        return SegmentationFineTunedPredictor(model)

    def meta_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Evaluation only: fine-tune on the support set, return the query loss (no graph) and ``{"loss", "dice"}``.

        Raises:
            ValueError: for a malformed episode or an empty support mask.
        """
        check_episode(support_x, support_y, query_x, query_y)
        logits = self.adapt(support_x, support_y)(query_x).float()
        fg_q = _binary_target(query_y, query_x.dim())
        with torch.no_grad():
            loss = self.loss_fn(logits, fg_q)
        return loss, {"loss": float(loss), "dice": dice_from_logits(logits, fg_q)}


# ------------------------------------------------------------------------------------------------------- factory
_GRADIENT_LEARNERS: dict[str, type[Learner]] = {"maml": MAML, "fomaml": FOMAML, "anil": ANIL, "reptile": Reptile}


def create_segmentation_learner(
    name: str,
    backbone: nn.Module | None = None,
    feature_channels: int | None = None,
    n_base_structures: int | None = None,
    activation_checkpointing: bool | str = False,
    channels_last: bool = False,
    **kwargs: Any,
) -> Learner:
    """A few-shot segmentation learner of the family ``name`` around a dense ``backbone``.

    * ``maml``, ``fomaml``, ``anil``, ``reptile``: the learner on ``SegmentationModel(backbone, feature_channels, 2)``
      with ``loss_fn=segmentation_loss()``, ``metric_fn=dice_from_logits``, ``metric_name="dice"`` (overridable
      through ``kwargs``);
    * ``protoseg``: ``PrototypeSegmenter(backbone, **kwargs)``;
    * ``finetune`` / ``scratch``: ``SegmentationFineTune(backbone, feature_channels, n_base_structures,
      pretrained=name == "finetune", **kwargs)``;
    * the whole-volume learners of :data:`VOLUME_LEARNERS` (``wholebody``, ``boxaligned``, and the registration-based
      ones when registered): ``cls(**kwargs)``; ``backbone`` is not used.

    Args:
        name: one of :data:`SEGMENTATION_LEARNERS` (case-insensitive; ``-``/``_`` ignored, see
            :func:`~monai_metalearn.learners.learner_key`).
        backbone: ``[B, C, *S] -> [B, feature_channels, *S]``, e.g. :func:`~monai_metalearn.networks.unet_backbone`.
        feature_channels: the backbone's output channels.
        n_base_structures: meta-train structures, for ``finetune``'s pre-training head.
        activation_checkpointing: ``False`` (default), ``True`` (= ``"all"``), ``"blocks"``, ``"steps"`` or ``"all"``:
            checkpoint the backbone's blocks and/or the second-order inner steps of ``maml`` / ``anil``
            (:func:`~monai_metalearn.learners.factory.configure_memory`); a config entry, no code change.
        channels_last: store the backbone in ``channels_last_3d`` (pays on CUDA only).
        kwargs: the learner's own arguments (``inner_lr``, ``inner_steps``, ``local``, ``finetune_steps`` ...).

    Raises:
        ValueError: unknown name (the message lists the known ones), or ``finetune`` without ``n_base_structures``.
        ConfigError: (a ``ValueError``) a bad ``activation_checkpointing`` or ``channels_last``, or either of them
            for a whole-volume learner (no network).

    Example::

        learner = create_segmentation_learner("anil", unet_backbone(feature_channels=16), 16, inner_lr=0.1)
    """
    key = segmentation_learner_key(name)
    if key is None:
        raise ValueError(f"unknown segmentation learner {name!r}; choose one of {list(SEGMENTATION_LEARNERS)}.")
    if key in _GRADIENT_LEARNERS and (backbone is None or feature_channels is None):
        raise ValueError(f"segmentation learner {name!r} needs a backbone and its feature_channels.")
    mode = configure_memory(None if key in VOLUME_LEARNERS else backbone, activation_checkpointing, channels_last)
    if key in _GRADIENT_LEARNERS:
        model = SegmentationModel(backbone, feature_channels, 2)
        kwargs = {"loss_fn": segmentation_loss(), "metric_fn": dice_from_logits, "metric_name": "dice", **kwargs}
        return checkpoint_inner_steps(_GRADIENT_LEARNERS[key](model, **kwargs), mode, key)
    if key in VOLUME_LEARNERS:  # whole-volume learners: no network
        return VOLUME_LEARNERS[key](**kwargs)
    if backbone is None or feature_channels is None:
        raise ValueError(f"segmentation learner {name!r} needs a backbone and its feature_channels.")
    if key == "protoseg":
        return checkpoint_inner_steps(PrototypeSegmenter(backbone, **kwargs), mode, key)
    if key == "finetune" and n_base_structures is None:
        raise ValueError("the 'finetune' learner needs n_base_structures (the number of meta-train structures).")
    learner = SegmentationFineTune(
        backbone, feature_channels, n_base_structures, pretrained=key == "finetune", **kwargs
    )
    return checkpoint_inner_steps(learner, mode, key)
