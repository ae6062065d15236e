"""Build any learner by name, for configs (MONAI bundles) and command lines.

Example::

    learner = create_learner("maml", encoder=ConvEncoder3D(), feature_dim=256, n_way=5, inner_lr=0.1)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from monai_metalearn.errors import ConfigError
from monai_metalearn.learners.base import Learner
from monai_metalearn.learners.finetune import FineTuneBaseline
from monai_metalearn.learners.maml import ANIL, FOMAML, MAML, MetaSGD
from monai_metalearn.learners.matching import MatchingNet
from monai_metalearn.learners.protonet import ProtoNet
from monai_metalearn.learners.reptile import Reptile

__all__ = ["LEARNERS", "MEMORY_OPTIONS", "configure_memory", "create_learner", "learner_key"]

#: the factories' own memory options (not learner arguments): see :func:`configure_memory`
MEMORY_OPTIONS = ("activation_checkpointing", "channels_last")

#: learner name -> (class, needs a classifier head on the encoder)
LEARNERS: dict[str, tuple[type[Learner], bool]] = {
    "maml": (MAML, True),
    "fomaml": (FOMAML, True),
    "anil": (ANIL, True),
    "metasgd": (MetaSGD, True),
    "reptile": (Reptile, True),
    "protonet": (ProtoNet, False),
    "matching": (MatchingNet, False),
    "finetune": (FineTuneBaseline, False),
}


#: other spellings of a :data:`LEARNERS` key (after case folding and removing ``-``/``_``)
_ALIASES = {"matchingnet": "matching", "matchingnetworks": "matching"}


def learner_key(name: str) -> str:
    """The :data:`LEARNERS` key of a learner name: case-insensitive, ``-``/``_`` ignored (``"Meta-SGD"`` ->
    ``"metasgd"``); aliases such as ``"matching_net"`` / ``"MatchingNetworks"`` -> ``"matching"``."""
    key = str(name).lower().replace("-", "").replace("_", "")
    return _ALIASES.get(key, key)


def configure_memory(
    network: nn.Module | None, activation_checkpointing: bool | str = False, channels_last: bool = False
) -> str:
    """Validate the factories' memory options and apply those that concern the network (in place).

    * ``activation_checkpointing`` (:data:`~monai_metalearn.networks.ACTIVATION_CHECKPOINTING`): ``"blocks"`` or
      ``"all"`` (``True``) checkpoints the network's blocks
      (:func:`~monai_metalearn.networks.enable_activation_checkpointing`); ``"steps"`` / ``"all"`` also checkpoints
      the second-order inner steps of a MAML-family learner (:func:`checkpoint_inner_steps`, after the learner is
      built). ``False`` (default): nothing.
    * ``channels_last``: :func:`~monai_metalearn.networks.enable_channels_last_3d` (pays on CUDA, not on the CPU).

    Args:
        network: the encoder or dense backbone; ``None`` for learners without one (then both options must be off).
        activation_checkpointing: ``False``/``True`` or ``"none"``, ``"blocks"``, ``"steps"``, ``"all"``.
        channels_last: a bool.

    Returns:
        the checkpointing mode (``"none"``, ``"blocks"``, ``"steps"`` or ``"all"``).

    Raises:
        ConfigError: for another value of either option, for an option on a learner without a network, or for
            ``"blocks"``/``"all"`` on a network without known blocks.
    """
    from monai_metalearn.networks.checkpointing import (
        activation_checkpointing_mode,
        enable_activation_checkpointing,
        enable_channels_last_3d,
    )

    mode = activation_checkpointing_mode(activation_checkpointing)
    if not isinstance(channels_last, bool):
        raise ConfigError(f"channels_last must be a bool, got {channels_last!r}")
    if network is None:
        if mode != "none" or channels_last:
            raise ConfigError("activation_checkpointing and channels_last need a learner with a network")
        return mode
    if mode in ("blocks", "all"):
        enable_activation_checkpointing(network)
    if channels_last:
        enable_channels_last_3d(network)
    return mode


def checkpoint_inner_steps(learner: Learner, mode: str, name: str) -> Learner:
    """Set ``learner.checkpoint_inner_steps`` for the modes ``"steps"`` and ``"all"`` (MAML-family learners).

    Args:
        learner: the learner.
        mode: the value returned by :func:`configure_memory`.
        name: the learner's name, for the error message.

    Returns:
        ``learner``.

    Raises:
        ConfigError: ``"steps"`` for a learner without a second-order inner loop (not MAML, ANIL, Meta-SGD).
    """
    from monai_metalearn.learners.maml import MAML

    if mode in ("steps", "all"):
        if isinstance(learner, MAML):
            learner.checkpoint_inner_steps = True
        elif mode == "steps":
            raise ConfigError(
                f"activation_checkpointing='steps' needs a MAML-family learner (its second-order inner steps); "
                f"{name!r} has none, use 'blocks'"
            )
    return learner


def create_learner(
    name: str,
    encoder: nn.Module,
    feature_dim: int,
    n_way: int,
    n_base_classes: int | None = None,
    activation_checkpointing: bool | str = False,
    channels_last: bool = False,
    **kwargs: Any,
) -> Learner:
    """A learner of the family ``name`` around ``encoder``.

    Args:
        name: one of :data:`LEARNERS` (case-insensitive; ``-``/``_`` ignored, so ``"Meta-SGD"`` works).
        encoder: feature extractor ``[B, C, D, H, W] -> [B, feature_dim]``.
        feature_dim: encoder output size.
        n_way: classes per episode (sizes the head of MAML-family learners).
        n_base_classes: meta-train classes, for the fine-tuning baseline's pre-training head.
        activation_checkpointing: ``False`` (default), ``True`` (= ``"all"``), ``"blocks"``, ``"steps"`` or ``"all"``:
            checkpoint the encoder's blocks and/or the second-order inner steps (see :func:`configure_memory`).
        channels_last: store the encoder in ``channels_last_3d`` (pays on CUDA only).
        kwargs: the learner's own arguments (e.g. ``inner_lr``, ``inner_steps``, ``distance``, ``head``, ``fce``).
            ``matching`` gets ``feature_dim`` (for its full-context LSTMs) and, like ``protonet``, no fixed ``n_way``.

    Raises:
        ValueError: unknown name (the message lists the known ones), or ``finetune`` without ``n_base_classes``.
        ConfigError: (a ``ValueError``) a bad ``activation_checkpointing`` or ``channels_last``.
    """
    from monai_metalearn.networks import FewShotClassifier

    key = learner_key(name)
    if key not in LEARNERS:
        raise ValueError(f"unknown learner {name!r}; choose one of {sorted(LEARNERS)}.")
    mode = configure_memory(encoder, activation_checkpointing, channels_last)
    cls, needs_head = LEARNERS[key]
    if needs_head:
        model = FewShotClassifier(encoder, feature_dim, n_way)
        return checkpoint_inner_steps(cls(model, n_way=n_way, **kwargs), mode, key)
    if cls is FineTuneBaseline:
        if n_base_classes is None:
            raise ValueError("the 'finetune' baseline needs n_base_classes (the number of meta-train classes).")
        learner: Learner = cls(encoder, feature_dim, n_base_classes=n_base_classes, n_way=n_way, **kwargs)
    elif cls is MatchingNet:
        learner = cls(encoder, **{"feature_dim": feature_dim, **kwargs})
    else:
        learner = cls(encoder, **kwargs)
    return checkpoint_inner_steps(learner, mode, key)
