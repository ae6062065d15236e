"""Feature extractors for few-shot learning on 3D volumes.

* :class:`ConvEncoder3D`: the "Conv-4" encoder of the few-shot literature in 3D: blocks of conv-norm-ReLU-maxpool
  followed by global average pooling, giving a ``[B, features[-1]]`` vector. CPU-friendly on 32^3 patches.
* :class:`FewShotClassifier`: ``encoder`` + linear ``head``. ANIL adapts ``head`` only, ProtoNet uses ``encoder`` only.
* :func:`monai_backbone`: turns MONAI's 3D ResNets and DenseNets into feature extractors.

Normalisation: the default of :class:`ConvEncoder3D` is GroupNorm, which keeps no running statistics and normalises
each sample on its own, so a network behaves the same on every task, batch size and inner-loop step. BatchNorm (an
option here, and the default of MONAI's ResNet/DenseNet) is handled by the learners through
:func:`~monai_metalearn.networks.batch_norm_mode`: per-task batch statistics ("transductive", the default) or stored
running statistics ("frozen"); running statistics are never updated inside inner loops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ConvEncoder3D", "FewShotClassifier", "monai_backbone", "replace_batch_norm", "MONAI_BACKBONES"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_BATCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_GAP = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}

NORMS = ("group", "instance", "batch", "none")


def _norm_layer(norm: str, channels: int, spatial_dims: int, num_groups: int) -> nn.Module:
    if norm == "group":
        return nn.GroupNorm(math.gcd(num_groups, channels), channels)
    if norm == "instance":
        return _INSTANCE[spatial_dims](channels, affine=True)
    if norm == "batch":
        return _BATCH[spatial_dims](channels)
    return nn.Identity()


class ConvEncoder3D(nn.Module):
    """Small convolutional encoder: ``len(features)`` blocks of conv3x3-norm-ReLU-maxpool2, then average pooling to
    ``pooled_size`` voxels per axis, flattened.

    Pooling uses ``ceil_mode`` so inputs as small as 8^3 work with four blocks.
    ``norm="instance"`` needs more than one voxel per channel at the last block (e.g. 16^3 or more for four blocks).

    Args:
        in_channels: input channels.
        features: output channels of each block; the feature vector has ``features[-1]`` entries.
        norm: ``"group"`` (default, batch-independent), ``"instance"``, ``"batch"`` or ``"none"``.
        spatial_dims: 3 for volumes (2 and 1 work too).
        num_groups: the most GroupNorm groups per layer (the gcd with the channel count is used).
        pooled_size: voxels per axis kept by the final adaptive average pooling; the feature vector has
            ``features[-1] * pooled_size ** spatial_dims`` entries. ``1`` is global average pooling. After a
            per-sample normalisation (group / instance norm) and ReLU, a global average is nearly the same for every
            input at initialisation, which starves head-only adaptation (ANIL, fine-tuning) of signal; ``2`` keeps
            the coarse layout (front/back, left/right, top/bottom of the patch), like the flattened 5x5 map of the
            classic 4-block few-shot backbone.

    Raises:
        ValueError: for an empty or non-positive ``features``, an unknown ``norm`` or ``spatial_dims``.

    Example::

        enc = ConvEncoder3D(in_channels=1, features=(32, 64, 128, 256))
        f = enc(torch.randn(2, 1, 32, 32, 32))  # [2, 256]
    """

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256),
        norm: str = "group",
        spatial_dims: int = 3,
        num_groups: int = 8,
        pooled_size: int = 1,
    ) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        if pooled_size < 1:
            raise ValueError(f"pooled_size must be >= 1, got {pooled_size}")
        if not features or min(features) < 1:
            raise ValueError(f"features must be a non-empty sequence of positive ints, got {features}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        self.in_channels = in_channels
        self.features = features
        self.norm = norm
        self.spatial_dims = spatial_dims
        self.pooled_size = int(pooled_size)
        self.out_features = features[-1] * self.pooled_size**spatial_dims
        blocks = []
        ch = in_channels
        for out in features:
            blocks.append(
                nn.Sequential(
                    _CONV[spatial_dims](ch, out, kernel_size=3, padding=1, bias=norm == "none"),
                    _norm_layer(norm, out, spatial_dims, num_groups),
                    nn.ReLU(),
                    _POOL[spatial_dims](kernel_size=2, stride=2, ceil_mode=True),
                )
            )
            ch = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = _GAP[spatial_dims](self.pooled_size)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, C, *spatial]`` to ``[B, features[-1]]``."""
        return torch.flatten(self.pool(self.blocks(x)), 1)


