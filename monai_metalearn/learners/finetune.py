"""Fine-tuning baselines: Baseline and Baseline++ (Chen et al., "A Closer Look at Few-shot Classification", 2019).

Two phases:

1. **Pre-training** on flat (non-episodic) batches of all meta-train classes with their GLOBAL class ids:
   :meth:`FineTuneBaseline.pretrain_step` ``(x, y_global, optimizer)`` is one ordinary supervised step of the encoder
   and a base-class head (linear, or cosine with scale for Baseline++). The trainer feeds it flat batches; BatchNorm, if
   any, trains normally (running statistics updated) in this phase.
2. **Adaptation** to a novel task: :meth:`FineTuneBaseline.adapt` freezes the encoder, fits a NEW head on the support
   features with ``finetune_steps`` full-batch steps of SGD (momentum 0.9) or Adam, and returns the predictor.
   BatchNorm defaults to ``"frozen"`` here (the running statistics learned in pre-training).

Episodes carry episode-local labels (``0..N-1``), which cannot train a base-class head. When the engine maps them
back to global class ids (``MetaTrainer(prepare_episode=GlobalLabels(train_classes))``, which the bundles do for this
learner), :meth:`FineTuneBaseline.outer_step` is one :meth:`pretrain_step` on the episode's support and query
together, so the same engine, handlers and checkpoints serve the baseline and the meta-learners.
:meth:`FineTuneBaseline.meta_loss` works for evaluation (adapt on support, query cross-entropy, no graph).

Mixed precision (see :mod:`monai_metalearn.learners.precision`): pre-training computes the forward pass and loss under
:func:`~monai_metalearn.learners.precision.forward_autocast` and back-propagates with autocast disabled; adaptation
embeds the support set under autocast and fits the new head in float32 with autocast disabled, so its small gradients
cannot underflow.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from monai_metalearn.networks.batchnorm import batch_norm_mode, check_batch_norm_mode
from monai_metalearn.networks.heads import CosineClassifier

from .base import Learner, accuracy, check_episode
from .precision import forward_autocast, no_autocast

__all__ = ["FineTuneBaseline", "FineTunedPredictor"]

HEADS = ("linear", "cosine")
OPTIMIZERS = ("sgd", "adam")


class FineTunedPredictor:
    """Predictor of :class:`FineTuneBaseline`: ``head(encoder(x))`` with the frozen encoder (no gradient to it).

    Args:
        learner: the baseline (its encoder and BatchNorm mode are used).
        head: the head fitted on the support set.
    """

    def __init__(self, learner: FineTuneBaseline, head: nn.Module) -> None:
        self.learner = learner
        self.head = head

    def __call__(self, x: Tensor) -> Tensor:
        with torch.no_grad(), forward_autocast():
            return self.head(self.learner.embed(x))


class FineTuneBaseline(Learner):
    """Baseline / Baseline++: supervised pre-training, then a new head fitted on each task's support set.

    Args:
        encoder: maps ``[B, C, D, H, W]`` to ``[B, feature_dim]``.
        feature_dim: the encoder's output size.
        n_base_classes: number of meta-train (base) classes for the pre-training head.
        head: ``"linear"`` (Baseline) or ``"cosine"`` (Baseline++, scaled cosine similarity).
        finetune_steps: optimisation steps on the support features in :meth:`adapt`.
        finetune_lr: learning rate of those steps.
        finetune_optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        scale: temperature of the cosine heads.
        n_way: the most classes per episode (the head fitted on a support set has its own ``N``); not checked when
            ``None``.
        batch_norm: BatchNorm mode for adaptation and prediction: ``"frozen"`` (default) or ``"transductive"``.

    Raises:
        ValueError: for an unknown ``head``/``finetune_optimizer``, or non-positive sizes, steps or learning rate.

    Example::

        learner = FineTuneBaseline(ConvEncoder3D(), 256, n_base_classes=20, head="cosine")
        opt = torch.optim.Adam(learner.parameters(), 1e-3)
        for x, y_global in flat_loader:
            learner.pretrain_step(x, y_global, opt)
        predictor = learner.adapt(support_x, support_y)
        logits = predictor(query_x)
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        n_base_classes: int,
        head: str = "linear",
        finetune_steps: int = 100,
        finetune_lr: float = 0.01,
        finetune_optimizer: str = "sgd",
        scale: float = 10.0,
        n_way: int | None = None,
        batch_norm: str = "frozen",
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if finetune_optimizer not in OPTIMIZERS:
            raise ValueError(f"finetune_optimizer must be one of {OPTIMIZERS}, got {finetune_optimizer!r}")
        if feature_dim < 1 or n_base_classes < 1:
            raise ValueError(f"feature_dim and n_base_classes must be >= 1, got {feature_dim}, {n_base_classes}")
        if int(finetune_steps) < 0 or finetune_lr <= 0:
            raise ValueError(f"need finetune_steps >= 0 and finetune_lr > 0, got {finetune_steps}, {finetune_lr}")
        self.encoder = encoder
        self.feature_dim = int(feature_dim)
        self.n_base_classes = int(n_base_classes)
        self.head_type = head
        self.scale = float(scale)
        self.base_head = self.make_head(self.n_base_classes)
        self.finetune_steps = int(finetune_steps)
        self.finetune_lr = float(finetune_lr)
        self.finetune_optimizer = finetune_optimizer
        self.n_way = n_way
        self.batch_norm = check_batch_norm_mode(batch_norm)
        self.loss_fn = nn.CrossEntropyLoss()

    def make_head(self, n_classes: int) -> nn.Module:
        """A freshly initialised head (linear or cosine) with ``n_classes`` outputs, on the encoder's device."""
        head: nn.Module
        if self.head_type == "linear":
            head = nn.Linear(self.feature_dim, n_classes)
        else:
            head = CosineClassifier(self.feature_dim, n_classes, scale=self.scale)
        ref = next(self.encoder.parameters(), None)
        return head.to(ref.device) if ref is not None else head

    def forward(self, x: Tensor) -> Tensor:
        """Base-class logits ``[B, n_base_classes]``."""
        return self.base_head(self.encoder(x))

    def embed(self, x: Tensor) -> Tensor:
        """Encoder features under the adaptation BatchNorm mode."""
        with batch_norm_mode(self.encoder, self.batch_norm):
            return self.encoder(x)

    def pretrain_step(
        self, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, scaler: Any | None = None
    ) -> dict[str, float]:
        """One supervised step on a flat batch of base classes (global class ids ``0..n_base_classes-1``).

        Args:
            x: ``[B, C, D, H, W]``.
            y: ``[B]`` global class ids.
            optimizer: over ``self.parameters()`` (encoder and base head).
            scaler: optional ``torch.amp.GradScaler``.

        Returns:
            ``{"loss", "accuracy"}`` of the batch.

        Raises:
            ValueError: for mismatched sizes or labels outside ``0..n_base_classes-1``.
        """
        if x.dim() < 2 or x.shape[0] == 0 or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must be a non-empty batch with 1-D labels")
        if int(y.min()) < 0 or int(y.max()) >= self.n_base_classes:
            raise ValueError(f"y has labels outside 0..{self.n_base_classes - 1}: {torch.unique(y).tolist()}")
        optimizer.zero_grad(set_to_none=True)
        with forward_autocast():
            logits = self(x)
            loss = self.loss_fn(logits, y)
        self._backward_step(loss, optimizer, scaler)
        return {"loss": float(loss.detach()), "accuracy": accuracy(logits, y)}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> FineTunedPredictor:
        """Freeze the encoder and fit a new head on the support features; return the predictor.

        Raises:
            ValueError: for a malformed support set.
        """
        n_way = check_episode(support_x, support_y, max_n_way=self.n_way)
        if n_way is None:
            raise ValueError("FineTuneBaseline needs 1-D integer class labels in support_y")
        with torch.no_grad(), forward_autocast():
            features = self.embed(support_x).detach().float()
        head = self.make_head(n_way).to(features.device)
        if self.finetune_optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(head.parameters(), lr=self.finetune_lr, momentum=0.9)
        else:
            opt = torch.optim.Adam(head.parameters(), lr=self.finetune_lr)
        with torch.enable_grad(), no_autocast(features.device.type):  # float32 head fit
            for _ in range(self.finetune_steps):
                opt.zero_grad(set_to_none=True)
                self.loss_fn(head(features), support_y).backward()
                opt.step()
        head.requires_grad_(False)
        return FineTunedPredictor(self, head)

    def meta_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Evaluation only: adapt on the support set, return the query cross-entropy (no graph) and accuracy.

        Raises:
            ValueError: for a malformed episode.
        """
        check_episode(support_x, support_y, query_x, query_y, max_n_way=self.n_way)
        predictor = self.adapt(support_x, support_y)
        logits = predictor(query_x).float()
        loss = self.loss_fn(logits, query_y)
        return loss, {"loss": float(loss), "accuracy": accuracy(logits, query_y)}

    def outer_step(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        optimizer: torch.optim.Optimizer,
        scaler: Any | None = None,
    ) -> dict[str, float]:
        """One pre-training step on the episode's support and query together, labels being GLOBAL class ids.

        Raises:
            ValueError: labels outside ``0..n_base_classes-1`` (episode-local labels were passed where global ids
                were expected only when they happen to exceed the range; map them with ``GlobalLabels``).
        """
        return self.pretrain_step(torch.cat([support_x, query_x]), torch.cat([support_y, query_y]), optimizer, scaler)

    def meta_batch_step(self, episodes: Any, optimizer: torch.optim.Optimizer, scaler: Any | None = None) -> dict:
        """One pre-training step on the union of several episodes (global class ids)."""
        xs = torch.cat([torch.cat([sx, qx]) for sx, _, qx, _ in episodes])
        ys = torch.cat([torch.cat([sy, qy]) for _, sy, _, qy in episodes])
        return self.pretrain_step(xs, ys, optimizer, scaler)
