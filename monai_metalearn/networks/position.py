"""Where a patch lies in the body, as features: the mean and range of its body-frame coordinate channels
(:class:`~monai_metalearn.transforms.BodyCoordinates`), and an encoder wrapper that appends them to the learned
embedding so that a few-shot learner can weigh anatomy's layout against the image."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["body_position_features", "BodyPositionEncoder"]


def body_position_features(x: Tensor, first: int = 1, use_extent: bool = True) -> Tensor:
    """``[B, 6]`` (``[B, 3]`` without ``use_extent``): the mean of each of the three coordinate channels
    ``x[:, first:first + 3]`` (the patch's centre in the body frame) and their ranges (its size relative to the body).

    Raises:
        ValueError: ``x`` has no such channels (patches built without ``body_coordinates=True``).
    """
    if x.ndim < 3 or x.shape[1] < first + 3:
        raise ValueError(
            f"patches of shape {tuple(x.shape)} have no body-frame coordinate channels {first}..{first + 2}: build "
            "them with patch_transforms(body_coordinates=True)"
        )
    c = x[:, first : first + 3].float().flatten(2)
    centre = c.mean(-1)
    if not use_extent:
        return centre
    return torch.cat([centre, c.amax(-1) - c.amin(-1)], 1)


class BodyPositionEncoder(nn.Module):
    """``cat([encoder(x), scale * body_position_features(x)])``: a learned embedding plus the patch's place in the
    body, with a learnable weight (``scale``, kept positive as ``exp(log_scale)``).

    The coordinate channels reach the encoder too, but a convolutional encoder meta-trained on one modality's
    intensities need not keep them; appended explicitly, the position survives a change of modality (CT support, MR
    query) and meta-training decides how much it counts against the image.

    Args:
        encoder: maps ``[B, C, *S]`` to ``[B, encoder.out_features]`` (e.g. :class:`ConvEncoder3D` with
            ``in_channels=4``).
        first: index of the first coordinate channel.
        use_extent: also append the ranges (six numbers instead of three).
        scale: initial weight of the position features.
        learn_scale: meta-train the weight.

    Example::

        enc = BodyPositionEncoder(ConvEncoder3D(in_channels=4, features=(16, 32)))
        f = enc(patches)  # [B, enc.out_features]; patches: [B, 4, *S] from patch_transforms(body_coordinates=True)
    """

    def __init__(self, encoder: nn.Module, first: int = 1, use_extent: bool = True, scale: float = 10.0,
                 learn_scale: bool = True) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if not hasattr(encoder, "out_features"):
            raise ValueError(f"encoder {type(encoder).__name__} has no out_features")
        self.encoder, self.first, self.use_extent = encoder, int(first), bool(use_extent)
        log_scale = torch.tensor(math.log(scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.out_features = int(encoder.out_features) + (6 if self.use_extent else 3)

    def forward(self, x: Tensor) -> Tensor:
        position = body_position_features(x, self.first, self.use_extent).to(x.dtype)
        return torch.cat([self.encoder(x), self.log_scale.exp().to(x.dtype) * position], 1)