class FewShotClassifier(nn.Module):
    """An encoder followed by a linear head: ``logits = head(encoder(x))``.

    Args:
        encoder: maps ``[B, C, D, H, W]`` to ``[B, feature_dim]``.
        feature_dim: the encoder's output size.
        n_way: number of classes per task (the head's output size).
        zero_init_head: initialise the head's weight and bias to zero (default). Episode labels are random
            permutations of the classes, so a class-specific initial head is only noise for MAML-style learners;
            a zero head predicts uniformly before adaptation (Ye & Chao, "How to train your MAML to excel in few-shot
            classification", 2022). ``False`` keeps PyTorch's default initialisation.

    Raises:
        ValueError: if ``feature_dim`` or ``n_way`` is not positive.

    Example::

        model = FewShotClassifier(ConvEncoder3D(features=(16, 32)), feature_dim=32, n_way=5)
        logits = model(torch.randn(10, 1, 16, 16, 16))  # [10, 5]
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, n_way: int, zero_init_head: bool = True) -> None:
        super().__init__()
        if feature_dim < 1 or n_way < 1:
            raise ValueError(f"feature_dim and n_way must be >= 1, got {feature_dim}, {n_way}")
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, n_way)
        if zero_init_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.feature_dim = feature_dim
        self.n_way = n_way

    def features(self, x: Tensor) -> Tensor:
        """The encoder's ``[B, feature_dim]`` features."""
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``[B, n_way]`` logits."""
        return self.head(self.encoder(x))


def replace_batch_norm(module: nn.Module, norm: str = "group", num_groups: int = 8) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` (in place) by GroupNorm or InstanceNorm with affine parameters.

    Useful for MONAI networks whose ``norm`` argument does not reach every layer (MONAI 1.6.1's ResNet applies it to
    the stem only) and for meta-learning without batch statistics.

    Args:
        module: the network (modified in place and returned).
        norm: ``"group"`` (``GroupNorm(gcd(num_groups, C), C)``) or ``"instance"`` (``InstanceNorm(C, affine=True)``).
        num_groups: the most GroupNorm groups.

    Raises:
        ValueError: for another ``norm``.

    Example::

        encoder = replace_batch_norm(monai_backbone("resnet10")[0], "group")
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    if norm not in ("group", "instance"):
        raise ValueError(f"norm must be 'group' or 'instance', got {norm!r}")
    for name, child in list(module.named_children()):
        if isinstance(child, _BatchNorm):
            channels = child.num_features
            if norm == "group":
                new: nn.Module = nn.GroupNorm(math.gcd(num_groups, channels), channels)
            else:
                dims = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2}.get(type(child), 3)
                new = _INSTANCE[dims](channels, affine=True)
            ref = next(child.parameters(), None)
            if ref is not None:
                new = new.to(device=ref.device, dtype=ref.dtype)
            setattr(module, name, new)
        else:
            replace_batch_norm(child, norm, num_groups)
    return module


MONAI_BACKBONES = (
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet200",
    "densenet121",
    "densenet169",
    "densenet201",
    "densenet264",
)

_DENSENETS = {
    "densenet121": "DenseNet121",
    "densenet169": "DenseNet169",
    "densenet201": "DenseNet201",
    "densenet264": "DenseNet264",
}


def monai_backbone(
    name: str, in_channels: int = 1, spatial_dims: int = 3, norm: str = "batch", **kwargs: Any
) -> tuple[nn.Module, int]:
    """Build a MONAI classification network as a feature extractor ``[B, C, D, H, W] -> [B, feature_dim]``.

    * ResNets (``resnet10`` ... ``resnet200``) are built with ``feed_forward=False``: MONAI then drops the final
      ``fc`` and returns the globally average-pooled features (512 for resnet10/18/34, 2048 for resnet50+).
    * DenseNets (``densenet121`` ... ``densenet264``) keep their ``class_layers`` (ReLU, global average pool, flatten)
      with the final linear layer replaced by ``nn.Identity`` (1024 features for densenet121).

    Both use BatchNorm by default (see the module docstring for how learners treat it); ``norm="group"`` or
    ``"instance"`` replaces every BatchNorm layer after construction (:func:`replace_batch_norm`; MONAI 1.6.1's ResNet
    ``norm`` argument only reaches its stem). No pretrained weights are downloaded; load your own state dict into the
    returned encoder (before choosing a non-batch ``norm``, if the weights have BatchNorm statistics).

    Args:
        name: one of :data:`MONAI_BACKBONES` (case-insensitive).
        in_channels: input channels.
        spatial_dims: spatial dimensions (3 for volumes).
        norm: ``"batch"`` (MONAI's default), ``"group"`` or ``"instance"``.
        kwargs: forwarded to the MONAI constructor (e.g. ``widen_factor``, ``conv1_t_stride``, ``growth_rate``).

    Returns:
        ``(encoder, feature_dim)``.

    Raises:
        ValueError: for an unknown ``name`` or ``norm``.

    Example::

        encoder, dim = monai_backbone("resnet10", in_channels=1)
        model = FewShotClassifier(encoder, dim, n_way=3)
    """
    from monai.networks import nets

    key = name.lower()
    if norm not in ("batch", "group", "instance"):
        raise ValueError(f"norm must be 'batch', 'group' or 'instance', got {norm!r}")
    net: nn.Module
    if key.startswith("resnet") and key in MONAI_BACKBONES:
        kwargs.setdefault("feed_forward", False)
        if kwargs["feed_forward"]:
            raise ValueError("monai_backbone builds feature extractors: feed_forward must be False")
        net = getattr(nets, key)(spatial_dims=spatial_dims, n_input_channels=in_channels, **kwargs)
        feature_dim = int(net.in_planes)
    elif key in _DENSENETS:
        net = getattr(nets, _DENSENETS[key])(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1, **kwargs
        )
        feature_dim = int(net.class_layers.out.in_features)
        net.class_layers.out = nn.Identity()
    else:
        raise ValueError(f"unknown MONAI backbone {name!r}; choose one of {MONAI_BACKBONES}")
    if norm != "batch":
        replace_batch_norm(net, norm)
    return net, feature_dim
