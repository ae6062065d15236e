"""How BatchNorm behaves inside meta-learning inner loops.

Meta-learners call one network many times per task (support forward passes in the inner loop, then a query pass), often
through :func:`torch.func.functional_call` with adapted ("fast") weights. Standard ``nn.BatchNorm*`` in train mode would
update its running statistics on every one of those calls, mixing tasks and inner steps, and in eval mode would apply
statistics that were never computed from the task at hand. This package therefore picks one of two explicit modes:

* ``"transductive"`` (default of the meta-learners): every BatchNorm layer normalises with the statistics of the batch
  it is given (the support set during adaptation, the query batch when scoring), whatever
  ``model.train()``/``model.eval()`` says, and running statistics are never read nor updated. This is the per-task
  transductive setting of the original MAML code. Call predictors on whole query batches, not single samples.
* ``"frozen"``: every BatchNorm layer uses its stored running statistics (eval behaviour) and never updates them. Use it
  for pretrained backbones (e.g. a MONAI ResNet trained elsewhere) and for the fine-tuning baseline's adaptation.

The default normalisation of :class:`~monai_metalearn.networks.ConvEncoder3D` is GroupNorm, which has no running
statistics and is independent of the batch, so none of this matters for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BATCH_NORM_MODES", "batch_norm_mode", "has_batch_norm", "check_batch_norm_mode"]

BATCH_NORM_MODES = ("transductive", "frozen")


def check_batch_norm_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`BATCH_NORM_MODES`.

    Args:
        mode: the requested mode.

    Raises:
        ValueError: if ``mode`` is not a known mode.
    """
    if mode not in BATCH_NORM_MODES:
        raise ValueError(f"batch_norm must be one of {BATCH_NORM_MODES}, got {mode!r}")
    return mode


def has_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` contains any BatchNorm layer (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``)."""
    return any(isinstance(m, _BatchNorm) for m in module.modules())


@contextmanager
def batch_norm_mode(module: nn.Module, mode: str = "transductive") -> Iterator[nn.Module]:
    """Temporarily switch every BatchNorm layer of ``module`` to ``mode``; restore the layers on exit.

    Only BatchNorm layers are touched (their ``training`` and ``track_running_stats`` flags), so dropout and the rest of
    the network keep the train/eval mode the caller set. Running statistics are never updated inside the context.

    Args:
        module: the network.
        mode: ``"transductive"`` (batch statistics, running statistics ignored and untouched) or ``"frozen"`` (running
            statistics used, not updated).

    Raises:
        ValueError: if ``mode`` is unknown.

    Example::

        with batch_norm_mode(net, "transductive"):
            logits = torch.func.functional_call(net, fast_weights, (x,))
    """
    check_batch_norm_mode(mode)
    saved = []
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            saved.append((m, m.training, m.track_running_stats))
            if mode == "transductive":
                m.training = True
                m.track_running_stats = False
            else:
                m.training = False
    try:
        yield module
    finally:
        for m, training, track in saved:
            m.training = training
            m.track_running_stats = track
