"""Networks for few-shot learning on 3D volumes: small encoders, heads, MONAI backbone adapters, BatchNorm modes,
and segmentation networks (a dense backbone with a 1x1x1 head)."""

from __future__ import annotations

from .batchnorm import BATCH_NORM_MODES, batch_norm_mode, check_batch_norm_mode, has_batch_norm
from .checkpointing import (
    ACTIVATION_CHECKPOINTING,
    activation_checkpointing_mode,
    checkpointed_modules,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    enable_channels_last_3d,
    to_channels_last_3d,
)
from .encoders import MONAI_BACKBONES, ConvEncoder3D, FewShotClassifier, monai_backbone, replace_batch_norm
from .heads import CosineClassifier
from .position import BodyPositionEncoder, body_position_features
from .segmentation import FEATURE_NEGATIVE_SLOPE, SegmentationModel, segmentation_features, unet_backbone

__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "activation_checkpointing_mode",
    "checkpointed_modules",
    "disable_activation_checkpointing",
    "enable_activation_checkpointing",
    "enable_channels_last_3d",
    "to_channels_last_3d",
    "BodyPositionEncoder",
    "body_position_features",
    "BATCH_NORM_MODES",
    "FEATURE_NEGATIVE_SLOPE",
    "MONAI_BACKBONES",
    "ConvEncoder3D",
    "CosineClassifier",
    "FewShotClassifier",
    "SegmentationModel",
    "batch_norm_mode",
    "check_batch_norm_mode",
    "has_batch_norm",
    "monai_backbone",
    "replace_batch_norm",
    "segmentation_features",
    "unet_backbone",
]
