"""Prototypical Networks (Snell et al., 2017).

Prototypes are the class means of the support embeddings; a query's logits are the negative squared Euclidean
distances to the prototypes (``distance="euclidean"``) or ``scale`` times the cosine similarities
(``distance="cosine"``). Training is ordinary back-propagation of the query cross-entropy into the encoder, so the
default :meth:`~monai_metalearn.learners.base.Learner.outer_step` applies.

Two interfaces: the learner contract (:meth:`ProtoNet.meta_loss`, :meth:`ProtoNet.adapt` returning a
:class:`PrototypePredictor`) and easyfsl's two calls (``process_support_set(x, y)`` then ``forward(query_x)``).

BatchNorm: ``"transductive"`` (default: support and query batches each normalised with their own statistics, running
statistics untouched) or ``"frozen"`` (running statistics, e.g. for a pretrained MONAI backbone); see
:mod:`monai_metalearn.networks.batchnorm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monai_metalearn.networks.batchnorm import batch_norm_mode, check_batch_norm_mode

from .base import Learner, accuracy, check_episode, infer_n_way

__all__ = ["ProtoNet", "PrototypePredictor", "compute_prototypes", "prototype_logits"]

DISTANCES = ("euclidean", "cosine")


def compute_prototypes(features: Tensor, labels: Tensor, n_way: int | None = None) -> Tensor:
    """Class means of ``features`` ``[B, F]`` for labels ``[B]`` in ``0..N-1``; returns ``[N, F]``.

    Args:
        features: embeddings.
        labels: class ids.
        n_way: number of classes; default ``labels.max() + 1`` (every class must occur).

    Raises:
        ValueError: for mismatched sizes or a class without samples.
    """
    if features.dim() != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)} do not match")
    n_way = infer_n_way(labels) if n_way is None else n_way
    one_hot = F.one_hot(labels, n_way).to(features.dtype)  # [B, N]
    counts = one_hot.sum(0)
    if bool((counts == 0).any()):
        raise ValueError(f"classes without support samples: {torch.nonzero(counts == 0).flatten().tolist()}")
    return one_hot.t() @ features / counts[:, None]


def prototype_logits(
    features: Tensor, prototypes: Tensor, distance: str = "euclidean", scale: Tensor | float = 1.0
) -> Tensor:
    """Logits ``[B, N]``: ``-||f - p||^2`` (euclidean) or ``scale * cos(f, p)`` (cosine)."""
    if distance == "euclidean":
        return -((features[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1)
    return scale * F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).t()


class PrototypePredictor:
    """Predictor holding prototypes: ``x -> prototype_logits(encoder(x), prototypes)``.

    Args:
        learner: the :class:`ProtoNet` (its encoder, distance, scale and BatchNorm mode are used).
        prototypes: ``[N, F]``.
    """

    def __init__(self, learner: ProtoNet, prototypes: Tensor) -> None:
        self.learner = learner
        self.prototypes = prototypes

    def __call__(self, x: Tensor) -> Tensor:
        return self.learner.logits(self.learner.embed(x), self.prototypes)


class ProtoNet(Learner):
    """Prototypical network learner.

    Args:
        encoder: maps ``[B, C, D, H, W]`` to ``[B, F]`` (e.g. :class:`~monai_metalearn.networks.ConvEncoder3D`).
        distance: ``"euclidean"`` (negative squared distance) or ``"cosine"`` (scaled cosine similarity).
        scale: cosine temperature (ignored for euclidean).
        learn_scale: learn the cosine temperature.
        n_way: expected classes per episode; inferred when ``None``.
        batch_norm: ``"transductive"`` or ``"frozen"``.

    Raises:
        ValueError: for an unknown ``distance`` or a non-positive ``scale``.

    Example::

        learner = ProtoNet(ConvEncoder3D(features=(16, 32, 64)))
        loss, metrics = learner.meta_loss(sx, sy, qx, qy)
        learner.process_support_set(sx, sy)  # easyfsl style
        logits = learner(qx)
    """

    def __init__(
        self,
        encoder: nn.Module,
        distance: str = "euclidean",
        scale: float = 10.0,
        learn_scale: bool = False,
        n_way: int | None = None,
        batch_norm: str = "transductive",
    ) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.encoder = encoder
        self.distance = distance
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)))
        self.n_way = n_way
        self.batch_norm = check_batch_norm_mode(batch_norm)
        self.loss_fn = nn.CrossEntropyLoss()
        self.prototypes: Tensor | None = None

    def embed(self, x: Tensor) -> Tensor:
        """Encoder features ``[B, F]`` under the learner's BatchNorm mode."""
        with batch_norm_mode(self.encoder, self.batch_norm):
            return self.encoder(x)

    def logits(self, features: Tensor, prototypes: Tensor) -> Tensor:
        """Logits ``[B, N]`` of ``features`` against ``prototypes``."""
        return prototype_logits(features, prototypes, self.distance, self.scale)

    def meta_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy of the query logits against prototypes of the support set.

        Raises:
            ValueError: for a malformed episode (classification labels are required).
        """
        n_way = check_episode(support_x, support_y, query_x, query_y, self.n_way)
        if n_way is None:
            raise ValueError("ProtoNet needs 1-D integer class labels in support_y")
        prototypes = compute_prototypes(self.embed(support_x), support_y, n_way)
        logits = self.logits(self.embed(query_x), prototypes)
        loss = self.loss_fn(logits, query_y)
        return loss, {"loss": float(loss.detach()), "accuracy": accuracy(logits, query_y)}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> PrototypePredictor:
        """Compute (detached) prototypes of the support set and return a :class:`PrototypePredictor`.

        Raises:
            ValueError: for a malformed support set.
        """
        n_way = check_episode(support_x, support_y, n_way=self.n_way)
        if n_way is None:
            raise ValueError("ProtoNet needs 1-D integer class labels in support_y")
        with torch.no_grad():
            prototypes = compute_prototypes(self.embed(support_x), support_y, n_way)
        return PrototypePredictor(self, prototypes)

    def process_support_set(self, support_x: Tensor, support_y: Tensor) -> None:
        """easyfsl-style: compute and store the prototypes (with graph, if gradients are enabled).

        Raises:
            ValueError: for a malformed support set.
        """
        n_way = check_episode(support_x, support_y, n_way=self.n_way)
        if n_way is None:
            raise ValueError("ProtoNet needs 1-D integer class labels in support_y")
        self.prototypes = compute_prototypes(self.embed(support_x), support_y, n_way)

    def forward(self, query_x: Tensor) -> Tensor:
        """easyfsl-style: logits of ``query_x`` against the prototypes stored by :meth:`process_support_set`.

        Raises:
            RuntimeError: if :meth:`process_support_set` was not called first.
        """
        if self.prototypes is None:
            raise RuntimeError("call process_support_set(support_x, support_y) before forward(query_x)")
        return self.logits(self.embed(query_x), self.prototypes)
