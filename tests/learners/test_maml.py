"""MAML, FOMAML, ANIL and Meta-SGD: exact meta-gradients, what each variant adapts, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from monai_metalearn.learners import ANIL, FOMAML, MAML, MetaSGD
from monai_metalearn.networks import ConvEncoder3D, FewShotClassifier

from .synthetic import random_episode


class SmoothNet(nn.Module):
    """A tiny smooth (tanh) classifier with ``encoder``/``head`` for exact finite differences."""

    def __init__(self, in_voxels: int = 27, hidden: int = 6, n_way: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(in_voxels, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, n_way)

    def forward(self, x):
        return self.head(self.encoder(x))


def _net(kind: str) -> tuple[nn.Module, int]:
    """(float64 network, input side)."""
    if kind == "smooth":
        return SmoothNet().double(), 3
    enc = ConvEncoder3D(features=(3, 4), num_groups=2)
    return FewShotClassifier(enc, 4, 3, zero_init_head=False).double(), 4


def _grads(learner, episode) -> list[torch.Tensor]:
    learner.zero_grad(set_to_none=True)
    loss, _ = learner.meta_loss(*episode)
    loss.backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in learner.parameters()]


def _directional_fd(learner, episode, direction, h: float = 1e-6) -> float:
    params = list(learner.parameters())
    base = [p.detach().clone() for p in params]
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, b, v in zip(params, base, direction):
                p.copy_(b + sign * h * v)
            values.append(learner.meta_loss(*episode)[0].item())
    with torch.no_grad():
        for p, b in zip(params, base):
            p.copy_(b)
    return (values[0] - values[1]) / (2 * h)


LEARNERS = {
    "maml1": lambda m: MAML(m, inner_lr=0.5, inner_steps=1),
    "maml2": lambda m: MAML(m, inner_lr=0.3, inner_steps=2),
    "metasgd": lambda m: MetaSGD(m, inner_lr=0.5, inner_steps=1),
    "anil2": lambda m: ANIL(m, inner_lr=0.5, inner_steps=2),
}


@pytest.mark.parametrize("net", ["smooth", "conv"])
@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_second_order_meta_gradient_matches_finite_differences(name, net):
    torch.manual_seed(0)
    model, size = _net(net)
    learner = LEARNERS[name](model)
    episode = random_episode(size=size, dtype=torch.float64)
    grads = _grads(learner, episode)
    for _ in range(3):
        direction = [torch.randn_like(g) for g in grads]
        analytic = sum(float((g * v).sum()) for g, v in zip(grads, direction))
        numeric = _directional_fd(learner, episode, direction)
        assert abs(numeric - analytic) <= 1e-5 * abs(analytic) + 1e-9, (numeric, analytic)


@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_matches_torch_func_reference_and_differs_from_first_order(steps):
    torch.manual_seed(1)
    model, size = _net("smooth")
    sx, sy, qx, qy = random_episode(size=size, dtype=torch.float64)
    lr = 0.5

    def meta_objective(params):
        def support_loss(p):
            return F.cross_entropy(functional_call(model, p, (sx,)), sy)

        for _ in range(steps):
            g = torch.func.grad(support_loss)(params)
            params = {n: params[n] - lr * g[n] for n in params}
        return F.cross_entropy(functional_call(model, params, (qx,)), qy)

    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = torch.func.grad(meta_objective)(params0)
    second = _grads(MAML(model, inner_lr=lr, inner_steps=steps), (sx, sy, qx, qy))
    first = _grads(FOMAML(model, inner_lr=lr, inner_steps=steps), (sx, sy, qx, qy))
    for (n, _), g in zip(model.named_parameters(), second):
        torch.testing.assert_close(g, reference[n], rtol=1e-9, atol=1e-12)
    diff = torch.cat([(a - b).flatten() for a, b in zip(second, first)]).norm()
    norm = torch.cat([a.flatten() for a in second]).norm()
    assert diff / norm > 1e-2, "the second-order term should change the meta-gradient"


def test_fomaml_gradient_is_query_gradient_at_adapted_weights():
    torch.manual_seed(2)
    model, size = _net("conv")
    sx, sy, qx, qy = random_episode(size=size, dtype=torch.float64)
    lr, steps = 0.3, 3
    grads = _grads(FOMAML(model, inner_lr=lr, inner_steps=steps), (sx, sy, qx, qy))
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    for _ in range(steps):
        g = torch.autograd.grad(F.cross_entropy(functional_call(model, params, (sx,)), sy), list(params.values()))
        params = {n: (p - lr * gi).detach().requires_grad_(True) for (n, p), gi in zip(params.items(), g)}
    expected = torch.autograd.grad(F.cross_entropy(functional_call(model, params, (qx,)), qy), list(params.values()))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert FOMAML(model).first_order and not MAML(model).first_order


def test_adapt_matches_meta_loss_inner_loop_and_leaves_model_unchanged():
    torch.manual_seed(3)
    model, size = _net("conv")
    sx, sy, qx, qy = random_episode(size=size, dtype=torch.float64)
    learner = MAML(model, inner_lr=0.3, inner_steps=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    predictor = learner.adapt(sx, sy)
    loss, metrics = learner.meta_loss(sx, sy, qx, qy)
    torch.testing.assert_close(F.cross_entropy(predictor(qx), qy), loss.detach())
    assert metrics["loss"] == pytest.approx(loss.item())
    assert isinstance(metrics["accuracy"], float)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
        assert not torch.equal(predictor.params[n], p)
    assert predictor(qx).shape == (6, 3)


def test_eval_inner_steps_used_by_adapt_only():
    torch.manual_seed(4)
    model, size = _net("smooth")
    sx, sy, qx, _ = random_episode(size=size, dtype=torch.float64)
    zero = MAML(model, inner_lr=0.3, inner_steps=2, eval_inner_steps=0).adapt(sx, sy)
    torch.testing.assert_close(zero(qx), model(qx))
    two = MAML(model, inner_lr=0.3, inner_steps=2).adapt(sx, sy)
    also_two = MAML(model, inner_lr=0.3, inner_steps=1, eval_inner_steps=2).adapt(sx, sy)
    torch.testing.assert_close(two(qx), also_two(qx))


def test_meta_loss_without_grad_keeps_no_graph_and_adapt_works_under_no_grad():
    torch.manual_seed(5)
    model, size = _net("conv")
    episode = random_episode(size=size, dtype=torch.float64)
    learner = MAML(model, inner_lr=0.3, inner_steps=2)
    with_grad = learner.meta_loss(*episode)[0]
    with torch.no_grad():
        loss, _ = learner.meta_loss(*episode)
        logits = learner.adapt(episode[0], episode[1])(episode[2])
    assert not loss.requires_grad and not logits.requires_grad
    torch.testing.assert_close(loss, with_grad.detach())


def test_anil_adapts_only_the_head_and_trains_the_encoder():
    torch.manual_seed(6)
    model, size = _net("conv")
    sx, sy, qx, qy = random_episode(size=size, dtype=torch.float64)
    learner = ANIL(model, inner_lr=0.5, inner_steps=3)
    assert learner.adapted_names() == ["head.weight", "head.bias"]
    calls = []
    hook = model.encoder.register_forward_hook(lambda *a: calls.append(1))
    loss, _ = learner.meta_loss(sx, sy, qx, qy)
    hook.remove()
    assert len(calls) == 2, "encoder features must be computed once for the support and once for the query set"
    loss.backward()
    for n, p in model.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert model.head.weight.grad.abs().sum() > 0
    predictor = learner.adapt(sx, sy)
    for n, p in model.named_parameters():
        if n.startswith("encoder."):
            assert torch.equal(predictor.params[n], p), n
        else:
            assert not torch.equal(predictor.params[n], p), n
    expected = F.linear(model.encoder(qx), predictor.params["head.weight"], predictor.params["head.bias"])
    torch.testing.assert_close(predictor(qx), expected)


def test_anil_equals_maml_restricted_to_the_head():
    torch.manual_seed(7)
    model, size = _net("smooth")
    episode = random_episode(size=size, dtype=torch.float64)
    anil = _grads(ANIL(model, inner_lr=0.5, inner_steps=2), episode)
    head_maml = _grads(MAML(model, inner_lr=0.5, inner_steps=2, inner_params=["head."]), episode)
    for a, b in zip(anil, head_maml):
        torch.testing.assert_close(a, b)


def test_anil_requires_encoder_and_head():
    with pytest.raises(ValueError, match="encoder"):
        ANIL(nn.Linear(3, 3))


def test_metasgd_learning_rates_are_trained():
    torch.manual_seed(8)
    model, size = _net("conv")
    episode = random_episode(size=size, dtype=torch.float64)
    learner = MetaSGD(model, inner_lr=0.2, inner_steps=1)
    lr_params = list(learner.inner_lrs.parameters())
    assert len(lr_params) == len(list(model.parameters()))
    assert {id(p) for p in lr_params} <= {id(p) for p in learner.parameters()}
    for n, p in model.named_parameters():
        assert learner.inner_lrs[n.replace(".", "__")].shape == p.shape
        assert torch.all(learner.inner_lrs[n.replace(".", "__")] == 0.2)
    # with equal learning rates Meta-SGD is MAML
    torch.testing.assert_close(learner.meta_loss(*episode)[0], MAML(model, 0.2, 1).meta_loss(*episode)[0])
    before = [p.detach().clone() for p in lr_params]
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    learner.outer_step(*episode, opt)
    for p, b in zip(lr_params, before):
        assert p.grad is not None and p.grad.abs().sum() > 0
        assert not torch.equal(p, b)


def test_metasgd_first_order_still_trains_learning_rates():
    torch.manual_seed(9)
    model, size = _net("smooth")
    learner = MetaSGD(model, inner_lr=0.2, first_order=True)
    loss, _ = learner.meta_loss(*random_episode(size=size, dtype=torch.float64))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.inner_lrs.parameters())


def test_meta_batch_step_averages_task_gradients():
    torch.manual_seed(10)
    model, size = _net("smooth")
    learner = MAML(model, inner_lr=0.5, inner_steps=1)
    episodes = [random_episode(size=size, dtype=torch.float64) for _ in range(3)]
    per_task = [_grads(learner, e) for e in episodes]
    expected = [sum(gs) / 3 for gs in zip(*per_task)]
    losses = [learner.meta_loss(*e)[1]["loss"] for e in episodes]
    before = [p.detach().clone() for p in learner.parameters()]
    metrics = learner.meta_batch_step(episodes, torch.optim.SGD(learner.parameters(), lr=1.0))
    assert metrics["loss"] == pytest.approx(sum(losses) / 3)
    assert metrics["tasks"] == 3.0
    for p, b, e in zip(learner.parameters(), before, expected):
        torch.testing.assert_close(p.detach(), b - e)


def test_outer_step_is_deterministic_given_the_seed():
    def run():
        torch.manual_seed(11)
        model = FewShotClassifier(ConvEncoder3D(features=(4, 8)), 8, 3)
        learner = MAML(model, inner_lr=0.1, inner_steps=2)
        opt = torch.optim.Adam(learner.parameters(), 1e-2)
        out = [learner.outer_step(*random_episode(size=8), opt)["loss"] for _ in range(3)]
        return out, [p.detach().clone() for p in learner.parameters()]

    (l1, p1), (l2, p2) = run(), run()
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_segmentation_loss_and_metric_plug_in():
    from monai.losses import DiceCELoss

    def dice(logits, y):
        pred = logits.argmax(1, keepdim=True)
        inter = ((pred == 1) & (y == 1)).sum()
        return float(2 * inter / ((pred == 1).sum() + (y == 1).sum()).clamp_min(1))

    torch.manual_seed(12)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv3d(4, 2, 1))
    x = torch.randn(4, 1, 8, 8, 8)
    y = (x > 0.5).long()  # [B, 1, D, H, W] masks
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    for cls in (MAML, FOMAML, MetaSGD):
        learner = cls(net, inner_lr=0.1, inner_steps=2, loss_fn=loss_fn, metric_fn=dice, metric_name="dice")
        opt = torch.optim.Adam(learner.parameters(), 1e-2)
        metrics = learner.outer_step(x[:2], y[:2], x[2:], y[2:], opt)
        assert set(metrics) == {"loss", "dice"} and all(isinstance(v, float) for v in metrics.values())
        assert learner.adapt(x[:2], y[:2])(x[2:]).shape == (2, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="samples"):
        MAML(net, loss_fn=loss_fn, metric_fn=dice).meta_loss(x[:2], y[:3], x[2:], y[2:])


def test_second_order_under_cpu_bf16_autocast():
    torch.manual_seed(13)
    model = FewShotClassifier(ConvEncoder3D(features=(4, 8)), 8, 3, zero_init_head=False)
    learner = MAML(model, inner_lr=0.1, inner_steps=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = learner.meta_loss(*random_episode(size=8))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert metrics["loss"] == metrics["loss"]  # not NaN


@pytest.mark.parametrize(
    "episode, match",
    [
        ((torch.zeros(0, 1, 4, 4, 4), torch.zeros(0, dtype=torch.long)), "empty"),
        ((torch.zeros(6, 1, 4, 4, 4), torch.arange(3).repeat(3)), "samples"),
        ((torch.zeros(4, 1, 4, 4, 4), torch.tensor([0, 0, 2, 2])), "missing \\[1\\]"),
        ((torch.zeros(4, 1, 4, 4, 4), torch.tensor([0, 1, 1, -1])), "negative"),
    ],
)
def test_bad_support_raises(episode, match):
    model, _ = _net("conv")
    learner = MAML(model.float())
    with pytest.raises(ValueError, match=match):
        learner.adapt(*episode)


def test_bad_query_and_n_way_raise():
    model, _ = _net("conv")
    learner = MAML(model.float(), n_way=3)
    sx, sy, qx, qy = random_episode(size=4)
    with pytest.raises(ValueError, match="outside"):
        learner.meta_loss(sx, sy, qx, qy + 1)
    with pytest.raises(ValueError, match="query_x has"):
        learner.meta_loss(sx, sy, qx[:-1], qy)
    with pytest.raises(ValueError, match="channels"):
        learner.meta_loss(sx, sy, qx.repeat(1, 2, 1, 1, 1), qy)
    with pytest.raises(ValueError, match="head has 3 outputs"):
        learner.meta_loss(sx, torch.cat([sy[:-1], torch.tensor([3])]), qx, qy)  # 4 classes for a 3-wide head
    wide = MAML(FewShotClassifier(ConvEncoder3D(features=(2,)), 2, 2))
    with pytest.raises(ValueError, match="outputs 2 logits"):
        wide.meta_loss(sx, sy, qx, qy)
    for kwargs, match in [
        ({"inner_steps": 0}, "inner_steps"),
        ({"inner_lr": -1}, "inner_lr"),
        ({"batch_norm": "x"}, "batch_norm"),
    ]:
        with pytest.raises(ValueError, match=match):
            MAML(model, **kwargs)


@pytest.mark.parametrize("name", ["maml", "fomaml", "anil", "metasgd", "reptile"])
def test_narrower_episode_uses_the_first_outputs_of_the_head(name):
    """A head built for 3 classes serves a 2-way episode with its first 2 outputs: the same adapted predictions and
    meta-gradients as a 2-wide head holding those rows (the third row gets no gradient)."""
    from monai_metalearn.learners import Reptile

    make = {
        "maml": lambda m: MAML(m, inner_lr=0.3, inner_steps=2, n_way=m.head.out_features),
        "fomaml": lambda m: FOMAML(m, inner_lr=0.3, inner_steps=2, n_way=m.head.out_features),
        "anil": lambda m: ANIL(m, inner_lr=0.3, inner_steps=2, n_way=m.head.out_features),
        "metasgd": lambda m: MetaSGD(m, inner_lr=0.3, inner_steps=2, n_way=m.head.out_features),
        "reptile": lambda m: Reptile(m, inner_lr=0.3, inner_steps=2, n_way=m.head.out_features),
    }[name]
    torch.manual_seed(0)
    wide_net = SmoothNet(n_way=3).double()
    narrow_net = SmoothNet(n_way=2).double()
    with torch.no_grad():
        narrow_net.encoder.load_state_dict(wide_net.encoder.state_dict())
        narrow_net.head.weight.copy_(wide_net.head.weight[:2])
        narrow_net.head.bias.copy_(wide_net.head.bias[:2])
    wide, narrow = make(wide_net), make(narrow_net)
    sx, sy, qx, qy = random_episode(n_way=2, k_shot=2, n_query=3, size=3, dtype=torch.float64)
    out_wide, out_narrow = wide.adapt(sx, sy)(qx), narrow.adapt(sx, sy)(qx)
    assert out_wide.shape == (qx.shape[0], 2)
    torch.testing.assert_close(out_wide, out_narrow)
    if name == "reptile":
        return
    loss_wide, _ = wide.meta_loss(sx, sy, qx, qy)
    loss_narrow, _ = narrow.meta_loss(sx, sy, qx, qy)
    torch.testing.assert_close(loss_wide, loss_narrow)
    loss_wide.backward()
    loss_narrow.backward()
    torch.testing.assert_close(wide_net.head.weight.grad[:2], narrow_net.head.weight.grad)
    torch.testing.assert_close(wide_net.encoder[1].weight.grad, narrow_net.encoder[1].weight.grad)
    assert float(wide_net.head.weight.grad[2].abs().max()) == 0.0
