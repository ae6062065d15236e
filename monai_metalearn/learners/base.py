"""The learner contract shared by every few-shot algorithm, plus episode checks and small helpers.

A learner knows the algorithm and nothing about files or dictionaries. It receives one episode as tensors:

* ``support_x`` ``[N*K, C, D, H, W]`` and ``support_y`` (``[N*K]`` long in ``0..N-1`` for classification, or any
  per-sample target such as ``[N*K, 1, D, H, W]`` masks when a custom ``loss_fn`` is used);
* ``query_x`` ``[N*Q, C, D, H, W]`` and ``query_y`` alike.

and offers four calls: :meth:`Learner.meta_loss` (adapt on support, score on query), :meth:`Learner.adapt` (return a
predictor ``x -> logits``), :meth:`Learner.outer_step` (one meta-update; the only training call an engine makes) and
:meth:`Learner.meta_batch_step` (one meta-update from several tasks). Metrics are Python floats.

BatchNorm: see :mod:`monai_metalearn.networks.batchnorm`. Meta-learners default to ``"transductive"`` (per-task batch
statistics, running statistics never updated); GroupNorm, the default of the package's encoder, needs none of this.

Mixed precision: see :mod:`monai_metalearn.learners.precision`. :meth:`Learner.outer_step` and
:meth:`Learner.meta_batch_step` compute the meta-loss under :func:`~monai_metalearn.learners.precision.forward_autocast`
(the autocast of the engine's ``amp_scope``) and back-propagate and step with autocast disabled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from monai_metalearn.networks.batchnorm import batch_norm_mode, check_batch_norm_mode

from .precision import forward_autocast, no_autocast

__all__ = [
    "Episode",
    "Learner",
    "FunctionalPredictor",
    "NarrowedPredictor",
    "accuracy",
    "check_episode",
    "infer_n_way",
    "is_classification_target",
    "narrow_logits",
    "average_metrics",
]

Episode = tuple[Tensor, Tensor, Tensor, Tensor]


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of rows of ``logits`` ``[B, N]`` whose arg-max equals ``y`` ``[B]``, as a Python float."""
    return float((logits.detach().argmax(dim=1) == y).float().mean().item())


def is_classification_target(y: Tensor) -> bool:
    """Whether ``y`` looks like episode class labels: a 1-D integer tensor."""
    return y.dim() == 1 and not torch.is_floating_point(y) and not torch.is_complex(y) and y.dtype != torch.bool


def infer_n_way(support_y: Tensor) -> int:
    """``N`` of an N-way episode: ``support_y.max() + 1``, checking that every class ``0..N-1`` occurs.

    Args:
        support_y: ``[N*K]`` integer labels.

    Raises:
        ValueError: if ``support_y`` is empty, not 1-D integer, negative, or misses a class in ``0..N-1``.
    """
    if not is_classification_target(support_y):
        raise ValueError(
            f"support_y must be a 1-D integer tensor of class ids, got shape {tuple(support_y.shape)} "
            f"dtype {support_y.dtype}"
        )
    if support_y.numel() == 0:
        raise ValueError("support_y is empty: an episode needs at least one support sample")
    present = torch.unique(support_y).tolist()
    if present[0] < 0:
        raise ValueError(f"support_y has negative labels: {present}")
    n_way = int(present[-1]) + 1
    if len(present) != n_way:
        missing = sorted(set(range(n_way)) - set(present))
        raise ValueError(f"support_y must cover every class 0..{n_way - 1}; missing {missing}")
    return n_way


