"""Networks for few-shot learning on 3D volumes: small encoders, heads, MONAI backbone adapters, BatchNorm modes."""

from __future__ import annotations

from .batchnorm import BATCH_NORM_MODES, batch_norm_mode, check_batch_norm_mode, has_batch_norm
from .encoders import MONAI_BACKBONES, ConvEncoder3D, FewShotClassifier, monai_backbone, replace_batch_norm
from .heads import CosineClassifier

__all__ = [
    "BATCH_NORM_MODES",
    "MONAI_BACKBONES",
    "ConvEncoder3D",
    "CosineClassifier",
    "FewShotClassifier",
    "batch_norm_mode",
    "check_batch_norm_mode",
    "has_batch_norm",
    "monai_backbone",
    "replace_batch_norm",
]
