"""Every learner on a device under autocast: CPU (bfloat16) everywhere, CUDA (float16 + GradScaler) when present."""

from __future__ import annotations

import pytest
import torch

from monai_metalearn.learners import ANIL, FOMAML, MAML, FineTuneBaseline, MetaSGD, ProtoNet, Reptile
from monai_metalearn.networks import ConvEncoder3D, FewShotClassifier

from .synthetic import random_episode

LEARNERS = {
    "maml": lambda m: MAML(m, inner_lr=0.1, inner_steps=2),
    "fomaml": lambda m: FOMAML(m, inner_lr=0.1, inner_steps=2),
    "anil": lambda m: ANIL(m, inner_lr=0.1, inner_steps=2),
    "metasgd": lambda m: MetaSGD(m, inner_lr=0.1, inner_steps=2),
    "reptile": lambda m: Reptile(m, inner_lr=0.1, inner_steps=2, outer_update="optimizer"),
    "protonet": lambda m: ProtoNet(m.encoder),
    "finetune": lambda m: FineTuneBaseline(m.encoder, 8, 4, finetune_steps=5),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_learner_on_device_with_autocast(name, device):
    torch.manual_seed(0)
    model = FewShotClassifier(ConvEncoder3D(features=(4, 8)), 8, 3, zero_init_head=False)
    learner = LEARNERS[name](model).to(device)
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if device == "cuda" else None
    sx, sy, qx, qy = (t.to(device) for t in random_episode(size=8))
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.01)
    before = [p.detach().clone() for p in learner.parameters()]
    with torch.autocast(device, dtype=dtype):
        if name == "finetune":
            metrics = learner.pretrain_step(torch.cat([sx, qx]), torch.cat([sy, qy]) % 4, optimizer, scaler)
        else:
            metrics = learner.outer_step(sx, sy, qx, qy, optimizer, scaler)
        logits = learner.adapt(sx, sy)(qx)
    assert all(isinstance(v, float) and v == v for v in metrics.values()), metrics
    assert logits.shape == (6, 3) and logits.device.type == device and torch.isfinite(logits).all()
    assert all(p.device.type == device for p in learner.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(learner.parameters(), before))