def check_episode(
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor | None = None,
    query_y: Tensor | None = None,
    n_way: int | None = None,
    max_n_way: int | None = None,
) -> int | None:
    """Check one episode's shapes and labels; return ``N`` for classification labels, ``None`` otherwise.

    Args:
        support_x: ``[N*K, C, *spatial]``.
        support_y: ``[N*K]`` class ids, or any per-sample target with the same first dimension.
        query_x: ``[N*Q, C, *spatial]`` (optional).
        query_y: targets of ``query_x`` (given together with ``query_x``).
        n_way: the expected ``N``; checked against the labels when given.
        max_n_way: the largest ``N`` allowed (e.g. the width of a classification head, whose first ``N`` outputs
            serve an episode of ``N`` classes).

    Raises:
        ValueError: naming what is wrong: empty support, mismatched batch sizes, support and query samples of
            different shapes, labels not covering ``0..N-1``, query labels outside ``0..N-1`` or ``N != n_way``.
    """
    if support_x.dim() < 2 or support_x.shape[0] == 0:
        raise ValueError(f"support_x is empty or not batched: shape {tuple(support_x.shape)}")
    if support_y.dim() == 0 or support_y.shape[0] != support_x.shape[0]:
        raise ValueError(
            f"support_x has {support_x.shape[0]} samples but support_y has shape {tuple(support_y.shape)}"
        )
    if (query_x is None) != (query_y is None):
        raise ValueError("query_x and query_y must be given together")
    if query_x is not None and query_y is not None:
        if query_x.dim() < 2 or query_x.shape[0] == 0:
            raise ValueError(f"query_x is empty or not batched: shape {tuple(query_x.shape)}")
        if query_y.dim() == 0 or query_y.shape[0] != query_x.shape[0]:
            raise ValueError(f"query_x has {query_x.shape[0]} samples but query_y has shape {tuple(query_y.shape)}")
        if query_x.shape[1] != support_x.shape[1]:
            raise ValueError(
                f"support_x has {support_x.shape[1]} channels but query_x has {query_x.shape[1]} "
                f"(shapes {tuple(support_x.shape)} and {tuple(query_x.shape)})"
            )
    if not is_classification_target(support_y):
        return None
    inferred = infer_n_way(support_y)
    if n_way is not None and inferred != n_way:
        raise ValueError(f"support_y has {inferred} classes but the learner was built for n_way={n_way}")
    if max_n_way is not None and inferred > max_n_way:
        raise ValueError(
            f"support_y has {inferred} classes but the learner's head has {max_n_way} outputs (n_way={max_n_way})"
        )
    if query_y is not None:
        if not is_classification_target(query_y):
            raise ValueError(f"query_y must be 1-D integer class ids like support_y, got shape {tuple(query_y.shape)}")
        if query_y.numel() and (int(query_y.min()) < 0 or int(query_y.max()) >= inferred):
            raise ValueError(f"query_y has labels outside 0..{inferred - 1}: {torch.unique(query_y).tolist()}")
    return inferred


