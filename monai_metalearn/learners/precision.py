"""Mixed precision for the learners: autocast around forward passes only, and inner loops that do not underflow.

The policy, shared by every learner of the package:

* **dtype.** ``amp_dtype=None`` (the engines' default) resolves to bfloat16 on the CPU and on CUDA devices that
  support it (``torch.cuda.is_bf16_supported()``: Ampere and later), float16 on older GPUs
  (:func:`default_amp_dtype`). bfloat16 has float32's exponent range: gradients neither underflow nor overflow and
  nothing is scaled. ``amp_dtype="float16"`` can be asked for explicitly.
* **autocast covers forward passes and losses only.** The engines open :func:`amp_scope`, which records the autocast
  settings without enabling autocast; learners wrap their forward and loss computations in :func:`forward_autocast`.
  Every backward pass (``loss.backward()``, ``scaler.scale(loss).backward()``, the inner loops'
  ``torch.autograd.grad``) and every optimizer step runs under :func:`no_autocast`, also when a caller wraps the whole
  step in ``torch.autocast`` itself.
* **inner loops** (MAML, FOMAML, ANIL, Meta-SGD, Reptile and their segmentation versions) differentiate the support
  loss with :func:`inner_grads`. Under float16 autocast the loss is multiplied by a dynamic scale
  (:class:`InnerLossScaler`, ``2**16`` at first) and the gradients, float32 like the fast weights they belong to, are
  divided by it, so gradients below float16's smallest subnormal (about ``6e-8``) are not flushed to zero. When a
  scaled gradient is not finite (overflow) that step is recomputed in float32 (forward without autocast) and the
  scale is halved for the following steps; after ``growth_interval`` finite steps in a row it is doubled. Under
  bfloat16 or float32 the gradients are computed as they are.
* **second order under float16** (MAML, and ANIL / Meta-SGD with ``first_order=False``, while meta-training): the
  support passes run in float32. The outer gradient reaches the initial weights through the graph of the inner
  gradients, divided by the inner scale, and float16 would flush it there (a scale cannot be divided out of a path
  that is summed with the others at the initial weights). The query pass still runs under autocast, and adaptation
  at test time (first order) is loss-scaled as above.
* **fresh casts.** Inner forward passes run with autocast's cache of low-precision weight copies off: the cache is
  keyed by tensor and lives until the outermost autocast block ends, so weights updated in place inside one block
  (Reptile's inner optimizer) would otherwise be used at their first value at every step.
* **fine-tuning** (:class:`~monai_metalearn.learners.FineTuneBaseline`, the segmentation fine-tuning baselines) fits
  its head or network copy in float32 with autocast disabled, on features computed under autocast.
* **outer loss.** Under float16 the engine hands a ``torch.amp.GradScaler`` to the learner (``scaler``), which scales
  the outer (meta-) loss; the inner-loop scale is divided out before the fast weights are updated, so the two do not
  interact.

Example::

    with amp_scope(True, "cuda", torch.float16):
        metrics = learner.outer_step(sx, sy, qx, qy, optimizer, scaler)  # forward in float16, backward outside
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from monai_metalearn.errors import ConfigError

__all__ = [
    "InnerLossScaler",
    "amp_scope",
    "autocast_dtype",
    "default_amp_dtype",
    "forward_autocast",
    "inner_grads",
    "no_autocast",
]

_SCOPE: contextvars.ContextVar[tuple[str, torch.dtype, dict[str, Any]] | None] = contextvars.ContextVar(
    "monai_metalearn_amp_scope", default=None
)


def default_amp_dtype(device: str | torch.device) -> torch.dtype:
    """The autocast dtype of ``amp_dtype=None``: bfloat16 on the CPU and on CUDA devices that support it, else
    float16.

    Args:
        device: the device the learner runs on.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


@contextlib.contextmanager
def amp_scope(
    enabled: bool, device_type: str | torch.device, dtype: torch.dtype, **autocast_kwargs: Any
) -> Iterator[None]:
    """Record the autocast settings that :func:`forward_autocast` applies, without enabling autocast.

    The engines run each learner step inside it; the learner puts its forward passes under :func:`forward_autocast`
    and keeps its backward passes and optimizer steps outside. ``enabled=False`` turns autocast off for the block
    (also inside an enclosing scope).

    Args:
        enabled: whether forward passes run under autocast.
        device_type: ``"cuda"``, ``"cpu"`` (or a device).
        dtype: the autocast dtype (float16 or bfloat16).
        autocast_kwargs: further ``torch.autocast`` arguments (``cache_enabled`` ...).
    """
    device_type = torch.device(device_type).type if not isinstance(device_type, str) else device_type
    token = _SCOPE.set((device_type, dtype, dict(autocast_kwargs)) if enabled else None)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def forward_autocast() -> contextlib.AbstractContextManager:
    """``torch.autocast`` with the settings of the innermost enabled :func:`amp_scope`; a null context outside one
    (an autocast the caller opened stays in force)."""
    scope = _SCOPE.get()
    if scope is None:
        return contextlib.nullcontext()
    device_type, dtype, kwargs = scope
    return torch.autocast(device_type, dtype=dtype, **kwargs)


