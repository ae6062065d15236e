"""Reptile (Nichol et al., 2018): first-order meta-learning by moving the initialisation toward adapted weights.

For each task, copies of the weights are trained with a few steps of SGD (or Adam with ``beta1=0``, as in the paper)
on the task's data, giving adapted weights ``phi``. The outer update moves the initialisation ``theta`` toward them:
``theta <- theta + epsilon * (mean_tasks(phi) - theta)``. Reptile owns its outer update, so it overrides
:meth:`~monai_metalearn.learners.base.Learner.outer_step` and :meth:`meta_batch_step`; its :meth:`meta_loss` is an
evaluation-only quantity (the query loss after adaptation, without graph).

Two outer-update styles:

* ``outer_update="interpolate"`` (default): the formula above with step ``epsilon``. The optimizer passed to
  ``outer_step`` may be ``None``; if given, its gradients are only cleared (it is not stepped), so schedulers attached
  to it have no effect; anneal ``learner.epsilon`` instead.
* ``outer_update="optimizer"``: the "Reptile gradient" ``theta - mean(phi)`` is written to ``.grad`` and the
  optimizer is stepped (``SGD(lr=epsilon)`` reproduces the interpolation; Adam is a common choice). ``scaler`` is not
  used: there is no backward pass to scale.

BatchNorm: ``"transductive"`` (default: batch statistics, running statistics untouched) or ``"frozen"``; see
:mod:`monai_metalearn.networks.batchnorm`. The loss and metric are pluggable as in MAML (segmentation targets work).

Batched tasks (``task_batching``, see :mod:`monai_metalearn.learners.task_batching` and the "Batched tasks" paragraph
of :mod:`monai_metalearn.learners.maml`): with ``"vmap"`` and ``inner_optimizer="sgd"`` the meta-batch's inner loops
run as one :func:`torch.func.vmap` of plain SGD steps (``w - inner_lr * g``, gradients from :func:`torch.func.grad`),
giving the same adapted weights as the loop; the Adam inner optimizer, float16 autocast, episodes of unequal shapes
and models vmap cannot run fall back to the loop (logged once at INFO).

Mixed precision (see :mod:`monai_metalearn.learners.precision`): the inner forward passes run under autocast, their
gradients are taken by :func:`~monai_metalearn.learners.precision.inner_grads` (float16 losses scaled by
``learner.inner_scaler``, a step that overflows recomputed in float32) and the inner optimizer steps on the float32
copies run with autocast disabled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from monai_metalearn.networks.batchnorm import batch_norm_mode, check_batch_norm_mode

from .base import (
    Episode,
    FunctionalPredictor,
    Learner,
    NarrowedPredictor,
    accuracy,
    average_metrics,
    check_episode,
    infer_n_way,
    is_classification_target,
    narrow_logits,
)
from .precision import InnerLossScaler, _fresh_casts, autocast_dtype, forward_autocast, inner_grads, no_autocast
from .task_batching import TaskBatchingMixin, TaskBatchingState, autocast_of, run_task_batched

__all__ = ["Reptile"]

INNER_OPTIMIZERS = ("sgd", "adam")
OUTER_UPDATES = ("interpolate", "optimizer")


class Reptile(TaskBatchingMixin, Learner):
    """Reptile meta-learner.

    Args:
        model: the network.
        inner_lr: step size of the inner optimizer.
        inner_steps: inner steps per task during meta-training (>= 1).
        inner_optimizer: ``"sgd"`` or ``"adam"`` (betas ``(0, 0.999)``).
        epsilon: outer step size (``outer_update="interpolate"``); 1 jumps to the adapted weights.
        outer_update: ``"interpolate"`` or ``"optimizer"`` (see the module docstring).
        inner_on_query: during meta-training, train the inner loop on support and query together (standard Reptile,
            which has no support/query split); ``False`` trains on the support set only.
        loss_fn: ``loss_fn(logits, y) -> scalar``; default ``nn.CrossEntropyLoss()``.
        metric_fn: ``metric_fn(logits, y) -> float``; default accuracy.
        eval_inner_steps: inner steps used by :meth:`adapt`; default ``inner_steps``.
        n_way: the head's width, the most classes per episode; an episode of fewer classes uses the head's first
            ``N`` outputs. Inferred when ``None``.
        batch_norm: ``"transductive"`` or ``"frozen"``.
        metric_name: metrics key of ``metric_fn``.
        outer_lr: alias of ``epsilon``.
        task_batching: how :meth:`meta_batch_step` runs the tasks: ``"loop"``, ``"vmap"`` (``inner_optimizer="sgd"``
            only; Adam falls back to the loop) or ``"auto"`` (:attr:`AUTO_TASK_BATCHING`).

    Attributes:
        AUTO_TASK_BATCHING: what ``task_batching="auto"`` picks, measured on the CPU
            (``benchmarks/bench_task_batching.py``).

    Raises:
        ValueError: for a non-positive ``inner_lr``/``epsilon``, ``inner_steps < 1``, or an unknown option
            (``task_batching``: a ``ConfigError``).

    Example::

        learner = Reptile(model, inner_lr=0.01, inner_steps=5, epsilon=0.1)
        metrics = learner.outer_step(sx, sy, qx, qy, optimizer=None)
    """

    AUTO_TASK_BATCHING = "loop"

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        inner_optimizer: str = "sgd",
        epsilon: float = 0.1,
        outer_update: str = "interpolate",
        inner_on_query: bool = True,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        metric_fn: Callable[[Tensor, Tensor], float] | None = None,
        eval_inner_steps: int | None = None,
        n_way: int | None = None,
        batch_norm: str = "transductive",
        metric_name: str = "accuracy",
        outer_lr: float | None = None,
        task_batching: str = "loop",
    ) -> None:
        super().__init__()
        self._task_batching = TaskBatchingState(task_batching, self.AUTO_TASK_BATCHING)
        if outer_lr is not None:
            epsilon = outer_lr
        if inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        if epsilon <= 0:
            raise ValueError(f"epsilon (outer_lr) must be > 0, got {epsilon}")
        if int(inner_steps) < 1:
            raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
        if eval_inner_steps is not None and int(eval_inner_steps) < 0:
            raise ValueError(f"eval_inner_steps must be >= 0, got {eval_inner_steps}")
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}")
        if outer_update not in OUTER_UPDATES:
            raise ValueError(f"outer_update must be one of {OUTER_UPDATES}, got {outer_update!r}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.inner_optimizer = inner_optimizer
        self.epsilon = float(epsilon)
        self.outer_update = outer_update
        self.inner_on_query = bool(inner_on_query)
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.metric_fn = metric_fn if metric_fn is not None else accuracy
        self.eval_inner_steps = None if eval_inner_steps is None else int(eval_inner_steps)
        self.n_way = n_way
        self.batch_norm = check_batch_norm_mode(batch_norm)
        self.metric_name = metric_name
        self.inner_scaler = InnerLossScaler()

    def forward(self, x: Tensor) -> Tensor:
        """The un-adapted model's output."""
        return self.model(x)

    def _trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _make_inner_optimizer(self, tensors: list[Tensor]) -> torch.optim.Optimizer:
        if self.inner_optimizer == "sgd":
            return torch.optim.SGD(tensors, lr=self.inner_lr)
        return torch.optim.Adam(tensors, lr=self.inner_lr, betas=(0.0, 0.999))

    def adapted_weights(self, x: Tensor, y: Tensor, steps: int | None = None) -> dict[str, Tensor]:
        """Train a copy of the trainable weights on ``(x, y)`` and return it (detached); the model is unchanged.

        Args:
            x: inputs ``[B, C, D, H, W]``.
            y: targets.
            steps: inner steps; default ``inner_steps``.
        """
        steps = self.inner_steps if steps is None else int(steps)
        n_way = infer_n_way(y) if is_classification_target(y) else None
        fast = {n: p.detach().clone().requires_grad_(True) for n, p in self._trainable().items()}
        tensors = list(fast.values())
        opt = self._make_inner_optimizer(tensors)

        def loss() -> Tensor:
            return self.loss_fn(narrow_logits(functional_call(self.model, fast, (x,)), n_way), y)

        with torch.enable_grad(), batch_norm_mode(self.model, self.batch_norm):
            for _ in range(steps):
                with forward_autocast():
                    _, grads = inner_grads(loss, tensors, scaler=self.inner_scaler)
                with no_autocast(x.device.type):
                    for t, g in zip(tensors, grads):
                        t.grad = g
                    opt.step()
        return {n: t.detach() for n, t in fast.items()}

    def _task_data(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        if self.inner_on_query:
            return torch.cat([support_x, query_x]), torch.cat([support_y, query_y])
        return support_x, support_y

    def _score(
        self, fast: dict[str, Tensor], query_x: Tensor, query_y: Tensor, n_way: int | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        with torch.no_grad(), batch_norm_mode(self.model, self.batch_norm), forward_autocast():
            logits = narrow_logits(functional_call(self.model, fast, (query_x,)), n_way)
            loss = self.loss_fn(logits, query_y)
        return loss, {"loss": float(loss), self.metric_name: float(self.metric_fn(logits, query_y))}

    def meta_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Evaluation only: the query loss after ``inner_steps`` steps on the support set (no graph).

        Raises:
            ValueError: for a malformed episode.
        """
        n_way = check_episode(support_x, support_y, query_x, query_y, max_n_way=self.n_way)
        fast = self.adapted_weights(support_x, support_y)
        return self._score(fast, query_x, query_y, n_way)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """Train a copy of the weights on the support set for ``eval_inner_steps`` steps; return its predictor.

        Raises:
            ValueError: for a malformed support set.
        """
        n_way = check_episode(support_x, support_y, max_n_way=self.n_way)
        steps = self.inner_steps if self.eval_inner_steps is None else self.eval_inner_steps
        predictor = FunctionalPredictor(self.model, self.adapted_weights(support_x, support_y, steps), self.batch_norm)
        return predictor if self.n_way is None or n_way == self.n_way else NarrowedPredictor(predictor, n_way)

    def _outer_update(self, fasts: Sequence[dict[str, Tensor]], optimizer: torch.optim.Optimizer | None) -> None:
        params = self._trainable()
        target = {n: torch.stack([f[n] for f in fasts]).mean(0) for n in params}
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        if self.outer_update == "interpolate":
            with torch.no_grad():
                for n, p in params.items():
                    p.add_(target[n].to(p.dtype) - p, alpha=self.epsilon)
            return
        if optimizer is None:
            raise ValueError('outer_update="optimizer" needs an optimizer')
        for n, p in params.items():
            p.grad = (p.detach() - target[n]).to(p.dtype)
        optimizer.step()

    def outer_step(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: Any | None = None,
    ) -> dict[str, float]:
        """One Reptile update from one episode.

        Args:
            support_x: ``[N*K, C, D, H, W]``.
            support_y: support targets.
            query_x: ``[N*Q, C, D, H, W]``.
            query_y: query targets.
            optimizer: used with ``outer_update="optimizer"``; with ``"interpolate"`` only its gradients are cleared.
            scaler: ignored (Reptile has no backward pass to scale).

        Returns:
            query ``"loss"`` and metric at the adapted weights (computed without graph).

        Raises:
            ValueError: for a malformed episode, or ``outer_update="optimizer"`` without an optimizer.
        """
        metrics = self.meta_batch_step([(support_x, support_y, query_x, query_y)], optimizer, scaler)
        metrics.pop("tasks")
        return metrics

    def meta_batch_step(
        self, episodes: Sequence[Episode], optimizer: torch.optim.Optimizer | None = None, scaler: Any | None = None
    ) -> dict[str, float]:
        """One Reptile update from several tasks: move toward the average of their adapted weights.

        Args:
            episodes: ``(support_x, support_y, query_x, query_y)`` tuples.
            optimizer: see :meth:`outer_step`.
            scaler: ignored.

        Returns:
            metrics averaged over tasks (query loss and metric at each task's adapted weights), plus ``"tasks"``.

        Raises:
            ValueError: if ``episodes`` is empty or malformed.
        """
        episodes = list(episodes)
        if not episodes:
            raise ValueError("meta_batch_step needs at least one episode")
        if self.outer_update == "optimizer" and optimizer is None:
            raise ValueError('outer_update="optimizer" needs an optimizer')
        unsupported = None
        if self.inner_optimizer != "sgd":
            unsupported = f"inner_optimizer={self.inner_optimizer!r} has no vmap path (only plain SGD inner steps)"
        return run_task_batched(
            self,
            self._task_batching,
            episodes,
            self.n_way,
            lambda stacked, n_way: self._vmap_meta_batch_step(stacked, n_way, optimizer),
            lambda: self._loop_meta_batch_step(episodes, optimizer),
            unsupported=unsupported,
        )

    def _vmap_meta_batch_step(
        self, stacked: tuple[Tensor, Tensor, Tensor, Tensor], n_way: int | None, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, float]:
        """:meth:`meta_batch_step` of stacked episodes ``[T, ...]``: the SGD inner loops as one vmap."""
        support_x, support_y, query_x, query_y = stacked
        if self.inner_on_query:
            x, y = torch.cat([support_x, query_x], 1), torch.cat([support_y, query_y], 1)
        else:
            x, y = support_x, support_y
        device_type = x.device.type
        start = {n: p.detach() for n, p in self._trainable().items()}
        with batch_norm_mode(self.model, self.batch_norm), forward_autocast(), _fresh_casts():
            amp = autocast_dtype(device_type)  # bfloat16 or None (float16 falls back to the loop)

            def task(x: Tensor, y: Tensor, qx: Tensor, qy: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
                fast = start
                for _ in range(self.inner_steps):

                    def loss(fast: dict[str, Tensor]) -> Tensor:
                        with autocast_of(device_type, amp):  # the gradient is taken with autocast off
                            return self.loss_fn(narrow_logits(functional_call(self.model, fast, (x,)), n_way), y)

                    with no_autocast(device_type):
                        grads = torch.func.grad(loss)(fast)
                        fast = {n: w - self.inner_lr * grads[n] for n, w in fast.items()}
                with torch.no_grad():
                    logits = narrow_logits(functional_call(self.model, fast, (qx,)), n_way)
                    return fast, self.loss_fn(logits, qy), logits

            fasts, losses, logits = torch.func.vmap(task, randomness="different")(x, y, query_x, query_y)
        n_tasks = losses.shape[0]
        self._outer_update([{n: t[i] for n, t in fasts.items()} for i in range(n_tasks)], optimizer)
        metrics = [
            {"loss": float(losses[i]), self.metric_name: float(self.metric_fn(logits[i], query_y[i]))}
            for i in range(n_tasks)
        ]
        out = average_metrics(metrics)
        out["tasks"] = float(n_tasks)
        return out

    def _loop_meta_batch_step(
        self, episodes: Sequence[Episode], optimizer: torch.optim.Optimizer | None
    ) -> dict[str, float]:
        fasts, all_metrics = [], []
        for sx, sy, qx, qy in episodes:
            n_way = check_episode(sx, sy, qx, qy, max_n_way=self.n_way)
            fast = self.adapted_weights(*self._task_data(sx, sy, qx, qy))
            fasts.append(fast)
            all_metrics.append(self._score(fast, qx, qy, n_way)[1])
        self._outer_update(fasts, optimizer)
        out = average_metrics(all_metrics)
        out["tasks"] = float(len(episodes))
        return out
