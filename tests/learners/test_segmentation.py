"""Few-shot segmentation: masked average pooling, prototype segmentation, fine-tuning baselines, the factory, and every
segmentation learner learning a synthetic family of 3D blob-segmentation tasks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceLoss
from torch import nn

from monai_metalearn.learners import (
    AtlasIntensitySegmenter,
    AtlasSelfTrainingSegmenter,
    AtlasSegmenter,
    MultiAtlasSegmenter,
    BoxAlignedReference,
    WholeBodyReference,
    ANIL,
    FOMAML,
    MAML,
    SEGMENTATION_LEARNERS,
    PrototypeSegmenter,
    PrototypeSegPredictor,
    Reptile,
    SegmentationFineTune,
    SegmentationGlobalLabels,
    SegmentationLoss,
    create_segmentation_learner,
    dice_from_logits,
    local_prototypes,
    masked_average_pooling,
    prototype_segmentation_logits,
    segmentation_loss,
)
from monai_metalearn.networks import SegmentationModel, unet_backbone

__all__ = ["blob_episode", "tiny_unet"]


def blob_episode(gen: torch.Generator, k_shot: int = 2, n_query: int = 2, size: int = 20, noise: float = 0.5):
    """An episode of the synthetic task family: the structure is one ellipsoid of random size, position and intensity
    (0.5 to 1.5) in Gaussian noise (std ``noise``); masks are ``[K, 1, S, S, S]`` int64."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    xs, ys = [], []
    for _ in range(k_shot + n_query):
        radius = size * (0.15 + 0.15 * torch.rand(3, generator=gen))
        centre = radius + torch.rand(3, generator=gen) * (size - 1 - 2 * radius)
        mask = (((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) <= 1
        intensity = 0.5 + torch.rand(1, generator=gen)
        xs.append((intensity * mask.float() + noise * torch.randn(size, size, size, generator=gen))[None])
        ys.append(mask[None].long())
    x, y = torch.stack(xs), torch.stack(ys)
    return x[:k_shot], y[:k_shot], x[k_shot:], y[k_shot:]


def tiny_unet(feature_channels: int = 8) -> nn.Module:
    return unet_backbone(feature_channels, channels=(4, 8), strides=(2,))


class MaskFeatures(nn.Module):
    """A "perfect" encoder for images that ARE the mask: features ``(x, 1 - x)`` (one-hot of the structure)."""

    def forward(self, x):
        return torch.cat([x, 1 - x], 1)


def _sphere(size: int, centre, radius: float) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    return ((grid - torch.tensor(centre, dtype=torch.float32)[:, None, None, None]) ** 2).sum(0) <= radius**2


# ------------------------------------------------------------------------------------------ metric, loss, networks
def test_dice_from_logits_and_loss_accept_any_mask_dtype():
    y = torch.zeros(2, 1, 6, 6, 6, dtype=torch.long)
    y[0, 0, :3] = 1
    y[1, 0, 2:4, 2:4] = 1
    perfect = torch.cat([1 - y, y], 1).float() * 4 - 2
    assert dice_from_logits(perfect, y) == 1.0
    assert dice_from_logits(perfect[:, 1:], y) == 1.0  # one channel: logits > 0
    assert dice_from_logits(perfect, y[:, 0] * 7) == 1.0  # no channel dim, nonzero is foreground
    assert dice_from_logits(-perfect, y) == 0.0
    half = perfect.clone()
    half[0] = -half[0]  # sample 0 all wrong (108 voxels missed, 108 false), sample 1 right (24 voxels)
    assert dice_from_logits(half, y) == pytest.approx(2 * 24 / (132 + 132))  # pooled, not the mean 0.5 of samples
    background_only = torch.zeros_like(y)
    assert dice_from_logits(torch.cat([-perfect[:1], perfect[1:]]), torch.cat([background_only[:1], y[1:]])) < 0.5
    loss = segmentation_loss()
    assert isinstance(loss, SegmentationLoss)
    logits = torch.randn(2, 2, 6, 6, 6)
    ref = float(loss(logits, y))
    for target in (y.bool(), y.float(), y.to(torch.uint8), y[:, 0], y * 3):
        assert float(loss(logits, target)) == pytest.approx(ref)
    assert float(loss(perfect * 10, y)) < 0.01 < ref


def test_segmentation_model_is_head_on_activated_backbone_and_anil_agrees():
    torch.manual_seed(0)
    backbone = tiny_unet(8)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    assert any(isinstance(m, nn.InstanceNorm3d) for m in backbone.modules())
    model = SegmentationModel(backbone, 8, 2)
    assert model.backbone is backbone and isinstance(model.head, nn.Conv3d)
    x = torch.randn(2, 1, 16, 16, 16)
    torch.testing.assert_close(model.features(x), F.leaky_relu(backbone(x), 0.1))
    torch.testing.assert_close(model(x), model.head(model.features(x)))
    assert model(torch.randn(1, 1, 24, 16, 20)).shape == (1, 2, 24, 16, 20)
    # ANIL computes head(encoder(x)): with no inner step it must predict what the model predicts
    sx, sy, qx, _ = blob_episode(torch.Generator().manual_seed(0), size=16)
    anil = ANIL(model, eval_inner_steps=0, loss_fn=segmentation_loss(), metric_fn=dice_from_logits)
    torch.testing.assert_close(anil.adapt(sx, sy)(qx), model(qx))
    zero = SegmentationModel(tiny_unet(8), 8, 2, zero_init_head=True)
    assert torch.equal(zero(x), torch.zeros(2, 2, 16, 16, 16))


# --------------------------------------------------------------------------------------------------- prototypes
def test_masked_average_pooling_is_the_masked_mean():
    torch.manual_seed(0)
    features = torch.randn(2, 3, 4, 4, 4)
    mask = torch.rand(2, 1, 4, 4, 4) > 0.6
    expected = features.movedim(1, -1)[mask[:, 0]].mean(0)  # mean over the masked voxels of both samples
    for m in (mask, mask.long(), mask.float(), mask.to(torch.uint8) * 5, mask[:, 0]):
        torch.testing.assert_close(masked_average_pooling(features, m), expected)
    # a mask at twice the resolution, each voxel a 2^3 block, is resized (area) to the same weights
    fine = mask.float().repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    torch.testing.assert_close(masked_average_pooling(features, fine), expected)
    one = torch.zeros(2, 1, 4, 4, 4)
    one[1, 0, 2, 3, 1] = 1
    torch.testing.assert_close(masked_average_pooling(features, one), features[1, :, 2, 3, 1])
    with pytest.raises(ValueError, match="mask is empty"):
        masked_average_pooling(features, torch.zeros(2, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        masked_average_pooling(features, torch.ones(3, 1, 4, 4, 4))


def test_local_prototypes_are_full_windows_plus_the_global_mean():
    torch.manual_seed(0)
    features = torch.randn(1, 3, 8, 8, 8)
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[:, :, :6] = 1  # depth block 0 fully inside, depth block 1 half inside
    protos = local_prototypes(features, mask, pool_size=4, threshold=0.95)
    windows = [features[0, :, :4, h : h + 4, w : w + 4].mean((1, 2, 3)) for h in (0, 4) for w in (0, 4)]
    torch.testing.assert_close(protos, torch.stack([*windows, masked_average_pooling(features, mask)]))
    assert local_prototypes(features, mask, pool_size=(4, 4, 4), threshold=0.5).shape == (9, 3)
    # windows larger than the features are clipped: one window, 3/4 inside the mask
    assert local_prototypes(features, mask, pool_size=16, threshold=0.8).shape == (1, 3)
    whole = local_prototypes(features, mask, pool_size=16, threshold=0.7)
    torch.testing.assert_close(whole[0], features[0].mean((1, 2, 3)))
    with pytest.raises(ValueError, match="mask is empty"):
        local_prototypes(features, torch.zeros_like(mask))


def test_prototype_logits_are_scaled_cosines_softly_maximised():
    torch.manual_seed(0)
    features = torch.randn(2, 4, 3, 3, 3)
    bg, fg = torch.randn(1, 4), torch.randn(5, 4)
    logits = prototype_segmentation_logits(features, (bg, fg), scale=7.0)
    assert logits.shape == (2, 2, 3, 3, 3)
    v = features[1, :, 2, 0, 1]
    torch.testing.assert_close(logits[1, 0, 2, 0, 1], 7.0 * F.cosine_similarity(v, bg[0], dim=0))
    sims = 7.0 * F.cosine_similarity(v[None], fg, dim=1)
    torch.testing.assert_close(logits[1, 1, 2, 0, 1], (torch.softmax(sims, 0) * sims).sum())


@pytest.mark.parametrize("local", [False, True])
def test_prototype_segmentation_with_perfect_features_reproduces_the_structure(local):
    """Images that are their own masks and an encoder giving one-hot (mask, 1 - mask) features: the prototypes are
    one-hot, so any query (also of another size, also through a sliding window) is segmented exactly."""
    sy = torch.stack([_sphere(16, (5, 6, 7), 4), _sphere(16, (9, 8, 8), 5)])[:, None]
    qy = torch.stack([_sphere(12, (4, 5, 6), 3), _sphere(12, (6, 6, 6), 5), _sphere(12, (3, 8, 4), 2)])[:, None]
    learner = PrototypeSegmenter(MaskFeatures(), local=local, pool_size=3)
    predictor = learner.adapt(sy.float(), sy)
    assert isinstance(predictor, PrototypeSegPredictor)
    if local:
        assert predictor.foreground.shape[0] > 1 and predictor.background.shape[0] > 1
    else:
        torch.testing.assert_close(predictor.foreground, torch.tensor([[1.0, 0.0]]))
        torch.testing.assert_close(predictor.background, torch.tensor([[0.0, 1.0]]))
    logits = predictor(qy.float())
    assert logits.shape == (3, 2, 12, 12, 12)
    assert dice_from_logits(logits, qy) == 1.0
    volume = _sphere(40, (20, 22, 18), 9)[None, None]
    with torch.no_grad():
        windowed = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=4, overlap=0.25)(volume.float(), predictor)
    assert dice_from_logits(windowed, volume) == 1.0
    loss, metrics = learner.meta_loss(sy.float()[:1], sy[:1], sy.float()[1:], sy[1:])
    assert set(metrics) == {"loss", "dice"} and metrics["dice"] == 1.0 and metrics["loss"] < 0.1


def test_prototype_segmenter_alignment_loss_and_errors():
    torch.manual_seed(0)
    sx, sy, qx, qy = blob_episode(torch.Generator().manual_seed(3), size=16)
    enc = tiny_unet(8)
    plain = PrototypeSegmenter(enc, align_weight=0.0)
    aligned = PrototypeSegmenter(enc, align_weight=0.5, align_with="mask")
    loss0, _ = plain.meta_loss(sx, sy, qx, qy)
    loss1, metrics = aligned.meta_loss(sx, sy, qx, qy)
    # alignment: prototypes of the QUERY features with the query mask segment the SUPPORT, scored against its mask
    fs, fq = enc(sx), enc(qx)
    support_logits = aligned.logits(fs, aligned.prototypes(fq, qy, "query"))
    expected = loss0 + 0.5 * segmentation_loss()(support_logits, sy)
    torch.testing.assert_close(loss1, expected)
    assert metrics["loss"] == pytest.approx(float(loss1.detach()))
    loss1.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    with pytest.raises(ValueError, match="support mask is empty: the structure has no voxel in the support patches"):
        plain.adapt(sx, torch.zeros_like(sy))
    with pytest.raises(ValueError, match="support background mask is empty"):
        plain.meta_loss(sx, torch.ones_like(sy), qx, qy)
    for kwargs in ({"scale": 0}, {"align_weight": -1}, {"threshold": 0}, {"align_with": "query"}):
        with pytest.raises(ValueError):
            PrototypeSegmenter(enc, **kwargs)


# -------------------------------------------------------------------------------------------------- fine-tuning
def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_adapt_trains_a_copy_and_is_deterministic():
    torch.manual_seed(0)
    sx, sy, qx, qy = blob_episode(torch.Generator().manual_seed(1), size=16)
    learner = SegmentationFineTune(tiny_unet(8), 8, n_base_structures=3, finetune_steps=30, finetune_lr=1e-2)
    state = _state(learner)
    predictor = learner.adapt(sx, sy)
    assert _same(state, _state(learner)), "adapt must not modify the learner's weights"
    logits = predictor(qx)
    assert logits.shape == (2, 2, 16, 16, 16) and not logits.requires_grad
    assert not predictor.model.training
    assert dice_from_logits(predictor(sx), sy) > 0.5, "30 steps should fit the support set"
    torch.testing.assert_close(learner.adapt(sx, sy)(qx), logits)  # deterministic
    loss, metrics = learner.meta_loss(sx, sy, qx, qy)
    assert not loss.requires_grad and set(metrics) == {"loss", "dice"}
    assert metrics["dice"] == pytest.approx(dice_from_logits(logits, qy))
    with pytest.raises(ValueError, match="support mask is empty"):
        learner.adapt(sx, torch.zeros_like(sy))
    # no fine-tuning step: the predictor is the learner's encoder with a zero head
    untouched = SegmentationFineTune(learner.encoder, 8, 3, finetune_steps=0).adapt(sx, sy)
    assert _same(_state(untouched.model.backbone), _state(learner.encoder))
    assert torch.equal(untouched(qx), torch.zeros(2, 2, 16, 16, 16))


def test_scratch_meta_step_changes_nothing_and_adapt_starts_fresh():
    sx, sy, qx, qy = blob_episode(torch.Generator().manual_seed(2), size=16)
    torch.manual_seed(0)
    a = SegmentationFineTune(tiny_unet(8), 8, pretrained=False, finetune_steps=0, seed=5)
    torch.manual_seed(1)
    b = SegmentationFineTune(tiny_unet(8), 8, pretrained=False, finetune_steps=0, seed=5)
    assert not _same(_state(a.encoder), _state(b.encoder))
    state = _state(a)
    opt = torch.optim.Adam(a.parameters(), 1e-2)
    metrics = a.outer_step(sx, sy, qx, qy, opt)
    assert math.isnan(metrics["loss"]) and math.isnan(metrics["dice"])
    assert a.meta_batch_step([(sx, sy, qx, qy)] * 2, opt)["tasks"] == 2.0
    assert _same(state, _state(a)) and not opt.state
    assert all(p.grad is None for p in a.parameters())
    # adapt starts from a fresh initialisation drawn from `seed`, whatever the learner's own weights
    rng = torch.get_rng_state()
    fresh_a, fresh_b = _state(a.adapt(sx, sy).model.backbone), _state(b.adapt(sx, sy).model.backbone)
    assert torch.equal(rng, torch.get_rng_state()), "adapt must not consume the global random state"
    assert _same(fresh_a, fresh_b) and not _same(fresh_a, _state(a.encoder))
    other = SegmentationFineTune(a.encoder, 8, pretrained=False, finetune_steps=0, seed=6)
    assert not _same(fresh_a, _state(other.adapt(sx, sy).model.backbone))
    with pytest.raises(RuntimeError, match="no base head"):
        a(sx)


def test_pretraining_step_updates_the_episode_structure_channel_only():
    torch.manual_seed(0)
    sx, sy, qx, qy = blob_episode(torch.Generator().manual_seed(4), size=16)
    learner = SegmentationFineTune(tiny_unet(8), 8, n_base_structures=3)
    state = _state(learner)
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    x, y = torch.cat([sx, qx]), torch.cat([sy, qy]) * 2  # structure 1 (global ids: mask * (index + 1))
    logits = learner(x)
    expected = DiceLoss(sigmoid=True)(logits[:, 1:2], (y > 0).float()) + F.binary_cross_entropy_with_logits(
        logits[:, 1:2], (y > 0).float()
    )
    metrics = learner.outer_step(sx, sy * 2, qx, qy * 2, opt)
    assert metrics["loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    new = _state(learner)
    for name in state:
        if name.startswith("encoder.") and name.endswith(".weight"):  # (conv biases before instance norm: no gradient)
            assert not torch.equal(state[name], new[name]), name
    for key in ("base_head.weight", "base_head.bias"):
        assert torch.equal(state[key][[0, 2]], new[key][[0, 2]]), "channels of other structures must not move"
        assert not torch.equal(state[key][1], new[key][1]), "the episode structure's channel must be trained"
    # structure ids: one per batch (empty patches included), or one per sample
    ids = learner.structure_ids(torch.stack([y[0], torch.zeros_like(y[0]), y[1]]))
    assert ids.tolist() == [1, 1, 1]
    assert learner.structure_ids(torch.stack([y[0], y[1] * 3 // 2])).tolist() == [1, 2]
    with pytest.raises(ValueError, match="empty"):
        learner.outer_step(sx, sy * 0, qx, qy * 0, opt)
    with pytest.raises(ValueError, match="SegmentationGlobalLabels"):
        learner.outer_step(sx, sy * 4, qx, qy * 4, opt)
    with pytest.raises(ValueError, match="exactly one"):
        learner.structure_ids(torch.stack([y[0], torch.zeros_like(y[0]), y[1] * 3 // 2]))
    with pytest.raises(ValueError, match="n_base_structures"):
        SegmentationFineTune(tiny_unet(8), 8)


def test_segmentation_global_labels_multiply_masks_by_structure_index_plus_one():
    sx, sy, qx, qy = blob_episode(torch.Generator().manual_seed(5), size=8)
    episode = {"support_image": sx, "support_label": sy.bool(), "query_image": qx, "query_label": qy.float()}
    prepare = SegmentationGlobalLabels(["liver", "spleen", "kidney"])
    for structure in ("spleen", ["spleen"]):
        out = prepare({**episode, "structure": structure}, "cpu")
        assert torch.equal(out[0], sx) and torch.equal(out[2], qx)
        assert torch.equal(out[1], sy * 2) and torch.equal(out[3], qy * 2)
    assert torch.equal(prepare({**episode, "structure": "kidney"}, "cpu")[1], sy * 3)
    with pytest.raises(KeyError, match="not a meta-train structure"):
        prepare({**episode, "structure": "heart"}, "cpu")


# ------------------------------------------------------------------------------------------------------ factory
def test_create_segmentation_learner():
    expected = {
        "maml": MAML,
        "fomaml": FOMAML,
        "anil": ANIL,
        "reptile": Reptile,
        "protoseg": PrototypeSegmenter,
        "finetune": SegmentationFineTune,
        "scratch": SegmentationFineTune,
        "wholebody": WholeBodyReference,
        "boxaligned": BoxAlignedReference,
        "atlas": AtlasSegmenter,
        "multiatlas": MultiAtlasSegmenter,
        "atlas_em": AtlasIntensitySegmenter,
        "atlas_selftrain": AtlasSelfTrainingSegmenter,
    }
    assert set(SEGMENTATION_LEARNERS) == set(expected)
    for name, cls in expected.items():
        learner = create_segmentation_learner(name.upper(), tiny_unet(8), 8, n_base_structures=2)
        assert type(learner) is cls, name
        if name in ("maml", "fomaml", "anil", "reptile"):
            assert isinstance(learner.model, SegmentationModel) and learner.model.head.out_channels == 2
            assert isinstance(learner.loss_fn, SegmentationLoss) and learner.metric_fn is dice_from_logits
            assert learner.metric_name == "dice"
    assert create_segmentation_learner("finetune", tiny_unet(8), 8, 2).pretrained
    assert not create_segmentation_learner("scratch", tiny_unet(8), 8).pretrained
    assert create_segmentation_learner("Proto-Seg", tiny_unet(8), 8, local=True).local
    assert create_segmentation_learner("maml", tiny_unet(8), 8, inner_lr=0.3).inner_lr == 0.3
    with pytest.raises(ValueError, match="protoseg"):
        create_segmentation_learner("protonet", tiny_unet(8), 8)
    with pytest.raises(ValueError, match="n_base_structures"):
        create_segmentation_learner("finetune", tiny_unet(8), 8)


# ------------------------------------------------------------------------------------------------------ learning
STEPS = 10
LEARNING = {
    # name: (learner kwargs, Adam learning rate of the meta-optimizer (None: Reptile's own update))
    "maml": ({"inner_lr": 0.1, "inner_steps": 2}, 3e-3),
    "fomaml": ({"inner_lr": 0.1, "inner_steps": 3}, 3e-3),
    "anil": ({"inner_lr": 0.5, "inner_steps": 3}, 3e-3),
    "reptile": ({"inner_lr": 3e-3, "inner_steps": 3, "inner_optimizer": "adam", "epsilon": 0.5}, None),
    "protoseg": ({}, 3e-3),
    "protoseg_local": ({"local": True, "pool_size": 5}, 3e-3),
    "finetune": ({"finetune_steps": 5, "finetune_lr": 3e-3}, 3e-3),
}


@pytest.mark.parametrize("name", sorted(LEARNING))
def test_learner_learns_synthetic_blob_segmentation(name):
    """10 meta-steps on 20^3 blob episodes raise the Dice of a fixed held-out episode (2-shot, 4 queries) from near
    0 to about 0.8 for every learner (minimum gain 0.4 over seeds 0-4); asserted: a gain of at least 0.25."""
    kwargs, lr = LEARNING[name]
    torch.manual_seed(0)
    learner = create_segmentation_learner(name.split("_")[0], tiny_unet(8), 8, n_base_structures=1, **kwargs)
    optimizer = torch.optim.Adam(learner.parameters(), lr) if lr else None
    sx, sy, qx, qy = blob_episode(torch.Generator().manual_seed(1234), n_query=4)
    before = dice_from_logits(learner.adapt(sx, sy)(qx), qy)
    gen = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        metrics = learner.outer_step(*blob_episode(gen), optimizer)
        assert set(metrics) == {"loss", "dice"} and all(isinstance(v, float) for v in metrics.values())
    after = dice_from_logits(learner.adapt(sx, sy)(qx), qy)
    assert after >= 0.6 and after >= before + 0.25, f"held-out Dice {before:.2f} -> {after:.2f}"


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "protoseg"])
@pytest.mark.parametrize("net", ["segresnet", "dynunet"])
def test_monai_segmentation_networks_as_backbones(name, net):
    """SegResNet and DynUNet (MONAI) plug in as the dense backbone: a meta-step changes the weights and the adapted
    predictor segments a volume of another size."""
    from monai.networks.nets import DynUNet, SegResNet

    torch.manual_seed(0)
    if net == "segresnet":
        backbone = SegResNet(spatial_dims=3, in_channels=1, out_channels=4, init_filters=8, blocks_down=(1, 1),
                             blocks_up=(1,), norm=("group", {"num_groups": 4}))
    else:
        backbone = DynUNet(spatial_dims=3, in_channels=1, out_channels=4, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                           upsample_kernel_size=[2, 2], filters=[4, 8, 8], norm_name="instance")
    learner = create_segmentation_learner(name, backbone, 4, inner_steps=1) if name != "protoseg" else \
        create_segmentation_learner(name, backbone, 4)
    x = torch.rand(4, 1, 16, 16, 16)
    y = torch.zeros(4, 1, 16, 16, 16)
    y[:, :, 4:10, 4:10, 4:10] = 1
    x = x + 2 * y
    before = [p.detach().clone() for p in learner.parameters()]
    opt = torch.optim.Adam(learner.parameters(), 1e-2)
    metrics = learner.meta_batch_step([(x[:2], y[:2], x[2:], y[2:])], opt)
    assert math.isfinite(metrics["loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, learner.parameters()))
    predictor = learner.adapt(x[:2], y[:2])
    with torch.no_grad():
        logits = predictor(torch.rand(1, 1, 24, 16, 32))
    assert logits.shape == (1, 2, 24, 16, 32)
