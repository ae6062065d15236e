"""BodyPositionEncoder: the learned embedding plus the patch's place in the body, by hand, and meta-trained."""

import math

import pytest
import torch

from monai_metalearn.learners import ProtoNet
from monai_metalearn.networks import BodyPositionEncoder, ConvEncoder3D, body_position_features


def _patches(centres):
    """Patches whose 3 coordinate channels span [c - 0.1, c + 0.1] along x (and a constant y, z)."""
    out = []
    for cx in centres:
        x = torch.zeros(4, 4, 4, 4)
        x[0] = torch.randn(4, 4, 4)
        x[1] = torch.linspace(cx - 0.1, cx + 0.1, 4)[:, None, None]
        x[2], x[3] = 0.2, -0.3
        out.append(x)
    return torch.stack(out)


def test_features_and_concatenation_by_hand():
    torch.manual_seed(0)
    x = _patches([0.5, -0.5])
    f = body_position_features(x)
    assert f[0].tolist() == pytest.approx([0.5, 0.2, -0.3, 0.2, 0.0, 0.0], abs=1e-6)
    enc = ConvEncoder3D(in_channels=4, features=(4, 8))
    wrapped = BodyPositionEncoder(enc, scale=3.0)
    assert wrapped.out_features == enc.out_features + 6
    out = wrapped(x)
    assert torch.allclose(out[:, : enc.out_features], enc(x))
    assert torch.allclose(out[:, enc.out_features :], 3.0 * f, atol=1e-6)
    assert BodyPositionEncoder(enc, use_extent=False).out_features == enc.out_features + 3
    with pytest.raises(ValueError, match="body_coordinates=True"):
        wrapped(torch.zeros(2, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="scale must be > 0"):
        BodyPositionEncoder(enc, scale=0.0)


def test_the_weight_is_meta_trained_and_positions_separate_classes():
    """Two classes that differ only in where they lie: a ProtoNet on the wrapped encoder tells them apart and its
    meta-gradient reaches the position weight."""
    torch.manual_seed(0)
    learner = ProtoNet(BodyPositionEncoder(ConvEncoder3D(in_channels=4, features=(4, 8)), scale=1.0))
    sx, sy = _patches([0.6, 0.6, -0.6, -0.6]), torch.tensor([0, 0, 1, 1])
    qx, qy = _patches([0.6, -0.6, 0.6]), torch.tensor([0, 1, 0])
    loss, _ = learner.meta_loss(sx, sy, qx, qy)
    loss.backward()
    assert learner.encoder.log_scale.grad is not None and learner.encoder.log_scale.grad.abs() > 0
    with torch.no_grad():
        learner.encoder.log_scale.fill_(math.log(50.0))
        pred = learner.adapt(sx, sy)(qx).argmax(1)
    assert pred.tolist() == qy.tolist()
