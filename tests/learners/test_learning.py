"""Every learner learns a small synthetic family of 3D tasks (3-way 2-shot, 8^3 volumes) in a few dozen steps.

Test episodes use classes never seen in meta-training, with randomly permuted labels: without adaptation a learner is at
chance (1/3). Meta-learners train on meta-batches of 2 tasks (``meta_batch_step``); the settings pass for seeds 0-4.
"""

from __future__ import annotations

import pytest
import torch

from monai_metalearn.learners import (
    ANIL, FOMAML, MAML, FineTuneBaseline, MatchingNet, MetaSGD, ProtoNet, Reptile, accuracy,
)
from monai_metalearn.networks import ConvEncoder3D, FewShotClassifier

from .synthetic import TaskFamily

STEPS = 40
TASKS = 2
LEARNERS = {
    # name: (factory(model) -> learner, outer lr (None: Reptile's own update))
    "maml": (lambda m: MAML(m, inner_lr=0.1, inner_steps=2), 3e-3),
    "fomaml": (lambda m: FOMAML(m, inner_lr=0.03, inner_steps=5), 3e-3),
    "anil": (lambda m: ANIL(m, inner_lr=0.1, inner_steps=1), 3e-3),
    "metasgd": (lambda m: MetaSGD(m, inner_lr=0.1, inner_steps=1), 3e-3),
    "reptile": (lambda m: Reptile(m, inner_lr=0.05, inner_steps=5, epsilon=0.5), None),
    "protonet": (lambda m: ProtoNet(m.encoder), 1e-2),
    "matching": (lambda m: MatchingNet(m.encoder), 1e-2),
    "matching_fce": (lambda m: MatchingNet(m.encoder, fce=True, feature_dim=32), 1e-2),
    "finetune": (lambda m: FineTuneBaseline(m.encoder, 32, 16, finetune_steps=50, finetune_lr=0.05), 1e-2),
}


def _test_accuracy(learner, family: TaskFamily, n: int = 30) -> float:
    accs = []
    for _ in range(n):
        sx, sy, qx, qy = family.episode(train=False)
        accs.append(accuracy(learner.adapt(sx, sy)(qx), qy))
    return sum(accs) / n


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_learner_learns_synthetic_tasks(name):
    factory, lr = LEARNERS[name]
    torch.manual_seed(0)
    family = TaskFamily(seed=0)
    learner = factory(FewShotClassifier(ConvEncoder3D(features=(8, 16, 32)), 32, 3))
    optimizer = torch.optim.Adam(learner.parameters(), lr) if lr else None
    before = _test_accuracy(learner, family)
    losses = []
    for _ in range(STEPS):
        if name == "finetune":
            metrics = learner.pretrain_step(*family.flat_batch(), optimizer)
        else:
            metrics = learner.meta_batch_step([family.episode() for _ in range(TASKS)], optimizer)
        assert all(isinstance(v, float) for v in metrics.values())
        losses.append(metrics["loss"])
    after = _test_accuracy(learner, family)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.1, f"meta-loss should fall: {first:.3f} -> {last:.3f}"
    assert after >= 0.7, f"query accuracy on unseen classes {after:.2f} (chance 0.33; before training {before:.2f})"
    assert 1 - after <= 0.6 * (1 - before), f"test error should drop by 40%: accuracy {before:.2f} -> {after:.2f}"
