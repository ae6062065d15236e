"""Networks for few-shot 3D segmentation: a dense backbone with a 1x1x1 head, and a small MONAI UNet backbone.

* :class:`SegmentationModel`: ``backbone`` (any 3D network mapping ``[B, C, *S]`` to ``[B, F, *S]`` at the input
  resolution) followed by a fixed leaky ReLU and a ``Conv3d(F, out_channels, 1)`` head. It has ``.encoder`` (backbone
  and activation) and ``.head`` submodules, so MAML, FOMAML, Reptile and ANIL (which adapts ``head`` only) use it as
  they use :class:`~monai_metalearn.networks.FewShotClassifier`.
* :func:`unet_backbone`: ``monai.networks.nets.UNet`` with ``out_channels=feature_channels`` as the dense backbone.

Normalisation: :func:`unet_backbone` uses instance normalisation by default, not BatchNorm. Instance normalisation
normalises each sample on its own and keeps no running statistics, so an inner loop (MAML-family adaptation,
fine-tuning on a support set) gives the same result whatever the batch composition (support size, query size, how many
sliding windows are predicted at once), training and evaluation behave alike, and no BatchNorm mode has to be chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FEATURE_NEGATIVE_SLOPE", "SegmentationModel", "unet_backbone", "segmentation_features"]

FEATURE_NEGATIVE_SLOPE = 0.1
"""Negative slope of the leaky ReLU between a dense backbone and its 1x1x1 head."""


def segmentation_features(backbone_output: Tensor) -> Tensor:
    """The parameter-free non-linearity applied to a dense backbone's output: ``leaky_relu(x, 0.1)``.

    A MONAI UNet ends with a plain convolution, so without it the 1x1x1 head would compose linearly with that
    convolution; the leaky slope keeps a gradient on negative features.
    """
    return F.leaky_relu(backbone_output, FEATURE_NEGATIVE_SLOPE)


class _Activation(nn.Module):
    """Module form of :func:`segmentation_features` (no parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        return segmentation_features(x)

    def extra_repr(self) -> str:
        return f"leaky_relu(negative_slope={FEATURE_NEGATIVE_SLOPE})"


class SegmentationModel(nn.Module):
    """A dense backbone, a leaky ReLU and a 1x1x1 convolution head: ``logits = head(leaky_relu(backbone(x)))``.

    ``encoder`` is ``nn.Sequential(backbone, activation)`` (the backbone itself is ``encoder[0]``, also available as
    :attr:`backbone`), so ``head(encoder(x))`` is the whole forward pass. This is what ANIL computes (features from
    ``model.encoder`` once per episode, the head adapted), so ANIL and the model's own ``forward`` agree.

    Args:
        backbone: maps ``[B, C, *S]`` to ``[B, feature_channels, *S]`` at the input resolution, e.g.
            :func:`unet_backbone`.
        feature_channels: the backbone's output channels ``F``.
        out_channels: logit channels; 2 (background, foreground) for binary few-shot segmentation.
        zero_init_head: initialise the head's weight and bias to zero (every class equally likely before training;
            the first gradient steps then move the head along the feature differences of the classes). ``False``
            (default) keeps PyTorch's initialisation.

    Raises:
        ValueError: if ``feature_channels`` or ``out_channels`` is not positive.

    Example::

        model = SegmentationModel(unet_backbone(feature_channels=16), 16)
        logits = model(torch.randn(2, 1, 32, 32, 32))  # [2, 2, 32, 32, 32]
    """

    def __init__(
        self, backbone: nn.Module, feature_channels: int, out_channels: int = 2, zero_init_head: bool = False
    ) -> None:
        super().__init__()
        if feature_channels < 1 or out_channels < 1:
            raise ValueError(f"feature_channels and out_channels must be >= 1, got {feature_channels}, {out_channels}")
        self.encoder = nn.Sequential(backbone, _Activation())
        self.head = nn.Conv3d(feature_channels, out_channels, kernel_size=1)
        if zero_init_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.feature_channels = int(feature_channels)
        self.out_channels = int(out_channels)

    @property
    def backbone(self) -> nn.Module:
        """The dense backbone (``encoder[0]``)."""
        return self.encoder[0]

    def features(self, x: Tensor) -> Tensor:
        """``leaky_relu(backbone(x), 0.1)``: ``[B, feature_channels, *S]``."""
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, out_channels, *S]``."""
        return self.head(self.encoder(x))


def unet_backbone(
    feature_channels: int = 16,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    num_res_units: int = 1,
    norm: Any = "instance",
    in_channels: int = 1,
    dropout: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """A MONAI 3D UNet as a dense feature extractor ``[B, in_channels, *S] -> [B, feature_channels, *S]``.

    Instance normalisation is the default (see the module docstring): adaptation and prediction do not depend on the
    batch composition. It needs more than one voxel per channel at the coarsest level: each spatial size must be at
    least ``2 * prod(strides)`` (16 for the default strides, or a multiple giving >= 2 voxels there).

    Args:
        feature_channels: output channels ``F`` (the features of the head or the prototypes).
        channels: channels of the UNet levels.
        strides: downsampling strides between levels (``len(channels) - 1`` of them).
        num_res_units: residual units per block.
        norm: MONAI norm spec (``"instance"``, ``"batch"``, ``("group", {"num_groups": 4})`` ...).
        in_channels: input channels.
        dropout: dropout probability.
        kwargs: further ``monai.networks.nets.UNet`` arguments (``act``, ``kernel_size`` ...).

    Example::

        backbone = unet_backbone(feature_channels=8, channels=(8, 16), strides=(2,))
        features = backbone(torch.randn(1, 1, 24, 24, 24))  # [1, 8, 24, 24, 24]
    """
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=feature_channels,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        norm=norm,
        dropout=dropout,
        **kwargs,
    )
