"""Fake episodes and tiny learners that follow the learner contract, for the engine tests.

Episodes: ``N``-way ``K``-shot ``Q``-query over a pool of classes; every class has a fixed mean pattern in the first
``SIGNAL`` voxels of a ``1 x 4 x 4 x 4`` volume, and strong noise everywhere else, so that a learned encoder that
down-weights the noisy voxels beats a random one. Episode ``i`` is a function of ``(seed, i)`` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SHAPE = (1, 4, 4, 4)
DIM = 64
SIGNAL = 8
POOL = 8
CLASS_NAMES = [f"class{c}" for c in range(POOL)]


def class_means(seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(POOL, DIM)
    means[:, :SIGNAL] = torch.randn(POOL, SIGNAL, generator=g).sign() * 1.0
    return means


_MEANS = class_means()


def make_episode(index: int, n_way: int = 3, k_shot: int = 2, q_query: int = 4, seed: int = 0) -> dict[str, Any]:
    """One classification episode dict (the lead's format) as a deterministic function of ``(seed, index)``."""
    g = torch.Generator().manual_seed(10_000 * seed + index)
    classes = torch.randperm(POOL, generator=g)[:n_way].tolist()

    def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n_way).repeat_interleave(per_class)
        noise = torch.randn(len(labels), DIM, generator=g)
        noise[:, SIGNAL:] *= 2.5
        noise[:, :SIGNAL] *= 0.6
        x = _MEANS[torch.tensor(classes)][labels] + noise
        return x.reshape(len(labels), *SHAPE), labels

    sx, sy = draw(k_shot)
    qx, qy = draw(q_query)
    return {
        "support_image": sx,
        "support_label": sy,
        "query_image": qx,
        "query_label": qy,
        "classes": [CLASS_NAMES[c] for c in classes],
        "support_subject": [f"s{index}_{i}" for i in range(len(sy))],
        "query_subject": [f"q{index}_{i}" for i in range(len(qy))],
        "episode": index,
    }


class EpisodeList:
    """A re-iterable loader of deterministic episodes (or meta-batches: lists of ``meta_batch_size`` episodes)."""

    def __init__(self, num: int, seed: int = 0, meta_batch_size: int | None = None, **kwargs: Any) -> None:
        self.num, self.seed, self.meta_batch_size, self.kwargs = num, seed, meta_batch_size, kwargs

    def __len__(self) -> int:
        return self.num

    def __iter__(self):
        for i in range(self.num):
            if self.meta_batch_size is None:
                yield make_episode(i, seed=self.seed, **self.kwargs)
            else:
                m = self.meta_batch_size
                yield [make_episode(i * m + j, seed=self.seed, **self.kwargs) for j in range(m)]


def _n_way(y: torch.Tensor) -> int:
    return int(y.max()) + 1


class _ContractMixin:
    """``outer_step`` / ``meta_batch_step`` defaults as in the contract (zero_grad, meta-loss, backward, step)."""

    def outer_step(self, sx, sy, qx, qy, optimizer, scaler=None) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        loss, stats = self.meta_loss(sx, sy, qx, qy)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return stats

    def meta_batch_step(self, episodes: Sequence, optimizer, scaler=None) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        all_stats = []
        for ep in episodes:
            loss, stats = self.meta_loss(*ep)
            loss = loss / len(episodes)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            all_stats.append(stats)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.meta_batch_calls = getattr(self, "meta_batch_calls", 0) + 1
        return {k: sum(s[k] for s in all_stats) / len(all_stats) for k in all_stats[0]}


class TinyProtoNet(_ContractMixin, nn.Module):
    """Prototypical network on a linear embedding of the flattened volume."""

    def __init__(self, emb: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Linear(DIM, emb)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.flatten(1))

    def _logits(self, protos: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x)
        return -((z[:, None, :] - protos[None]) ** 2).sum(-1)

    def _protos(self, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
        z = self.embed(sx)
        return torch.stack([z[sy == c].mean(0) for c in range(_n_way(sy))])

    def meta_loss(self, sx, sy, qx, qy):
        logits = self._logits(self._protos(sx, sy), qx).float()
        loss = F.cross_entropy(logits, qy)
        return loss, {"loss": float(loss.detach()), "accuracy": float((logits.argmax(1) == qy).float().mean())}

    def adapt(self, sx, sy):
        protos = self._protos(sx, sy).detach()
        return lambda x: self._logits(protos, x)


class TinyMAML(_ContractMixin, nn.Module):
    """MAML on a linear ``N``-way classifier of the flattened volume (``first_order`` drops second derivatives)."""

    def __init__(self, n_way: int = 3, inner_lr: float = 0.5, inner_steps: int = 1, first_order: bool = False):
        super().__init__()
        self.head = nn.Linear(DIM, n_way)
        self.inner_lr, self.inner_steps, self.first_order = inner_lr, inner_steps, first_order
        self.grad_enabled_in_adapt: list[bool] = []

    def _fast(self, sx, sy, create_graph: bool):
        w, b = self.head.weight, self.head.bias
        for _ in range(self.inner_steps):
            loss = F.cross_entropy(F.linear(sx.flatten(1), w, b).float(), sy)
            gw, gb = torch.autograd.grad(loss, (w, b), create_graph=create_graph)
            w, b = w - self.inner_lr * gw, b - self.inner_lr * gb
        return w, b

    def meta_loss(self, sx, sy, qx, qy):
        w, b = self._fast(sx, sy, create_graph=not self.first_order)
        logits = F.linear(qx.flatten(1), w, b).float()
        loss = F.cross_entropy(logits, qy)
        return loss, {"loss": float(loss.detach()), "accuracy": float((logits.argmax(1) == qy).float().mean())}

    def adapt(self, sx, sy):
        self.grad_enabled_in_adapt.append(torch.is_grad_enabled())
        w, b = self._fast(sx, sy, create_graph=False)
        w, b = w.detach(), b.detach()
        return lambda x: F.linear(x.flatten(1), w, b)


class InPlaceFineTuner(_ContractMixin, nn.Module):
    """A (badly behaved) baseline whose ``adapt`` fine-tunes its own weights in place and moves a BN buffer."""

    def __init__(self, n_way: int = 3) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(DIM)
        self.head = nn.Linear(DIM, n_way)

    def forward(self, x):
        return self.head(self.norm(x.flatten(1)))

    def meta_loss(self, sx, sy, qx, qy):
        logits = self(qx)
        loss = F.cross_entropy(logits, qy)
        return loss, {"loss": float(loss.detach()), "accuracy": float((logits.argmax(1) == qy).float().mean())}

    def adapt(self, sx, sy):
        self.norm.train()
        opt = torch.optim.SGD(self.parameters(), lr=0.5)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(self(sx), sy).backward()
            opt.step()
        return self


class OracleLearner(_ContractMixin, nn.Module):
    """Predicts fixed labels for the query (``predictions[episode_position]``), to hand-check per-class scores."""

    def __init__(self, predictions: torch.Tensor, n_way: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.predictions, self.n_way = predictions, n_way

    def adapt(self, sx, sy):
        def predict(x):
            return F.one_hot(self.predictions[: len(x)], self.n_way).float() * self.scale

        return predict


class ThresholdSegLearner(_ContractMixin, nn.Module):
    """Segmentation learner whose logits ``[B, 2, ...]`` mark voxels above ``threshold`` as foreground."""

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(threshold))

    def adapt(self, sx, sy):
        def predict(x):
            fg = x[:, :1] - self.threshold
            return torch.cat([-fg, fg], 1)

        return predict
