"""Matching Networks: the attention by hand on a tiny example, full-context embeddings, the factory, the error on
bad labels, and learning on real BTCV organ patches (support and query from different subjects)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from monai_metalearn.learners import MatchingNet, accuracy, create_learner, matching_log_probs
from monai_metalearn.networks import ConvEncoder3D


class Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def test_attention_matches_a_hand_computation():
    # support: (1, 0) class 0, (0, 1) class 1, (1, 1) class 1; query (2, 1); scale 1
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    q = torch.tensor([[2.0, 1.0]])
    cos = [2 / math.sqrt(5), 1 / math.sqrt(5), 3 / math.sqrt(10)]
    e = [math.exp(c) for c in cos]
    p0 = e[0] / sum(e)
    p1 = (e[1] + e[2]) / sum(e)
    log_p = matching_log_probs(q, s, y, 2, scale=1.0)
    assert torch.allclose(log_p.exp(), torch.tensor([[p0, p1]]), atol=1e-6)
    # the learner with a flattening encoder gives the same, and its predictor's softmax is p
    learner = MatchingNet(Flatten(), scale=1.0)
    probs = learner.adapt(s.view(3, 1, 1, 1, 2), y)(q.view(1, 1, 1, 1, 2)).softmax(1)
    assert torch.allclose(probs, torch.tensor([[p0, p1]]), atol=1e-6)
    with pytest.raises(ValueError, match="without support samples"):
        matching_log_probs(q, s[:1], y[:1], 2)


def test_separated_clusters_are_classified_perfectly():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 4) * 5 + 1
    def draw(m):
        yy = torch.arange(3).repeat_interleave(m)
        return (centres[yy] + 0.05 * torch.randn(len(yy), 4, generator=gen)).view(len(yy), 1, 1, 1, 4), yy
    sx, sy = draw(2)
    qx, qy = draw(5)
    learner = MatchingNet(Flatten())
    assert accuracy(learner.adapt(sx, sy)(qx), qy) == 1.0
    loss, metrics = learner.meta_loss(sx, sy, qx, qy)
    assert metrics["accuracy"] == 1.0 and float(loss) < 0.5


@pytest.mark.parametrize("fce", [False, True])
def test_gradients_reach_the_encoder_and_the_context_lstms(fce):
    torch.manual_seed(0)
    learner = MatchingNet(ConvEncoder3D(features=(4, 8)), fce=fce, feature_dim=8)
    sx, qx = torch.randn(6, 1, 8, 8, 8), torch.randn(6, 1, 8, 8, 8)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    loss, _ = learner.meta_loss(sx, y, qx, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in learner.encoder.parameters())
    if fce:
        grads = [p.grad for p in learner.context.parameters()]
        assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    else:
        assert learner.context is None
    with pytest.raises(ValueError, match="feature_dim"):
        MatchingNet(Flatten(), fce=True)  # no out_features to take the size from


def test_factory_and_bad_labels():
    learner = create_learner("matching", ConvEncoder3D(features=(4, 8)), feature_dim=8, n_way=3, fce=True)
    assert isinstance(learner, MatchingNet) and learner.context is not None
    with pytest.raises(ValueError, match="integer class labels"):
        learner.adapt(torch.randn(2, 1, 8, 8, 8), torch.randn(2, 1, 8, 8, 8))


def test_learns_on_real_organ_patches(data_dir):
    from monai.data import Dataset

    from monai_metalearn.data import ClassificationEpisodeDataset, build_structure_patches, load_datalist
    from monai_metalearn.data import patch_transforms

    organs = ["liver", "spleen", "kidney_left", "stomach", "aorta"]
    subjects = load_datalist("btcv_sabs", data_dir)[:4]
    patches = build_structure_patches(subjects, organs, pixdim=(4, 4, 4), n_views=4, progress=False)
    data = Dataset(patches, transform=patch_transforms(spatial_size=(24, 24, 24)))
    train = ClassificationEpisodeDataset(data, 5, 1, 3, num_episodes=30, cross_subject=True, seed=0)
    test = ClassificationEpisodeDataset(data, 5, 1, 3, num_episodes=8, cross_subject=True, seed=99)
    torch.manual_seed(0)
    learner = MatchingNet(ConvEncoder3D(features=(8, 16, 32), pooled_size=1))
    opt = torch.optim.Adam(learner.parameters(), 3e-3)

    def test_loss():
        with torch.no_grad():
            out = [learner.meta_loss(e["support_image"], e["support_label"], e["query_image"], e["query_label"])[1]
                   for e in (test[i] for i in range(len(test)))]
        return sum(o["loss"] for o in out) / len(out), sum(o["accuracy"] for o in out) / len(out)

    before = test_loss()
    for i in range(len(train)):
        e = train[i]
        opt.zero_grad()
        loss, _ = learner.meta_loss(e["support_image"], e["support_label"], e["query_image"], e["query_label"])
        loss.backward()
        opt.step()
    after = test_loss()
    assert after[0] < before[0] - 0.1, (before, after)  # the query NLL on other subjects' episodes falls
    assert after[1] > 0.3, after  # above chance (0.2) across subjects
