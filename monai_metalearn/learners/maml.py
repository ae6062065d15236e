"""Gradient-based meta-learners on ``torch.func``: MAML (second order), FOMAML, ANIL and Meta-SGD.

All four share one inner loop: the network is run with "fast" weights through :func:`torch.func.functional_call`, the
support loss is differentiated with :func:`torch.autograd.grad` and the fast weights are updated with plain SGD
(``w - lr * g``; Meta-SGD uses a learned per-element ``lr``). The outer loss is the query loss at the fast weights.

* second-order MAML keeps the graph of the inner gradients (``create_graph=True``), so ``loss.backward()`` gives the
  exact meta-gradient including the Hessian-vector terms;
* FOMAML detaches the inner gradients: the meta-gradient is the query-loss gradient at the adapted weights;
* ANIL adapts only ``model.head``; encoder features are computed once per episode, the inner loop never changes the
  encoder, and the outer gradient reaches both the encoder and the head's initialisation;
* Meta-SGD learns a per-element inner learning rate for every adapted parameter (``inner_lrs``, part of
  ``parameters()`` so the meta-optimizer updates it).

The loss and metric are pluggable (``loss_fn(logits, y)``, ``metric_fn(logits, y) -> float``), so segmentation can pass
``monai.losses.DiceCELoss(softmax=True, to_onehot_y=True)`` and a Dice metric with ``y`` of shape ``[B, 1, D, H, W]``;
only the defaults (cross-entropy, accuracy) assume class labels.

BatchNorm: ``batch_norm="transductive"`` (default) normalises with each batch's own statistics, support set during the
inner loop and query batch when scoring, and never updates running statistics; ``"frozen"`` uses the stored running
statistics. See :mod:`monai_metalearn.networks.batchnorm`. GroupNorm networks are unaffected.

Mixed precision (see :mod:`monai_metalearn.learners.precision`): the forward passes run under the caller's autocast
(or :func:`~monai_metalearn.learners.precision.forward_autocast`), the inner gradients are taken with autocast disabled
by :func:`~monai_metalearn.learners.precision.inner_grads`; under float16 the support loss is scaled by
``learner.inner_scaler`` (an :class:`~monai_metalearn.learners.precision.InnerLossScaler`) so that small inner
gradients do not underflow, and a step whose scaled gradients overflow is recomputed in float32.

Batched tasks (``task_batching``, see :mod:`monai_metalearn.learners.task_batching`): with ``"loop"`` (default)
:meth:`~monai_metalearn.learners.base.Learner.meta_batch_step` runs the episodes one after the other. With ``"vmap"``
the episodes are stacked and the whole meta-batch runs as one :func:`torch.func.vmap` of a per-task function whose
inner loop takes its gradients with :func:`torch.func.grad` (second order: the inner gradients stay differentiable,
so one ``backward`` of the mean query loss gives the exact meta-gradient; first order: they are detached); metrics
are computed per task from the detached outputs and averaged as in the loop. The meta-batch falls back to the loop
(the reason logged once at INFO) when the episodes differ in shape or ``N``, under float16 autocast (the inner loss
scale needs a per-step overflow check; bfloat16 stays batched), and for good when the first vmap call fails (an op
without batching rule, data-dependent control flow such as the ignore-label branch of
:class:`~monai_metalearn.learners.SegmentationLoss`). BatchNorm in ``"transductive"`` mode runs under vmap (each
task's support or query batch is normalised on its own, as in the loop), but torch's vmap gets *second-order*
gradients through batch-statistics normalisation wrong, so second-order learners whose adapted part has a
BatchNorm (transductive), InstanceNorm or LayerNorm layer use the loop
(:func:`~monai_metalearn.learners.task_batching.batch_statistics_layers`); first-order learners, ANIL's head-only
second order and GroupNorm are exact. All tasks' graphs are alive at once, so a vmap meta-batch needs several times
the memory of the loop. ``"auto"`` is the choice measured faster per learner (:attr:`MAML.AUTO_TASK_BATCHING`): on
the CPU vmap is slower for every learner (``benchmarks/README.md``, "Batched tasks"), so ``"auto"`` is the loop.
:meth:`meta_loss` and :meth:`adapt` are the same in every mode.

The inner loop always runs with gradients enabled (also under ``torch.no_grad()``, e.g. during validation); when the
caller has gradients disabled no graph is kept and the returned loss is a plain tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from monai_metalearn.networks.batchnorm import batch_norm_mode, check_batch_norm_mode
from monai_metalearn.networks.checkpointing import checkpoint_function

from .base import (
    Episode,
    FunctionalPredictor,
    Learner,
    NarrowedPredictor,
    accuracy,
    average_metrics,
    check_episode,
    is_classification_target,
    narrow_logits,
)
from .precision import InnerLossScaler, _fresh_casts, autocast_dtype, forward_autocast, inner_grads, no_autocast
from .task_batching import TaskBatchingMixin, TaskBatchingState, autocast_of, batch_statistics_layers, run_task_batched

__all__ = ["MAML", "FOMAML", "ANIL", "MetaSGD"]

LossFn = Callable[[Tensor, Tensor], Tensor]
MetricFn = Callable[[Tensor, Tensor], float]


class MAML(TaskBatchingMixin, Learner):
    """Model-Agnostic Meta-Learning (Finn et al., 2017), second order by default.

    Args:
        model: the network; ``model(x)`` returns logits ``[B, N]`` (or whatever ``loss_fn`` expects).
        inner_lr: inner-loop SGD step size.
        inner_steps: inner-loop steps during meta-training (>= 1).
        first_order: drop second-order terms (FOMAML).
        loss_fn: ``loss_fn(logits, y) -> scalar``; default ``nn.CrossEntropyLoss()``.
        metric_fn: ``metric_fn(logits, y) -> float`` on the query set; default accuracy.
        eval_inner_steps: inner steps used by :meth:`adapt` (test time); default ``inner_steps``.
        n_way: the classification head's width, the most classes an episode may have; an episode of fewer classes
            uses the head's first ``N`` outputs. Inferred from the labels when ``None``.
        batch_norm: ``"transductive"`` or ``"frozen"`` (see the module docstring).
        metric_name: key of ``metric_fn``'s value in the metrics dict.
        inner_params: name prefixes of the parameters adapted in the inner loop (e.g. ``["head."]``); default: every
            parameter with ``requires_grad``.
        task_batching: how :meth:`meta_batch_step` runs the tasks of a meta-batch: ``"loop"`` (one after the other),
            ``"vmap"`` (one :func:`torch.func.vmap`, see the module docstring) or ``"auto"``
            (:attr:`AUTO_TASK_BATCHING`).

    Attributes:
        AUTO_TASK_BATCHING: what ``task_batching="auto"`` picks for this class, measured on the CPU (one thread,
            meta-batch 4, 5-way 1-shot, ``benchmarks/bench_task_batching.py``).
        checkpoint_inner_steps: second order only: each inner step (support forward, differentiable gradient, update)
            is checkpointed and recomputed during the outer backward, so the memory of the meta-gradient no longer
            grows with ``inner_steps`` (:func:`~monai_metalearn.networks.checkpointing.checkpoint_function`; the
            factories' ``activation_checkpointing="steps"``). Default ``False``.

    Raises:
        ValueError: for a negative ``inner_lr``, ``inner_steps < 1``, ``eval_inner_steps < 0``, an unknown
            ``batch_norm`` or ``inner_params`` matching no parameter.
        ConfigError: (a ``ValueError``) for a ``task_batching`` other than ``"loop"``, ``"vmap"``, ``"auto"``.

    Example::

        model = FewShotClassifier(ConvEncoder3D(features=(16, 32, 64)), 64, n_way=3)
        learner = MAML(model, inner_lr=0.1, inner_steps=2)
        opt = torch.optim.Adam(learner.parameters(), 1e-3)
        metrics = learner.outer_step(sx, sy, qx, qy, opt)
        predictor = learner.adapt(sx, sy)
        logits = predictor(qx)
    """

    AUTO_TASK_BATCHING = "loop"
    checkpoint_inner_steps: bool = False

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        first_order: bool = False,
        loss_fn: LossFn | None = None,
        metric_fn: MetricFn | None = None,
        eval_inner_steps: int | None = None,
        n_way: int | None = None,
        batch_norm: str = "transductive",
        metric_name: str = "accuracy",
        inner_params: Sequence[str] | None = None,
        task_batching: str = "loop",
    ) -> None:
        super().__init__()
        self._task_batching = TaskBatchingState(task_batching, self.AUTO_TASK_BATCHING)
        if inner_lr < 0:
            raise ValueError(f"inner_lr must be >= 0, got {inner_lr}")
        if int(inner_steps) < 1:
            raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
        if eval_inner_steps is not None and int(eval_inner_steps) < 0:
            raise ValueError(f"eval_inner_steps must be >= 0, got {eval_inner_steps}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order)
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.metric_fn: MetricFn = metric_fn if metric_fn is not None else accuracy
        self.eval_inner_steps = None if eval_inner_steps is None else int(eval_inner_steps)
        self.n_way = n_way
        self.batch_norm = check_batch_norm_mode(batch_norm)
        self.metric_name = metric_name
        self.inner_params = None if inner_params is None else tuple(inner_params)
        self.inner_scaler = InnerLossScaler()
        if not self.adapted_names():
            raise ValueError(f"no trainable parameter of the model matches inner_params={self.inner_params}")

    # ----------------------------------------------------------------- hooks (ANIL overrides them)
    def adapted_names(self) -> list[str]:
        """Qualified names (in ``self.model``) of the parameters the inner loop adapts."""
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if self.inner_params is not None:
            names = [n for n in names if any(n.startswith(prefix) for prefix in self.inner_params)]
        return names

    def _embed(self, x: Tensor) -> Tensor:
        """The part of the forward pass computed once per episode (identity for MAML)."""
        return x

    def _fast_forward(self, params: dict[str, Tensor], z: Tensor) -> Tensor:
        """The adapted part of the forward pass with fast weights ``params``."""
        return functional_call(self.model, params, (z,))

    def _inner_lr(self, name: str) -> float | Tensor:
        return self.inner_lr

    def _predictor(self, params: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
        return FunctionalPredictor(self.model, params, self.batch_norm)

    # ----------------------------------------------------------------- algorithm
    def forward(self, x: Tensor) -> Tensor:
        """The un-adapted model's output (the meta-learned initialisation)."""
        return self.model(x)

    def _check_logits(self, logits: Tensor, y: Tensor, n_way: int | None) -> None:
        if n_way is not None and is_classification_target(y) and logits.dim() == 2 and logits.shape[1] < n_way:
            raise ValueError(f"the model outputs {logits.shape[1]} logits but the episode has {n_way} classes")

    def _inner_loop(
        self,
        params: dict[str, Tensor],
        z: Tensor,
        y: Tensor,
        steps: int,
        create_graph: bool,
        keep_graph: bool,
        n_way: int | None = None,
    ) -> dict[str, Tensor]:
        """Run ``steps`` SGD steps of ``loss_fn`` on ``(z, y)`` from the fast weights ``params``.

        Args:
            params: starting fast weights (the model's parameters, or detached copies).
            z: the support input (after :meth:`_embed`).
            y: the support targets.
            steps: number of steps.
            create_graph: keep the graph of the inner gradients (second order).
            keep_graph: keep the dependency of the result on ``params`` (False at test time: each step's weights
                are detached, nothing outside the loop is differentiated).
            n_way: classes of the episode, to check the model's output width.

        The gradients come from :func:`~monai_metalearn.learners.precision.inner_grads` (autocast disabled, float16
        losses scaled by ``self.inner_scaler``).
        """
        names = list(params)
        with torch.enable_grad():
            for step in range(steps):

                def support_loss(params: dict[str, Tensor] = params, check: bool = step == 0) -> Tensor:
                    inputs = z
                    if z.is_floating_point() and not torch.is_autocast_enabled(z.device.type):
                        inputs = z.to(next(iter(params.values())).dtype)  # ANIL's features embedded under autocast
                    logits = self._fast_forward(params, inputs)
                    if check:
                        self._check_logits(logits, y, n_way)
                    return self.loss_fn(narrow_logits(logits, n_way), y)

                def sgd_step(*tensors: Tensor, loss: Callable[..., Tensor] = support_loss) -> tuple[Tensor, ...]:
                    fast = dict(zip(names, tensors))
                    _, grads = inner_grads(
                        lambda: loss(fast), list(tensors), create_graph=create_graph, scaler=self.inner_scaler
                    )
                    updated = zip(names, tensors, grads)
                    return tuple(t if g is None else t - self._inner_lr(n) * g for n, t, g in updated)

                tensors = tuple(params[n] for n in names)
                if create_graph and keep_graph and self.checkpoint_inner_steps:
                    tensors = checkpoint_function(sgd_step, *tensors)  # recomputed during the outer backward
                else:
                    tensors = sgd_step(*tensors)
                params = {n: t if keep_graph else t.detach().requires_grad_(True) for n, t in zip(names, tensors)}
        return params

    def _initial_params(self) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in self.adapted_names()}

    def meta_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Adapt on the support set with ``inner_steps`` steps and return the query loss and metrics.

        Second-order MAML keeps the whole graph (only when gradients are enabled); first-order variants detach the
        inner gradients.

        Raises:
            ValueError: for a malformed episode (see :func:`~monai_metalearn.learners.base.check_episode`).
        """
        n_way = check_episode(support_x, support_y, query_x, query_y, max_n_way=self.n_way)
        create_graph = (not self.first_order) and torch.is_grad_enabled()
        with batch_norm_mode(self.model, self.batch_norm), forward_autocast():
            zs = self._embed(support_x)
            params = self._inner_loop(
                self._initial_params(), zs, support_y, self.inner_steps, create_graph, keep_graph=True, n_way=n_way
            )
            logits = narrow_logits(self._fast_forward(params, self._embed(query_x)), n_way)
            loss = self.loss_fn(logits, query_y)
        metrics = {"loss": float(loss.detach()), self.metric_name: float(self.metric_fn(logits.detach(), query_y))}
        return loss, metrics

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """Fine-tune a copy of the adapted parameters on the support set (``eval_inner_steps`` steps).

        The model itself is not modified; the predictor holds detached adapted weights (``predictor.params``).

        Raises:
            ValueError: for a malformed support set.
        """
        n_way = check_episode(support_x, support_y, max_n_way=self.n_way)
        steps = self.inner_steps if self.eval_inner_steps is None else self.eval_inner_steps
        with batch_norm_mode(self.model, self.batch_norm), forward_autocast():
            with torch.no_grad():
                zs = self._embed(support_x)
            start = {n: p.detach().requires_grad_(True) for n, p in self._initial_params().items()}
            params = self._inner_loop(start, zs, support_y, steps, create_graph=False, keep_graph=False, n_way=n_way)
        predictor = self._predictor({n: p.detach() for n, p in params.items()})
        return predictor if self.n_way is None or n_way == self.n_way else NarrowedPredictor(predictor, n_way)

    # ----------------------------------------------------------------- batched tasks
    def meta_batch_step(
        self, episodes: Sequence[Episode], optimizer: torch.optim.Optimizer, scaler: Any | None = None
    ) -> dict[str, float]:
        """One meta-update from several tasks: the mean of their meta-losses, one backward, one optimizer step.

        With ``task_batching="loop"`` this is :meth:`Learner.meta_batch_step
        <monai_metalearn.learners.base.Learner.meta_batch_step>` (one task's graph alive at a time); with ``"vmap"``
        (or ``"auto"`` resolved to it) the stacked episodes run as one :func:`torch.func.vmap` and the mean loss is
        back-propagated once, unless a fallback applies (see the module docstring). Both give the same meta-gradient
        and metrics up to float rounding.

        Args:
            episodes: ``(support_x, support_y, query_x, query_y)`` tuples.
            optimizer: the meta-optimizer.
            scaler: optional ``torch.amp.GradScaler`` (outer loss).

        Returns:
            metrics averaged over the tasks, plus ``"tasks"``.

        Raises:
            ValueError: if ``episodes`` is empty or an episode is malformed.
        """
        episodes = list(episodes)
        if not episodes:
            raise ValueError("meta_batch_step needs at least one episode")
        return run_task_batched(
            self,
            self._task_batching,
            episodes,
            self.n_way,
            lambda stacked, n_way: self._vmap_meta_batch_step(stacked, n_way, optimizer, scaler),
            lambda: super(MAML, self).meta_batch_step(episodes, optimizer, scaler),
            unsupported=self._vmap_unsupported() if self._task_batching.wants_vmap else None,
        )

    def _second_order_module(self) -> nn.Module:
        """The part of the network the meta-gradient differentiates twice (the adapted part's forward pass)."""
        return self.model

    def _vmap_unsupported(self) -> str | None:
        """Why this learner's meta-batch cannot run under vmap (see :func:`batch_statistics_layers`), or ``None``."""
        if self.first_order:
            return None
        if self.checkpoint_inner_steps:
            return "checkpoint_inner_steps is set: the memory saving of checkpointed inner steps needs the loop"
        layers = batch_statistics_layers(self._second_order_module(), self.batch_norm)
        if not layers:
            return None
        return (
            f"second-order meta-gradients through {', '.join(layers)} are wrong under torch.func.vmap "
            "(pytorch/functorch#534); first order and GroupNorm are exact"
        )

    def _vmap_meta_batch_step(
        self,
        stacked: tuple[Tensor, Tensor, Tensor, Tensor],
        n_way: int | None,
        optimizer: torch.optim.Optimizer,
        scaler: Any | None,
    ) -> dict[str, float]:
        """:meth:`meta_batch_step` of stacked episodes ``[T, ...]`` as one :func:`torch.func.vmap`."""
        support_x, support_y, query_x, query_y = stacked
        device_type = support_x.device.type
        second_order = not self.first_order
        optimizer.zero_grad(set_to_none=True)
        start = self._initial_params()
        names = list(start)
        with forward_autocast(), batch_norm_mode(self.model, self.batch_norm), _fresh_casts():
            amp = autocast_dtype(device_type)  # bfloat16 or None (float16 falls back to the loop)

            def task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
                zs = self._embed(sx)
                params = start
                for step in range(self.inner_steps):

                    def support_loss(params: dict[str, Tensor], check: bool = step == 0) -> Tensor:
                        with autocast_of(device_type, amp):  # the gradient itself is taken with autocast off
                            logits = self._fast_forward(params, zs)
                            if check:
                                self._check_logits(logits, sy, n_way)
                            return self.loss_fn(narrow_logits(logits, n_way), sy)

                    with no_autocast(device_type):
                        grads = torch.func.grad(support_loss)(params)
                    params = {
                        n: params[n] - self._inner_lr(n) * (grads[n] if second_order else grads[n].detach())
                        for n in names
                    }
                logits = narrow_logits(self._fast_forward(params, self._embed(qx)), n_way)
                return self.loss_fn(logits, qy), logits

            losses, logits = torch.func.vmap(task, randomness="different")(support_x, support_y, query_x, query_y)
            loss = losses.mean()
        self._backward_step(loss, optimizer, scaler)
        losses, logits = losses.detach(), logits.detach()
        metrics = [
            {"loss": float(losses[i]), self.metric_name: float(self.metric_fn(logits[i], query_y[i]))}
            for i in range(losses.shape[0])
        ]
        out = average_metrics(metrics)
        out["tasks"] = float(len(metrics))
        return out


class FOMAML(MAML):
    """First-order MAML: :class:`MAML` with ``first_order=True``.

    The meta-gradient is the gradient of the query loss at the adapted weights, applied to the initial weights.

    Args:
        model: the network.
        inner_lr: inner-loop SGD step size.
        inner_steps: inner-loop steps during meta-training.
        loss_fn: task loss; default cross-entropy.
        metric_fn: query metric; default accuracy.
        eval_inner_steps: inner steps at test time; default ``inner_steps``.
        n_way: the head's width, the most classes per episode (see :class:`MAML`).
        batch_norm: ``"transductive"`` or ``"frozen"``.
        metric_name: metrics key of ``metric_fn``.
        inner_params: name prefixes of the adapted parameters.
        task_batching: ``"loop"``, ``"vmap"`` or ``"auto"`` (see :class:`MAML`).

    Example::

        learner = FOMAML(model, inner_lr=0.1, inner_steps=3)
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        loss_fn: LossFn | None = None,
        metric_fn: MetricFn | None = None,
        eval_inner_steps: int | None = None,
        n_way: int | None = None,
        batch_norm: str = "transductive",
        metric_name: str = "accuracy",
        inner_params: Sequence[str] | None = None,
        task_batching: str = "loop",
    ) -> None:
        super().__init__(
            model,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            first_order=True,
            loss_fn=loss_fn,
            metric_fn=metric_fn,
            eval_inner_steps=eval_inner_steps,
            n_way=n_way,
            batch_norm=batch_norm,
            metric_name=metric_name,
            inner_params=inner_params,
            task_batching=task_batching,
        )


class _HeadPredictor:
    """Predictor of ANIL: ``head`` with adapted weights applied to ``encoder`` features."""

    def __init__(self, learner: ANIL, params: dict[str, Tensor]) -> None:
        self.learner = learner
        self.adapted = params

    @property
    def params(self) -> dict[str, Tensor]:
        out = {n: p for n, p in self.learner.model.named_parameters()}
        out.update(self.adapted)
        return out

    def __call__(self, x: Tensor) -> Tensor:
        with batch_norm_mode(self.learner.model, self.learner.batch_norm):
            return self.learner._fast_forward(self.adapted, self.learner._embed(x))


class ANIL(MAML):
    """Almost No Inner Loop (Raghu et al., 2020): MAML that adapts only ``model.head``.

    Encoder features of the support and query sets are computed once per episode; the inner loop updates the head's
    fast weights only, so the encoder is identical before and after adaptation. The outer loss back-propagates into the
    encoder (through the query features, and with ``first_order=False`` also through the support features of the inner
    gradients) and into the head's initialisation.

    Args:
        model: a network with ``.encoder`` (``x -> features``) and ``.head`` (``features -> logits``) submodules,
            e.g. :class:`~monai_metalearn.networks.FewShotClassifier`.
        inner_lr: inner-loop SGD step size.
        inner_steps: inner-loop steps during meta-training.
        first_order: drop second-order terms.
        loss_fn: task loss; default cross-entropy.
        metric_fn: query metric; default accuracy.
        eval_inner_steps: inner steps at test time; default ``inner_steps``.
        n_way: the head's width, the most classes per episode (see :class:`MAML`).
        batch_norm: ``"transductive"`` or ``"frozen"``.
        metric_name: metrics key of ``metric_fn``.
        task_batching: ``"loop"``, ``"vmap"`` or ``"auto"`` (see :class:`MAML`).

    Raises:
        ValueError: if ``model`` has no ``encoder`` or ``head`` submodule.

    Example::

        learner = ANIL(FewShotClassifier(ConvEncoder3D(), 256, n_way=5), inner_lr=0.1, inner_steps=5)
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        first_order: bool = False,
        loss_fn: LossFn | None = None,
        metric_fn: MetricFn | None = None,
        eval_inner_steps: int | None = None,
        n_way: int | None = None,
        batch_norm: str = "transductive",
        metric_name: str = "accuracy",
        task_batching: str = "loop",
    ) -> None:
        for attr in ("encoder", "head"):
            if not isinstance(getattr(model, attr, None), nn.Module):
                raise ValueError(f"ANIL needs a model with an nn.Module attribute {attr!r} (e.g. FewShotClassifier)")
        super().__init__(
            model,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            first_order=first_order,
            loss_fn=loss_fn,
            metric_fn=metric_fn,
            eval_inner_steps=eval_inner_steps,
            n_way=n_way,
            batch_norm=batch_norm,
            metric_name=metric_name,
            inner_params=("head.",),
            task_batching=task_batching,
        )

    def _embed(self, x: Tensor) -> Tensor:
        return self.model.encoder(x)

    def _second_order_module(self) -> nn.Module:
        return self.model.head

    def _fast_forward(self, params: dict[str, Tensor], z: Tensor) -> Tensor:
        return functional_call(self.model.head, {n[len("head.") :]: p for n, p in params.items()}, (z,))

    def _predictor(self, params: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
        return _HeadPredictor(self, params)


def _lr_key(name: str) -> str:
    return name.replace(".", "__")


class MetaSGD(MAML):
    """Meta-SGD (Li et al., 2017): MAML with a learned per-element inner learning rate for every adapted parameter.

    ``inner_lrs`` is an ``nn.ParameterDict`` (keys are parameter names with ``.`` replaced by ``__``), initialised to
    ``inner_lr`` and returned by ``parameters()``, so the meta-optimizer learns it together with the initialisation.

    Args:
        model: the network.
        inner_lr: initial value of every inner learning rate.
        inner_steps: inner-loop steps during meta-training.
        first_order: drop second-order terms (the learning rates still receive gradients).
        loss_fn: task loss; default cross-entropy.
        metric_fn: query metric; default accuracy.
        eval_inner_steps: inner steps at test time; default ``inner_steps``.
        n_way: the head's width, the most classes per episode (see :class:`MAML`).
        batch_norm: ``"transductive"`` or ``"frozen"``.
        metric_name: metrics key of ``metric_fn``.
        inner_params: name prefixes of the adapted parameters.
        task_batching: ``"loop"``, ``"vmap"`` or ``"auto"`` (see :class:`MAML`).

    Example::

        learner = MetaSGD(model, inner_lr=0.05)
        opt = torch.optim.Adam(learner.parameters(), 1e-3)  # includes learner.inner_lrs
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        first_order: bool = False,
        loss_fn: LossFn | None = None,
        metric_fn: MetricFn | None = None,
        eval_inner_steps: int | None = None,
        n_way: int | None = None,
        batch_norm: str = "transductive",
        metric_name: str = "accuracy",
        inner_params: Sequence[str] | None = None,
        task_batching: str = "loop",
    ) -> None:
        super().__init__(
            model,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            first_order=first_order,
            loss_fn=loss_fn,
            metric_fn=metric_fn,
            eval_inner_steps=eval_inner_steps,
            n_way=n_way,
            batch_norm=batch_norm,
            metric_name=metric_name,
            inner_params=inner_params,
            task_batching=task_batching,
        )
        named = dict(self.model.named_parameters())
        self.inner_lrs = nn.ParameterDict(
            {
                _lr_key(n): nn.Parameter(torch.full_like(named[n].detach(), float(inner_lr)))
                for n in self.adapted_names()
            }
        )

    def _inner_lr(self, name: str) -> Tensor:
        return self.inner_lrs[_lr_key(name)]
