"""Batched tasks: running a meta-batch's inner loops as one :func:`torch.func.vmap` instead of a Python loop.

The learners that support it (:class:`~monai_metalearn.learners.MAML`, ``FOMAML``, ``ANIL``, ``MetaSGD`` and
:class:`~monai_metalearn.learners.Reptile` with ``inner_optimizer="sgd"``) take ``task_batching``:

* ``"loop"``: :meth:`~monai_metalearn.learners.base.Learner.meta_batch_step` adapts and scores the tasks one after
  the other (one task's graph alive at a time);
* ``"vmap"``: the episodes of the meta-batch are stacked and the per-task function (inner loop with
  :func:`torch.func.grad`, query loss) runs once under :func:`torch.func.vmap`; one backward of the mean loss;
* ``"auto"``: the learner's measured default (its ``AUTO_TASK_BATCHING`` class attribute, see
  ``benchmarks/README.md``, "Batched tasks").

This module holds what those learners share: the option's check, the conditions under which a vmap meta-batch falls
back to the loop (:class:`TaskBatchingState`, each reason logged once per learner at INFO) and the stacking of equal
episodes (:func:`stack_episodes`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from monai_metalearn.errors import ConfigError

from .base import Episode, check_episode
from .precision import autocast_dtype, forward_autocast

__all__ = [
    "TASK_BATCHING",
    "TaskBatchingState",
    "TaskBatchingMixin",
    "check_task_batching",
    "stack_episodes",
    "autocast_of",
    "run_task_batched",
    "batch_statistics_layers",
    "VMAP_ERRORS",
]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

#: the values of the ``task_batching`` option
TASK_BATCHING = ("loop", "vmap", "auto")

#: the exceptions a first vmap call raises for a model or loss vmap cannot run (an op without batching rule,
#: data-dependent control flow such as ``bool(tensor)`` or ``.item()``, an in-place write into an unbatched tensor)
VMAP_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, NotImplementedError)


def check_task_batching(value: str) -> str:
    """Return ``value`` if it is one of :data:`TASK_BATCHING`.

    Args:
        value: the requested ``task_batching``.

    Raises:
        ConfigError: (a ``ValueError``) naming ``task_batching`` and the allowed values.
    """
    if not isinstance(value, str) or value not in TASK_BATCHING:
        raise ConfigError(f"task_batching must be one of {TASK_BATCHING}, got {value!r}")
    return value


def autocast_of(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, dtype)``, or a null context when ``dtype`` is ``None`` (autocast off)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def stack_episodes(
    episodes: Sequence[Episode], max_n_way: int | None = None
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor] | None, int | None, str | None]:
    """Check every episode and stack them along a new first (task) dimension.

    Args:
        episodes: ``(support_x, support_y, query_x, query_y)`` tuples.
        max_n_way: the largest ``N`` allowed (the head's width), passed to
            :func:`~monai_metalearn.learners.base.check_episode`.

    Returns:
        ``(stacked, n_way, reason)``: the four stacked tensors ``[T, ...]`` and the common ``N`` (``None`` for
        non-class targets), or ``(None, None, reason)`` naming why the episodes cannot be stacked (shapes, dtypes,
        devices or ``N`` differ).

    Raises:
        ValueError: for a malformed episode (the message of
            :func:`~monai_metalearn.learners.base.check_episode`).
    """
    n_ways = [check_episode(*episode, max_n_way=max_n_way) for episode in episodes]
    first = episodes[0]
    names = ("support_x", "support_y", "query_x", "query_y")
    for i, episode in enumerate(episodes[1:], start=1):
        for name, a, b in zip(names, first, episode):
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                return None, None, (
                    f"episodes of unequal {name}: episode 0 has {tuple(a.shape)} {a.dtype} on {a.device}, episode "
                    f"{i} has {tuple(b.shape)} {b.dtype} on {b.device}"
                )
    if len(set(n_ways)) > 1:
        return None, None, f"episodes of unequal n_way: {n_ways}"
    stacked = tuple(torch.stack([episode[j] for episode in episodes]) for j in range(4))
    return stacked, n_ways[0], None  # type: ignore[return-value]


def batch_statistics_layers(module: nn.Module, batch_norm: str = "transductive") -> list[str]:
    """The normalisation layers of ``module`` whose second-order gradients ``torch.func.vmap`` gets wrong.

    Under :func:`torch.func.vmap`, differentiating :func:`torch.func.grad` of a loss a second time through a layer
    that normalises with the statistics of its input (BatchNorm with batch statistics, InstanceNorm, LayerNorm) gives
    wrong gradients in torch 2.x (the batching rule of the normalisation's backward; pytorch/functorch#534; measured
    here in float64: relative errors of 5 % for BatchNorm / InstanceNorm and 2e-5 for LayerNorm). First-order
    gradients, GroupNorm and BatchNorm with frozen running statistics are exact. Second-order learners therefore run
    such models as a loop. Normalisations called functionally (``F.layer_norm`` inside a custom module) are not
    seen.

    Args:
        module: the part of the network that is differentiated twice.
        batch_norm: the learner's BatchNorm mode; ``"frozen"`` BatchNorm uses stored statistics and is exact.

    Returns:
        the class names of the affected layers found (sorted, without repetitions).
    """
    found = set()
    for m in module.modules():
        if isinstance(m, _BatchNorm) and batch_norm == "transductive":
            found.add(type(m).__name__)
        elif isinstance(m, (_InstanceNorm, nn.LayerNorm)):
            found.add(type(m).__name__)
    return sorted(found)


class TaskBatchingState:
    """The ``task_batching`` choice of one learner and why its vmap path falls back to the loop.

    Args:
        mode: one of :data:`TASK_BATCHING`.
        auto: what ``"auto"`` means for this learner (``"loop"`` or ``"vmap"``).

    Attributes:
        mode: the option as given.
        failure: set when a first vmap call failed (see :data:`VMAP_ERRORS`): every later meta-batch uses the loop.
        verified: a vmap meta-batch has succeeded once; later errors are raised, not treated as unsupported.
        logged: the kinds of fallback already logged.

    Raises:
        ConfigError: for an unknown ``mode``.
    """

    def __init__(self, mode: str, auto: str) -> None:
        self.mode = check_task_batching(mode)
        self.auto = auto
        self.failure: str | None = None
        self.verified = False
        self.logged: set[str] = set()

    @property
    def wants_vmap(self) -> bool:
        """Whether the option (``"auto"`` resolved) asks for vmap."""
        return (self.auto if self.mode == "auto" else self.mode) == "vmap"

    def fallback(self, owner: object, kind: str, reason: str) -> None:
        """Log ``reason`` at INFO the first time a meta-batch of ``owner`` runs as a loop for ``kind``."""
        if kind not in self.logged:
            self.logged.add(kind)
            logger.info(
                "%s: task_batching=%r runs the meta-batch as a loop: %s", type(owner).__name__, self.mode, reason
            )


class TaskBatchingMixin:
    """The ``task_batching`` property of the learners with a vmap path.

    The class sets ``AUTO_TASK_BATCHING`` (``"loop"`` or ``"vmap"``) and keeps its :class:`TaskBatchingState` in
    ``self._task_batching``.
    """

    AUTO_TASK_BATCHING = "loop"
    _task_batching: TaskBatchingState

    @property
    def task_batching(self) -> str:
        """``"loop"``, ``"vmap"`` or ``"auto"``; setting it validates the value and forgets earlier fallbacks."""
        return self._task_batching.mode

    @task_batching.setter
    def task_batching(self, value: str) -> None:
        self._task_batching = TaskBatchingState(value, self.AUTO_TASK_BATCHING)


def run_task_batched(
    owner: object,
    state: TaskBatchingState,
    episodes: Sequence[Episode],
    max_n_way: int | None,
    vmap_step: Callable[[tuple[Tensor, Tensor, Tensor, Tensor], int | None], _T],
    loop_step: Callable[[], _T],
    unsupported: str | None = None,
) -> _T:
    """Run a meta-batch through ``vmap_step`` when ``state`` asks for it and nothing stands against it, else
    through ``loop_step``.

    The loop is taken (and the reason logged once per kind, INFO) when ``unsupported`` is given (a learner setting
    without vmap path), float16 autocast is active (in the caller's autocast or the engine's
    :func:`~monai_metalearn.learners.precision.amp_scope`), the episodes differ in shape, dtype, device or ``N``, or
    an earlier first vmap call failed. A first ``vmap_step`` that raises one of :data:`VMAP_ERRORS` marks the
    learner as unable to vmap (permanently; logged) and the meta-batch is run by the loop; should the loop fail too,
    the error was not vmap's, the mark is removed and the loop's error raised. After one successful vmap meta-batch,
    errors are raised as they come.

    Args:
        owner: the learner (named in the log).
        state: its :class:`TaskBatchingState`.
        episodes: the meta-batch (non-empty).
        max_n_way: the head's width, for :func:`stack_episodes`.
        vmap_step: ``(stacked episodes, n_way) -> metrics``.
        loop_step: ``() -> metrics``, the loop over the episodes.
        unsupported: why this learner's current settings have no vmap path, if so.

    Returns:
        what the step returned.

    Raises:
        ValueError: for a malformed episode.
    """
    if not state.wants_vmap:
        return loop_step()
    device_type = episodes[0][0].device.type
    with forward_autocast():
        float16 = autocast_dtype(device_type) == torch.float16
    reason = None
    if unsupported is not None:
        kind, reason = "unsupported", unsupported
    elif state.failure is not None:
        kind, reason = "failure", state.failure
    elif float16:
        kind, reason = "float16", "float16 autocast is active (the inner loss scale needs a per-step overflow check)"
    if reason is not None:
        state.fallback(owner, kind, reason)
        return loop_step()
    stacked, n_way, reason = stack_episodes(episodes, max_n_way)
    if stacked is None:
        state.fallback(owner, "shapes", f"{reason} (vmap needs equal episodes)")
        return loop_step()
    try:
        out = vmap_step(stacked, n_way)
    except VMAP_ERRORS as error:
        if state.verified:
            raise
        first_line = (str(error).splitlines() or [""])[0][:160]
        state.failure = f"vmap cannot run this model or loss ({type(error).__name__}: {first_line})"
        state.fallback(owner, "failure", state.failure + "; every later meta-batch runs as a loop")
        try:
            return loop_step()
        except Exception:
            state.failure = None
            state.logged.discard("failure")
            raise
    state.verified = True
    return out