def no_autocast(device_type: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device_type`` and for the CPU: the context of backward passes and optimizer steps."""
    device_type = torch.device(device_type).type if not isinstance(device_type, str) else device_type
    stack = contextlib.ExitStack()
    for kind in dict.fromkeys((device_type, "cpu")):
        stack.enter_context(torch.autocast(kind, enabled=False))
    return stack


def autocast_dtype(device_type: str | torch.device) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` right now, or ``None`` when autocast is off there."""
    device_type = torch.device(device_type).type if not isinstance(device_type, str) else device_type
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class InnerLossScaler:
    """Dynamic loss scale of the inner-loop gradients under float16 autocast (see :func:`inner_grads`).

    Args:
        init_scale: the first scale.
        growth_factor: the scale is multiplied by it after ``growth_interval`` finite steps in a row.
        backoff_factor: the scale is multiplied by it after a step whose scaled gradients were not finite.
        growth_interval: finite steps before the scale grows.
        min_scale: the smallest scale.
        max_scale: the largest scale.
        enabled: ``False`` differentiates float16 losses unscaled (gradients below about ``6e-8`` are lost).

    Attributes:
        scale: the current scale.
        fallbacks: how many inner steps were recomputed in float32 so far.

    Raises:
        ConfigError: for ``min_scale <= 0``, ``min_scale > max_scale``, ``init_scale`` outside
            ``[min_scale, max_scale]``, ``growth_factor <= 1``, ``backoff_factor`` outside ``(0, 1)`` or
            ``growth_interval < 1``.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 100,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
        enabled: bool = True,
    ) -> None:
        if not 0 < min_scale <= max_scale:
            raise ConfigError(f"InnerLossScaler needs 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        if not min_scale <= init_scale <= max_scale:
            raise ConfigError(f"InnerLossScaler init_scale={init_scale} is outside [{min_scale}, {max_scale}]")
        if growth_factor <= 1 or not 0 < backoff_factor < 1 or int(growth_interval) < 1:
            raise ConfigError(
                f"InnerLossScaler needs growth_factor > 1, 0 < backoff_factor < 1 and growth_interval >= 1, got "
                f"{growth_factor}, {backoff_factor}, {growth_interval}"
            )
        self.scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.enabled = bool(enabled)
        self.fallbacks = 0
        self._good_steps = 0

    def update(self, finite: bool) -> None:
        """Grow the scale after ``growth_interval`` finite steps in a row; shrink it after a non-finite one."""
        if finite:
            self._good_steps += 1
            if self._good_steps >= self.growth_interval:
                self.scale = min(self.scale * self.growth_factor, self.max_scale)
                self._good_steps = 0
        else:
            self.fallbacks += 1
            self._good_steps = 0
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)

    def __repr__(self) -> str:
        return f"InnerLossScaler(scale={self.scale:g}, fallbacks={self.fallbacks}, enabled={self.enabled})"


@contextlib.contextmanager
def _fresh_casts() -> Iterator[None]:
    """Autocast's cache of low-precision weight copies off: fast weights updated in place (Reptile's inner optimizer)
    are cast again at every step instead of reusing the copy of their first value."""
    enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(enabled)


def _all_finite(grads: Sequence[Tensor | None]) -> bool:
    present = [torch.isfinite(g).all() for g in grads if g is not None]
    return bool(torch.stack(present).all()) if present else True


def inner_grads(
    closure: Callable[[], Tensor],
    inputs: Sequence[Tensor],
    create_graph: bool = False,
    scaler: InnerLossScaler | None = None,
) -> tuple[Tensor, list[Tensor | None]]:
    """The support loss of one inner step and its gradients with respect to ``inputs``, safe under autocast.

    ``closure()`` computes the loss in the autocast state of the caller, with autocast's weight cache off (fast weights
    that an inner optimizer updates in place are cast anew at every step); the gradients are always taken with autocast
    disabled. Under float16 autocast and an enabled ``scaler`` the loss is multiplied by ``scaler.scale`` before
    differentiation and the gradients divided by it; if a scaled gradient is not finite, ``closure()`` is run again
    without autocast and that float32 loss is differentiated instead (and the scale is lowered). With
    ``create_graph=True`` under float16 (second order), ``closure()`` runs without autocast from the start.

    Args:
        closure: ``() -> scalar loss`` (the forward pass with the fast weights ``inputs``).
        inputs: the tensors to differentiate with respect to (fast weights, ``requires_grad``).
        create_graph: keep the graph of the gradients (second-order MAML).
        scaler: the inner loss scale; ``None`` differentiates the loss unscaled.

    Returns:
        ``(loss, grads)``: the loss that was differentiated and one gradient per input (``None`` for an input the
        loss does not depend on).
    """
    inputs = list(inputs)
    device_type = inputs[0].device.type if inputs else "cpu"
    if scaler is None or not scaler.enabled or autocast_dtype(device_type) != torch.float16:
        with _fresh_casts():
            loss = closure()
        with no_autocast(device_type):
            grads = torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)
        return loss, list(grads)
    if create_graph:  # second order under float16: the support pass in float32 (see the module docstring)
        with no_autocast(device_type):
            loss = closure()
            grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
        return loss, list(grads)
    with _fresh_casts():
        loss = closure()
    scale = scaler.scale
    with no_autocast(device_type):
        grads = torch.autograd.grad(loss.float() * scale, inputs, create_graph=create_graph, allow_unused=True)
        finite = _all_finite(grads)
    scaler.update(finite)
    if finite:
        return loss, [None if g is None else g / scale for g in grads]
    with no_autocast(device_type):  # this step in float32
        loss = closure()
        grads = torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)
    return loss, list(grads)
