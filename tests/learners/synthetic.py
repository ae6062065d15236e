"""A tiny synthetic family of 3D few-shot classification tasks for the learner tests.

Each class is a template volume made of two Gaussian blobs at random positions with random widths and signs; a sample is
its class template with a random intensity scale plus Gaussian noise. Training and test episodes draw classes from
disjoint pools, and episode labels are a random permutation, so a learner that does not adapt is at chance (1/N).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TaskFamily", "random_episode"]


class TaskFamily:
    """N-way K-shot episodes of blob volumes of side ``size``.

    Args:
        n_classes: classes in the pool (the first ``n_train`` are meta-train classes, the rest meta-test).
        n_train: number of meta-train classes.
        size: side of the cubic volumes.
        noise: standard deviation of the additive noise.
        seed: seed of the class templates and of the episode generator.
    """

    def __init__(
        self, n_classes: int = 24, n_train: int = 16, size: int = 8, noise: float = 0.6, seed: int = 0
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"), -1)
        templates = []
        for _ in range(n_classes):
            vol = torch.zeros(size, size, size)
            for sign in (1.0, -1.0):
                centre = torch.rand(3, generator=gen) * (size - 1)
                sigma = 1.0 + torch.rand(1, generator=gen) * size / 4
                vol += sign * torch.exp(-((grid - centre) ** 2).sum(-1) / (2 * sigma**2))
            templates.append(vol / vol.abs().max())
        self.templates = torch.stack(templates)[:, None]  # [C, 1, S, S, S]
        self.n_train = n_train
        self.noise = noise
        self.gen = torch.Generator().manual_seed(seed + 1)

    def samples(self, classes: Tensor, per_class: int) -> tuple[Tensor, Tensor]:
        """``per_class`` noisy samples of each of ``classes`` (global ids); labels are positions in ``classes``."""
        idx = classes.repeat_interleave(per_class)
        labels = torch.arange(len(classes)).repeat_interleave(per_class)
        scale = 0.8 + 0.4 * torch.rand(len(idx), 1, 1, 1, 1, generator=self.gen)
        noise = torch.randn(len(idx), *self.templates.shape[1:], generator=self.gen)
        x = self.templates[idx] * scale + self.noise * noise
        return x, labels

    def episode(self, n_way: int = 3, k_shot: int = 2, n_query: int = 3, train: bool = True) -> tuple[Tensor, ...]:
        """``(support_x, support_y, query_x, query_y)`` of a random episode from the train or test class pool."""
        lo, hi = (0, self.n_train) if train else (self.n_train, len(self.templates))
        classes = lo + torch.randperm(hi - lo, generator=self.gen)[:n_way]
        sx, sy = self.samples(classes, k_shot)
        qx, qy = self.samples(classes, n_query)
        return sx, sy, qx, qy

    def flat_batch(self, batch_size: int = 12) -> tuple[Tensor, Tensor]:
        """A flat batch of meta-train samples with GLOBAL class ids (for the fine-tuning baseline)."""
        classes = torch.randint(0, self.n_train, (batch_size,), generator=self.gen)
        scale = 0.8 + 0.4 * torch.rand(batch_size, 1, 1, 1, 1, generator=self.gen)
        x = self.templates[classes] * scale + self.noise * torch.randn(
            batch_size, *self.templates.shape[1:], generator=self.gen
        )
        return x, classes


def random_episode(
    n_way: int = 3,
    k_shot: int = 2,
    n_query: int = 2,
    size: int = 4,
    channels: int = 1,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A random episode (no structure) with the given shapes, drawn from the global torch RNG."""
    sx = torch.randn(n_way * k_shot, channels, size, size, size, dtype=dtype)
    qx = torch.randn(n_way * n_query, channels, size, size, size, dtype=dtype)
    return sx, torch.arange(n_way).repeat(k_shot), qx, torch.arange(n_way).repeat_interleave(n_query)
