"""The ignore label of meta-training masks (setting 2): ignored voxels take no part in losses, metrics or prototypes."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss

from monai_metalearn.learners import PrototypeSegmenter, SegmentationGlobalLabels, SegmentationLoss, dice_from_logits
from monai_metalearn.learners.segmentation import SegmentationFineTune
from monai_metalearn.transforms import IGNORE_LABEL


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 2, 6, 6, 6, generator=g)
    y = torch.zeros(2, 1, 6, 6, 6)
    y[:, :, 1:3, 1:3, 1:3] = 1
    y[:, :, 4:6, 4:6, :] = IGNORE_LABEL  # a held-out organ inside the training scan
    return logits, y


def test_loss_without_ignored_voxels_is_monai_dicece():
    logits, y = _case()
    y[y < 0] = 0
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits, y)
    assert torch.allclose(SegmentationLoss()(logits, y), expected)


def test_ignored_voxels_do_not_change_the_loss_or_receive_gradient():
    logits, y = _case()
    loss_fn = SegmentationLoss()
    ignored = (y < 0).expand_as(logits)
    changed = logits.clone()
    changed[ignored] = 50.0 * torch.randn(int(ignored.sum()))
    base = loss_fn(logits, y)
    assert torch.allclose(base, loss_fn(changed, y))
    # treating the ignored voxels as background gives another loss: the mask matters
    assert not torch.allclose(base, loss_fn(logits, y.clamp(min=0)))
    leaf = logits.clone().requires_grad_(True)
    loss_fn(leaf, y).backward()
    assert float(leaf.grad[ignored].abs().max()) == 0.0
    assert float(leaf.grad[~ignored].abs().max()) > 0.0


def test_dice_skips_ignored_voxels():
    _, y = _case()
    perfect = torch.cat([1 - y.clamp(min=0), y.clamp(min=0)], dim=1) * 10
    perfect[:, 1][y[:, 0] < 0] = 100.0  # predicting the ignored organ as foreground costs nothing
    assert dice_from_logits(perfect, y) == 1.0
    assert dice_from_logits(perfect, y.clamp(min=0)) < 0.5  # it would, if those voxels were background


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


def test_background_prototype_excludes_ignored_voxels():
    learner = PrototypeSegmenter(_Identity())
    feats = torch.zeros(1, 2, 4, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, 4)
    mask[..., 0, :, :] = 1  # structure: feature (1, 0)
    feats[:, 0, 0] = 1.0
    mask[..., 3, :, :] = IGNORE_LABEL  # ignored organ: feature (0, 5)
    feats[:, 1, 3] = 5.0
    background, foreground = learner.prototypes(feats, mask)
    assert torch.allclose(foreground, torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(background, torch.tensor([[0.0, 0.0]]))  # rows 1-2 only; (0, 5) would show up otherwise
    b_all, _ = learner.prototypes(feats, mask.clamp(min=0))
    assert float(b_all[0, 1]) > 1.0


def test_global_labels_keep_ignored_voxels_and_pretraining_skips_them():
    _, y = _case()
    episode = {"support_image": torch.zeros(2, 1, 6, 6, 6), "support_label": y,
               "query_image": torch.zeros(2, 1, 6, 6, 6), "query_label": y, "structure": "b"}
    sx, sy, _, _ = SegmentationGlobalLabels(["a", "b"])(episode)
    assert set(torch.unique(sy).tolist()) == {IGNORE_LABEL, 0, 2}
    learner = SegmentationFineTune(torch.nn.Conv3d(1, 4, 1), 4, n_base_structures=2)
    assert learner.structure_ids(sy).tolist() == [1, 1]
    x = torch.randn(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(1))
    base, _ = learner.pretrain_loss(x, sy)
    # the 1x1 encoder makes each voxel's logit depend on that voxel only: images that differ on ignored voxels give
    # the same loss, images that differ on one background voxel do not
    on_ignored, on_background = x.clone(), x.clone()
    on_ignored[sy < 0] += 3.0
    on_background[:, :, 0, 0, 0] += 3.0
    assert torch.allclose(base, learner.pretrain_loss(on_ignored, sy)[0])
    assert not torch.allclose(base, learner.pretrain_loss(on_background, sy)[0])
