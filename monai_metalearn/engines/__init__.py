"""MONAI workflows for episodic meta-training and few-shot evaluation."""

from __future__ import annotations

from monai_metalearn.engines.evaluator import MetaEvaluator
from monai_metalearn.engines.trainer import MetaTrainer, first_loss
from monai_metalearn.engines.utils import (
    EPISODE_KEYS,
    autocast_context,
    default_device,
    default_prepare_episode,
    is_meta_batch,
    resolve_amp_dtype,
)

__all__ = [
    "MetaTrainer",
    "MetaEvaluator",
    "first_loss",
    "EPISODE_KEYS",
    "default_device",
    "default_prepare_episode",
    "is_meta_batch",
    "resolve_amp_dtype",
    "autocast_context",
]
