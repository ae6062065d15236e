"""Classification heads for few-shot learners."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CosineClassifier"]


class CosineClassifier(nn.Module):
    """Cosine-similarity classifier (the Baseline++ head of Chen et al., 2019).

    ``logits[b, c] = scale * cos(x[b], weight[c])``.

    Args:
        in_features: feature dimension.
        out_features: number of classes.
        scale: the temperature multiplying the cosine similarities.
        learn_scale: make ``scale`` a learnable parameter.

    Raises:
        ValueError: if a size is not positive or ``scale`` is not positive.

    Example::

        head = CosineClassifier(256, 5)
        logits = head(torch.randn(4, 256))  # [4, 5]
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 10.0, learn_scale: bool = False) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        """Return ``[B, out_features]`` scaled cosine similarities for features ``x`` of shape ``[B, in_features]``."""
        return self.scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))
