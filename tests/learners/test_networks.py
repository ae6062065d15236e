"""Encoders, heads and MONAI backbone adapters: output shapes and options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monai_metalearn.networks import ConvEncoder3D, CosineClassifier, FewShotClassifier, monai_backbone


@pytest.mark.parametrize("norm", ["group", "instance", "batch", "none"])
def test_conv_encoder_shapes(norm):
    torch.manual_seed(0)
    enc = ConvEncoder3D(in_channels=2, features=(4, 8, 8, 16), norm=norm)
    assert enc(torch.randn(2, 2, 32, 32, 32)).shape == (2, 16)
    if norm != "instance":  # instance norm needs > 1 voxel at the last block
        assert enc(torch.randn(3, 2, 8, 8, 8)).shape == (3, 16)
    assert enc.out_features == 16


def test_default_conv_encoder_on_32_cube():
    torch.manual_seed(0)
    enc = ConvEncoder3D()
    assert enc.features == (32, 64, 128, 256)
    assert isinstance(enc.blocks[0][1], nn.GroupNorm)
    with torch.no_grad():
        assert enc(torch.randn(1, 1, 32, 32, 32)).shape == (1, 256)


def test_conv_encoder_bad_arguments():
    for kwargs in ({"features": ()}, {"norm": "layer"}, {"spatial_dims": 4}, {"features": (4, 0)}):
        with pytest.raises(ValueError):
            ConvEncoder3D(**kwargs)


def test_conv_encoder_2d():
    assert ConvEncoder3D(features=(4, 8), spatial_dims=2)(torch.randn(2, 1, 16, 16)).shape == (2, 8)


def test_few_shot_classifier_and_zero_head():
    torch.manual_seed(0)
    enc = ConvEncoder3D(features=(4, 8))
    model = FewShotClassifier(enc, 8, n_way=5)
    x = torch.randn(3, 1, 8, 8, 8)
    assert model(x).shape == (3, 5)
    assert model.encoder is enc and isinstance(model.head, nn.Linear)
    assert torch.equal(model(x), torch.zeros(3, 5))
    rand = FewShotClassifier(enc, 8, n_way=5, zero_init_head=False)
    torch.testing.assert_close(rand(x), rand.head(rand.features(x)))
    assert rand.head.weight.abs().sum() > 0


def test_cosine_classifier():
    torch.manual_seed(0)
    head = CosineClassifier(6, 4, scale=3.0)
    x = torch.randn(5, 6)
    expected = 3.0 * F.cosine_similarity(x[:, None], head.weight[None], dim=-1)
    torch.testing.assert_close(head(x), expected)
    assert "scale" not in dict(head.named_parameters())
    assert "scale" in dict(CosineClassifier(6, 4, learn_scale=True).named_parameters())


@pytest.mark.parametrize("name, dim", [("resnet10", 512), ("resnet18", 512), ("densenet121", 1024)])
def test_monai_backbones_are_feature_extractors(name, dim):
    torch.manual_seed(0)
    encoder, feature_dim = monai_backbone(name, in_channels=2)
    assert feature_dim == dim
    encoder.eval()
    with torch.no_grad():
        assert encoder(torch.randn(2, 2, 32, 32, 32)).shape == (2, dim)
    model = FewShotClassifier(encoder, feature_dim, 3)
    with torch.no_grad():
        assert model(torch.randn(2, 2, 32, 32, 32)).shape == (2, 3)


def test_monai_backbone_kwargs_and_errors():
    n_bn = sum(isinstance(m, nn.BatchNorm3d) for m in monai_backbone("resnet10", widen_factor=0.25)[0].modules())
    assert n_bn == 12  # stem + 2 per block (4 blocks) + 3 downsamples
    for norm, cls in (("group", nn.GroupNorm), ("instance", nn.InstanceNorm3d)):
        encoder, dim = monai_backbone("resnet10", norm=norm, widen_factor=0.25)
        assert dim == 128
        assert not any(isinstance(m, nn.BatchNorm3d) for m in encoder.modules())
        assert sum(isinstance(m, cls) for m in encoder.modules()) == n_bn
        assert encoder(torch.randn(2, 1, 32, 32, 32)).shape == (2, 128)
    with pytest.raises(ValueError, match="norm"):
        monai_backbone("resnet10", norm="layer")
    with pytest.raises(ValueError, match="unknown MONAI backbone"):
        monai_backbone("vit")
    with pytest.raises(ValueError, match="feed_forward"):
        monai_backbone("resnet10", feed_forward=True)


def test_conv_encoder_pooled_size_keeps_layout():
    import torch

    from monai_metalearn.networks import ConvEncoder3D

    torch.manual_seed(0)
    enc = ConvEncoder3D(1, (4, 8), pooled_size=2)
    assert enc.out_features == 8 * 2**3
    x = torch.zeros(1, 1, 16, 16, 16)
    x[..., :8] = 1.0  # bright on one side only
    f = enc(x)
    assert f.shape == (1, 64)
    cells = f.view(1, 8, 2, 2, 2)  # channels x (D, H, W) cells; the bright half is W index 0
    assert not torch.allclose(cells[..., 0], cells[..., 1], atol=1e-3)
    gap = ConvEncoder3D(1, (4, 8), pooled_size=1)
    gap.load_state_dict(enc.state_dict())
    assert torch.allclose(f.view(1, 8, 8).mean(-1), gap(x), atol=1e-5)  # same weights: GAP = mean of the cells
    with pytest.raises(ValueError, match="pooled_size"):
        ConvEncoder3D(1, (4,), pooled_size=0)