def average_metrics(metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each key over a list of metric dicts (keys present in every dict only)."""
    if not metrics:
        return {}
    keys = [k for k in metrics[0] if all(k in m for m in metrics)]
    return {k: float(sum(m[k] for m in metrics) / len(metrics)) for k in keys}


def narrow_logits(logits: Tensor, n_way: int | None) -> Tensor:
    """The first ``n_way`` columns of ``[B, C]`` classification logits (all of them when ``n_way`` is ``None`` or
    ``C == n_way``): a head built for ``C`` classes serves an episode of fewer classes with its first outputs."""
    if n_way is None or logits.dim() != 2 or logits.shape[1] <= n_way:
        return logits
    return logits[:, :n_way]


class NarrowedPredictor:
    """A predictor whose logits are cut to an episode's ``n_way`` classes (:func:`narrow_logits`); other attributes
    (``params``, ``adapted``, ...) are those of the wrapped predictor."""

    def __init__(self, predictor: Callable[[Tensor], Tensor], n_way: int | None) -> None:
        self.predictor = predictor
        self.n_way = n_way

    def __call__(self, x: Tensor) -> Tensor:
        return narrow_logits(self.predictor(x), self.n_way)

    def __getattr__(self, name: str) -> Any:
        if name == "predictor":  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.predictor, name)


class FunctionalPredictor:
    """A predictor ``x -> logits`` that runs ``model`` with (adapted) parameters through ``functional_call``.

    Args:
        model: the network.
        params: parameters overriding the model's own (e.g. adapted weights), by qualified name.
        batch_norm: BatchNorm mode used for every call (see :func:`~monai_metalearn.networks.batch_norm_mode`).

    Example::

        predictor = learner.adapt(support_x, support_y)
        logits = predictor(query_x)
    """

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor], batch_norm: str = "transductive") -> None:
        self.model = model
        self.adapted = dict(params)
        self.batch_norm = check_batch_norm_mode(batch_norm)

    @property
    def params(self) -> dict[str, Tensor]:
        """Every parameter the predictor uses: the adapted ones, and the model's own for the rest."""
        out = {n: p for n, p in self.model.named_parameters()}
        out.update(self.adapted)
        return out

    def __call__(self, x: Tensor) -> Tensor:
        with batch_norm_mode(self.model, self.batch_norm):
            return functional_call(self.model, self.adapted, (x,))


class Learner(nn.Module):
    """Base class of few-shot learners.

    Subclasses implement :meth:`meta_loss` and :meth:`adapt`; :meth:`outer_step` and :meth:`meta_batch_step` have
    gradient-based defaults (zero_grad, meta-loss, backward through ``scaler`` if given, step). Learners are
    ``nn.Module`` s: ``learner.to(device)`` moves everything, ``learner.parameters()`` is what the optimizer updates.

    Example::

        learner = MAML(FewShotClassifier(ConvEncoder3D(), 256, n_way=3), inner_lr=0.01, inner_steps=5)
        optimizer = torch.optim.Adam(learner.parameters(), 1e-3)
        for support_x, support_y, query_x, query_y in episodes:
            metrics = learner.outer_step(support_x, support_y, query_x, query_y, optimizer)
        predictor = learner.adapt(support_x, support_y)
        logits = predictor(query_x)  # [N*Q, N]
    """

    def meta_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Adapt on the support set, score on the query set.

        Returns:
            ``(loss, metrics)``: the outer loss (with the graph the algorithm needs) and float metrics including
            ``"loss"`` and ``"accuracy"`` (or the learner's ``metric_name``).
        """
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """Adapt to a task's support set and return a predictor ``x -> logits [B, N]``."""
        raise NotImplementedError

    @staticmethod
    def _backward_step(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: Any | None) -> None:
        """``loss.backward()`` (through ``scaler`` if given) and the optimizer step, with autocast disabled."""
        with no_autocast(loss.device.type):
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()

    def outer_step(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        optimizer: torch.optim.Optimizer,
        scaler: Any | None = None,
    ) -> dict[str, float]:
        """One meta-update from one episode: zero_grad, :meth:`meta_loss`, backward (through ``scaler``), step.

        The meta-loss is computed under :func:`~monai_metalearn.learners.precision.forward_autocast`; the backward
        pass and the step run with autocast disabled.

        Args:
            support_x: ``[N*K, C, D, H, W]``.
            support_y: ``[N*K]`` labels (or per-sample targets).
            query_x: ``[N*Q, C, D, H, W]``.
            query_y: ``[N*Q]`` labels (or per-sample targets).
            optimizer: the meta-optimizer over ``self.parameters()``.
            scaler: optional ``torch.amp.GradScaler`` for mixed precision.

        Returns:
            the metrics of :meth:`meta_loss`.
        """
        optimizer.zero_grad(set_to_none=True)
        with forward_autocast():
            loss, metrics = self.meta_loss(support_x, support_y, query_x, query_y)
        self._backward_step(loss, optimizer, scaler)
        return metrics

    def meta_batch_step(
        self, episodes: Sequence[Episode], optimizer: torch.optim.Optimizer, scaler: Any | None = None
    ) -> dict[str, float]:
        """One meta-update from several tasks: the average of their meta-losses, one optimizer step.

        Each task's loss is back-propagated as soon as it is computed (divided by the number of tasks), so only one
        task's graph is alive at a time; the accumulated gradient equals that of the averaged loss.

        Args:
            episodes: ``(support_x, support_y, query_x, query_y)`` tuples.
            optimizer: the meta-optimizer.
            scaler: optional ``torch.amp.GradScaler``.

        Returns:
            metrics averaged over the tasks, plus ``"tasks"``.

        Raises:
            ValueError: if ``episodes`` is empty.
        """
        episodes = list(episodes)
        if not episodes:
            raise ValueError("meta_batch_step needs at least one episode")
        optimizer.zero_grad(set_to_none=True)
        all_metrics = []
        for episode in episodes:
            with forward_autocast():
                loss, metrics = self.meta_loss(*episode)
                loss = loss / len(episodes)
            with no_autocast(loss.device.type):
                (scaler.scale(loss) if scaler is not None else loss).backward()
            all_metrics.append(metrics)
        with no_autocast(loss.device.type):
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        out = average_metrics(all_metrics)
        out["tasks"] = float(len(episodes))
        return out
