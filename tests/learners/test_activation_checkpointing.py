"""Activation checkpointing and channels_last_3d: meta-gradients of checkpointed networks and inner steps equal the
plain ones (second order included), a naive checkpoint under fast weights does not, and the factories' config keys."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from monai_metalearn.errors import ConfigError
from monai_metalearn.learners import (
    FOMAML,
    MAML,
    MetaSGD,
    create_learner,
    create_segmentation_learner,
    segmentation_loss,
)
from monai_metalearn.networks import (
    ConvEncoder3D,
    FewShotClassifier,
    SegmentationModel,
    checkpointed_modules,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    enable_channels_last_3d,
    to_channels_last_3d,
    unet_backbone,
)
from monai_metalearn.networks.checkpointing import activation_checkpointing_mode, is_channels_last_3d

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


# ------------------------------------------------------------------------------------------------- helpers
def tiny_unet_model(seed: int = 0) -> SegmentationModel:
    torch.manual_seed(seed)
    return SegmentationModel(unet_backbone(feature_channels=4, channels=(4, 8), strides=(2,)), 4, 2)


def seg_episode(device: str = "cpu", size: int = 16) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    sx = torch.randn(1, 1, size, size, size, generator=g)
    sy = (torch.rand(1, 1, size, size, size, generator=g) > 0.6).long()
    qx = torch.randn(2, 1, size, size, size, generator=g)
    qy = (torch.rand(2, 1, size, size, size, generator=g) > 0.6).long()
    return tuple(t.to(device) for t in (sx, sy, qx, qy))


def cls_model(seed: int = 0) -> FewShotClassifier:
    torch.manual_seed(seed)
    # zero_init_head=False: a zero head would make the first inner step's encoder gradient vanish
    return FewShotClassifier(ConvEncoder3D(1, (4, 8), norm="group", num_groups=2), 8, n_way=2, zero_init_head=False)


def cls_episode() -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(2)
    return (
        torch.randn(2, 1, 12, 12, 12, generator=g),
        torch.tensor([0, 1]),
        torch.randn(4, 1, 12, 12, 12, generator=g),
        torch.tensor([0, 1, 1, 0]),
    )


def meta_gradient(learner: MAML, episode: tuple[Tensor, ...]) -> Tensor:
    loss, _ = learner.meta_loss(*episode)
    params = [p for p in learner.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def rel_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def naive_checkpointing(model: nn.Module, types: tuple[type, ...]) -> nn.Module:
    """What not to do: checkpoint ``module.__call__`` itself; the recomputation reads the module's stored weights."""

    class Naive(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            return checkpoint(self.inner, x, use_reentrant=False)

    found = [(m, n, c) for m in model.modules() for n, c in m.named_children() if isinstance(c, types)]
    for module, name, child in found:
        setattr(module, name, Naive(child))
    return model


def seg_learner(model: nn.Module, first_order: bool = False, steps: bool = False) -> MAML:
    learner = MAML(model, inner_lr=0.5, inner_steps=2, first_order=first_order, loss_fn=segmentation_loss())
    learner.checkpoint_inner_steps = steps
    return learner


# ------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first_order", [False, True])
def test_unet_meta_gradient_with_checkpointed_blocks_equals_plain(device: str, first_order: bool) -> None:
    from monai.networks.blocks import Convolution, ResidualUnit

    episode = seg_episode(device)
    plain = tiny_unet_model().to(device)
    ref = meta_gradient(seg_learner(plain, first_order), episode)
    model = enable_activation_checkpointing(tiny_unet_model().to(device))
    assert checkpointed_modules(model) == [
        "encoder.0.model.0",
        "encoder.0.model.1.submodule",
        "encoder.0.model.2.0",
        "encoder.0.model.2.1",
    ]
    assert rel_diff(meta_gradient(seg_learner(model, first_order), episode), ref) < 1e-5
    # the test can fail: a checkpoint that recomputes with the module's own weights gives another meta-gradient
    naive = naive_checkpointing(tiny_unet_model().to(device), (ResidualUnit, Convolution))
    assert rel_diff(meta_gradient(seg_learner(naive, first_order), episode), ref) > 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocks", [False, True])
def test_unet_second_order_with_checkpointed_inner_steps_equals_plain(device: str, blocks: bool) -> None:
    episode = seg_episode(device)
    ref = meta_gradient(seg_learner(tiny_unet_model().to(device)), episode)
    model = tiny_unet_model().to(device)
    if blocks:
        enable_activation_checkpointing(model)
    assert rel_diff(meta_gradient(seg_learner(model, steps=True), episode), ref) < 1e-5
    # second order really differs from first order here, so the check sees a lost second-order term
    first = meta_gradient(seg_learner(tiny_unet_model().to(device), first_order=True), episode)
    assert rel_diff(first, ref) > 1e-3


@pytest.mark.parametrize("first_order", [False, True])
def test_conv_encoder_classification_checkpointed_equals_plain(first_order: bool) -> None:
    episode = cls_episode()
    ref = meta_gradient(MAML(cls_model(), inner_lr=0.5, inner_steps=2, first_order=first_order), episode)
    model = enable_activation_checkpointing(cls_model())
    assert checkpointed_modules(model) == ["encoder.blocks.0", "encoder.blocks.1"]
    learner = MAML(model, inner_lr=0.5, inner_steps=2, first_order=first_order)
    learner.checkpoint_inner_steps = True
    assert rel_diff(meta_gradient(learner, episode), ref) < 1e-5
    naive = naive_checkpointing(cls_model(), (nn.Sequential,))  # the encoder's conv blocks (and the block list)
    naive_learner = MAML(naive, inner_lr=0.5, inner_steps=2, first_order=first_order)
    assert rel_diff(meta_gradient(naive_learner, episode), ref) > 1e-2


def test_metasgd_learning_rates_get_the_same_gradient_through_checkpointed_steps() -> None:
    episode = cls_episode()
    ref = meta_gradient(MetaSGD(cls_model(), inner_lr=0.3, inner_steps=2), episode)
    learner = MetaSGD(enable_activation_checkpointing(cls_model()), inner_lr=0.3, inner_steps=2)
    learner.checkpoint_inner_steps = True
    got = meta_gradient(learner, episode)  # includes the gradient of the learned inner learning rates
    assert got.shape == ref.shape and rel_diff(got, ref) < 1e-5


def test_adapt_predictions_and_outer_step_equal_plain() -> None:
    sx, sy, qx, qy = seg_episode()
    plain = create_segmentation_learner("maml", tiny_unet_model().backbone, 4, inner_lr=0.5, inner_steps=2)
    torch.manual_seed(0)
    ck = copy.deepcopy(plain)
    enable_activation_checkpointing(ck.model)
    ck.checkpoint_inner_steps = True
    assert torch.allclose(ck.adapt(sx, sy)(qx), plain.adapt(sx, sy)(qx), atol=1e-5)
    for learner in (plain, ck):
        opt = torch.optim.SGD(learner.parameters(), lr=0.1)
        learner.outer_step(sx, sy, qx, qy, opt)
    for (name, a), (_, b) in zip(plain.named_parameters(), ck.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    with torch.no_grad():  # no graph: the blocks run as usual
        assert torch.allclose(ck.model(qx), plain.model(qx), atol=1e-6)


def test_fomaml_steps_option_changes_nothing() -> None:
    episode = seg_episode()
    ref = meta_gradient(FOMAML(tiny_unet_model(), inner_lr=0.5, inner_steps=2, loss_fn=segmentation_loss()), episode)
    learner = FOMAML(tiny_unet_model(), inner_lr=0.5, inner_steps=2, loss_fn=segmentation_loss())
    learner.checkpoint_inner_steps = True  # first order: the inner steps keep no graph, nothing to checkpoint
    assert torch.equal(meta_gradient(learner, episode), ref)


def test_checkpointed_network_keeps_names_copies_and_pickles() -> None:
    plain = tiny_unet_model()
    model = enable_activation_checkpointing(tiny_unet_model())
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    clone = copy.deepcopy(model)
    block = clone.encoder[0].model[0]
    assert block.forward.module is block  # the copy recomputes its own block, not the original's
    with torch.no_grad():
        clone.encoder[0].model[0].conv.unit0.conv.weight.mul_(2)
    assert checkpointed_modules(clone) == checkpointed_modules(model)
    assert not torch.allclose(clone(x), model(x))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert checkpointed_modules(loaded) == checkpointed_modules(model)
    assert torch.allclose(loaded(x), plain(x), atol=1e-6)
    enable_activation_checkpointing(model)  # again: nothing new
    assert len(checkpointed_modules(model)) == 4
    assert checkpointed_modules(disable_activation_checkpointing(model)) == []


def test_targets_types_patterns_and_errors() -> None:
    from monai.networks.blocks import ResidualUnit

    model = tiny_unet_model()
    enable_activation_checkpointing(model, targets=[ResidualUnit])
    assert checkpointed_modules(model) == ["encoder.0.model.0", "encoder.0.model.1.submodule", "encoder.0.model.2.1"]
    model = enable_activation_checkpointing(tiny_unet_model(), targets="encoder.0.model.[02]")
    assert checkpointed_modules(model) == ["encoder.0.model.0", "encoder.0.model.2"]
    with pytest.raises(ConfigError, match="no submodule"):
        enable_activation_checkpointing(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="no submodule"):
        enable_activation_checkpointing(tiny_unet_model(), targets=["nothing.*"])
    with pytest.raises(ConfigError, match="nn.Module subclasses or name patterns"):
        enable_activation_checkpointing(tiny_unet_model(), targets=[3])


def test_checkpointed_blocks_under_torch_func_grad_raise_a_clear_runtime_error() -> None:
    model = enable_activation_checkpointing(cls_model())
    params = dict(model.named_parameters())
    x = torch.randn(2, 1, 12, 12, 12)
    with pytest.raises(RuntimeError, match="activation checkpointing cannot run under torch.func.grad"):
        torch.func.grad(lambda p: functional_call(model, p, (x,)).sum())(params)


def test_vmap_task_batching_falls_back_to_the_loop_with_checkpointed_blocks() -> None:
    g = torch.Generator().manual_seed(3)
    episodes = [
        (torch.randn(2, 1, 12, 12, 12, generator=g), torch.tensor([0, 1]),
         torch.randn(4, 1, 12, 12, 12, generator=g), torch.tensor([0, 1, 1, 0]))
        for _ in range(2)
    ]  # fmt: skip
    weights = []
    for batching, blocks in (("loop", False), ("vmap", True)):
        model = cls_model()
        if blocks:
            enable_activation_checkpointing(model)
        learner = MAML(model, inner_lr=0.5, inner_steps=2, task_batching=batching)
        learner.meta_batch_step(episodes, torch.optim.SGD(learner.parameters(), lr=0.1))
        weights.append(torch.cat([p.detach().flatten() for p in learner.parameters()]))
    assert not torch.equal(weights[0], torch.cat([p.detach().flatten() for p in cls_model().parameters()]))
    assert torch.allclose(weights[1], weights[0], atol=1e-6)


# ------------------------------------------------------------------------------------------------- channels_last_3d
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_3d_outputs_and_meta_gradients_equal_contiguous(device: str) -> None:
    episode = seg_episode(device)
    plain = tiny_unet_model().to(device)
    model = enable_channels_last_3d(tiny_unet_model().to(device))
    assert is_channels_last_3d(model) and not is_channels_last_3d(plain)
    weight = model.encoder[0].model[1].submodule.conv.unit0.conv.weight  # [8, 4, 3, 3, 3]
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    x = episode[2]
    assert torch.allclose(model(x), plain(x), atol=1e-5)
    assert torch.allclose(model(to_channels_last_3d(x)), plain(x), atol=1e-5)
    ref = meta_gradient(seg_learner(plain), episode)
    assert rel_diff(meta_gradient(seg_learner(model), episode), ref) < 1e-4
    enable_channels_last_3d(model)  # idempotent: one hook
    assert sum(1 for _ in model._forward_pre_hooks.values()) == 1
    assert to_channels_last_3d(torch.ones(2, 3)).is_contiguous()


# ------------------------------------------------------------------------------------------------- factories / config
def test_segmentation_factory_config_keys() -> None:
    def build(name: str = "maml", **kw):
        torch.manual_seed(0)
        args = {"inner_lr": 0.5, "inner_steps": 2} if name == "maml" else {}
        return create_segmentation_learner(name, tiny_unet_model().backbone, 4, **args, **kw)

    plain = build()
    assert not checkpointed_modules(plain.model) and not plain.checkpoint_inner_steps
    blocks = build(activation_checkpointing="blocks")
    assert len(checkpointed_modules(blocks.model)) == 4 and not blocks.checkpoint_inner_steps
    steps = build(activation_checkpointing="steps")
    assert not checkpointed_modules(steps.model) and steps.checkpoint_inner_steps
    every = build(activation_checkpointing=True, channels_last=True)
    assert len(checkpointed_modules(every.model)) == 4 and every.checkpoint_inner_steps
    assert is_channels_last_3d(every.model.backbone)
    episode = seg_episode()
    assert rel_diff(meta_gradient(every, episode), meta_gradient(plain, episode)) < 1e-4
    proto = build("protoseg", activation_checkpointing="all")  # no inner steps: blocks only
    assert len(checkpointed_modules(proto)) == 4
    with pytest.raises(ConfigError, match="activation_checkpointing='steps' needs a MAML-family"):
        build("protoseg", activation_checkpointing="steps")
    with pytest.raises(ConfigError, match="activation_checkpointing must be"):
        build(activation_checkpointing="sometimes")
    with pytest.raises(ConfigError, match="channels_last must be a bool"):
        build(channels_last="yes")
    with pytest.raises(ConfigError, match="need a learner with a network"):
        create_segmentation_learner("atlas", activation_checkpointing=True)
    from monai_metalearn.apps.segmentation import build_segmentation_learner

    bundle = build_segmentation_learner(  # what a bundle's learner_args / learner_defaults entry reaches
        "maml", tiny_unet_model().backbone, 4, ["a"], {"maml": {"inner_steps": 2}}, {"activation_checkpointing": "all"}
    )
    assert len(checkpointed_modules(bundle.model)) == 4 and bundle.checkpoint_inner_steps


def test_classification_factory_and_bundle_builder_accept_the_keys() -> None:
    from monai_metalearn.apps.classification import build_learner

    learner = create_learner("maml", ConvEncoder3D(1, (4, 8)), 8, 2, activation_checkpointing="all")
    assert checkpointed_modules(learner.model) == ["encoder.blocks.0", "encoder.blocks.1"]
    assert learner.checkpoint_inner_steps
    proto = create_learner("protonet", ConvEncoder3D(1, (4, 8)), 8, 2, channels_last=True)
    assert is_channels_last_3d(proto.encoder)
    with pytest.raises(ConfigError, match="MAML-family"):
        create_learner("reptile", ConvEncoder3D(1, (4, 8)), 8, 2, activation_checkpointing="steps")
    built = build_learner(
        "maml", ConvEncoder3D(1, (4, 8)), 8, 2, ["a", "b"], {"maml": {"inner_lr": 0.1}},
        {"activation_checkpointing": "blocks", "channels_last": False},
    )  # fmt: skip
    assert len(checkpointed_modules(built.model)) == 2 and not built.checkpoint_inner_steps
    assert activation_checkpointing_mode(None) == "none" and activation_checkpointing_mode("STEPS") == "steps"
