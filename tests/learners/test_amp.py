"""Mixed precision of the learners (:mod:`monai_metalearn.learners.precision`) on real CT patches (AdrenalMNIST3D).

* bfloat16 twin (CPU, runs everywhere): MAML / FOMAML / Meta-SGD meta-gradients and Reptile / fine-tuning adaptation
  under ``torch.autocast("cpu", dtype=torch.bfloat16)`` agree with float32;
* float16 inner loops (CPU float16 autocast): inner gradients below float16's smallest subnormal are flushed to zero
  without the inner loss scale and recovered with it; an overflowing step is recomputed in float32; second-order
  meta-gradients agree with float32;
* autocast is never active in a backward pass, through ``MetaTrainer(amp=True)`` and ``MetaEvaluator(amp=True)``;
* CUDA (skipped without a GPU): float16 AMP meta-gradients (through a ``GradScaler``) agree with float32.

Tolerances are about twice the measured errors, for the package's zero-initialised head: bfloat16 keeps 8 mantissa
bits, so a meta-gradient is off by about 3-4 % (cosine similarity above 0.999); float16 with the inner loss scale by
about 1 %. (With a randomly initialised head the query gradient at the adapted weights is itself that sensitive: a
float32 query gradient at weights adapted in bfloat16 is off by 10 %, whatever the inner loop does.)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monai_metalearn.engines import MetaEvaluator, MetaTrainer, resolve_amp_dtype
from monai_metalearn.errors import ConfigError
from monai_metalearn.learners import ANIL, FOMAML, MAML, FineTuneBaseline, MetaSGD, ProtoNet, Reptile
from monai_metalearn.learners.precision import (
    InnerLossScaler,
    amp_scope,
    default_amp_dtype,
    forward_autocast,
    inner_grads,
)
from monai_metalearn.networks import ConvEncoder3D, FewShotClassifier
from tests.engines.fakes import EpisodeList

BF16_COS, BF16_REL = 0.99, 0.1  # measured: cosine >= 0.999, relative error 0.03-0.045
FP16_COS, FP16_REL = 0.999, 0.03  # measured: cosine >= 0.9999, relative error 0.006-0.01
FP16_TINY = 2.0**-24  # float16's smallest subnormal, about 6e-8


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def episode(data_dir: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A 2-way 3-shot 5-query episode of real adrenal CT patches (AdrenalMNIST3D train split), 14^3 voxels."""
    path = data_dir / "medmnist3d" / "adrenalmnist3d.npz"
    if not path.is_file():
        pytest.skip(f"{path} is not there")
    data = np.load(path)
    x = torch.from_numpy(data["train_images"][:, None].astype(np.float32) / 255.0)
    y = torch.from_numpy(data["train_labels"][:, 0].astype(np.int64))
    x = F.avg_pool3d(x, 2, ceil_mode=True)
    first = [torch.nonzero(y == c)[:8, 0] for c in (0, 1)]
    sx = torch.cat([x[i[:3]] for i in first])
    qx = torch.cat([x[i[3:8]] for i in first])
    return sx, torch.tensor([0, 0, 0, 1, 1, 1]), qx, torch.tensor([0] * 5 + [1] * 5)


def _model(zero_init_head: bool = True) -> FewShotClassifier:
    torch.manual_seed(0)
    encoder = ConvEncoder3D(in_channels=1, features=(8, 16), norm="group", num_groups=4)
    return FewShotClassifier(encoder, feature_dim=16, n_way=2, zero_init_head=zero_init_head)


def _flat(tensors) -> Tensor:
    return torch.cat([t.detach().float().flatten() for t in tensors])


def _compare(ref: Tensor, other: Tensor) -> tuple[float, float]:
    """Cosine similarity and relative error (``|other - ref| / |ref|``) of two flat vectors."""
    assert float(ref.norm()) > 0
    return float(F.cosine_similarity(ref, other, dim=0)), float((other - ref).norm() / ref.norm())


def _meta_grad(learner: nn.Module, ep, dtype: torch.dtype | None, outer_scale: float = 1.0) -> Tensor:
    """The meta-gradient of one episode: meta-loss under CPU autocast ``dtype`` (none for float32), backward
    outside autocast (with the outer loss multiplied by ``outer_scale`` and the gradient divided by it)."""
    learner.zero_grad(set_to_none=True)
    if dtype is None:
        loss, _ = learner.meta_loss(*ep)
    else:
        with torch.autocast("cpu", dtype=dtype):
            loss, _ = learner.meta_loss(*ep)
    (loss.float() * outer_scale).backward()
    return _flat(p.grad / outer_scale for p in learner.parameters() if p.grad is not None)


def _delta(learner, adapted: dict[str, Tensor]) -> dict[str, Tensor]:
    """Adapted minus initial weights, per parameter."""
    initial = dict(learner.model.named_parameters())
    return {n: (adapted[n] - initial[n]).detach() for n in initial if n in adapted}


# ------------------------------------------------------------------------------------------- bfloat16 twin (CPU)
@pytest.mark.parametrize("cls", [MAML, FOMAML, MetaSGD, ANIL])
def test_bf16_meta_gradient_matches_fp32(episode, cls):
    learner = cls(_model(), inner_lr=0.1, inner_steps=2)
    ref = _meta_grad(learner, episode, None)
    bf16 = _meta_grad(learner, episode, torch.bfloat16)
    cos, rel = _compare(ref, bf16)
    assert cos > BF16_COS and rel < BF16_REL, (cos, rel)
    assert not torch.equal(ref, bf16)  # the forward really ran in bfloat16


def test_bf16_reptile_adaptation_matches_fp32(episode):
    """5 SGD steps on the support set: the weight change and the query prediction agree with float32, every
    parameter moves (autocast's weight cache would otherwise keep the in-place updated fast weights at their first
    value: encoder and bias changes would all be zero, relative error 1)."""
    sx, sy, qx, _ = episode
    learner = Reptile(_model(), inner_lr=0.5, inner_steps=5)
    ref = _delta(learner, learner.adapted_weights(sx, sy))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _delta(learner, learner.adapted_weights(sx, sy))
    cos, rel = _compare(_flat(ref.values()), _flat(bf16.values()))
    assert cos > BF16_COS and rel < BF16_REL, (cos, rel)
    for n in ref:  # measured at most 0.11
        assert float((bf16[n] - ref[n]).norm() / ref[n].norm()) < 0.3, n
    p32 = learner.adapt(sx, sy)(qx).float().softmax(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pbf = learner.adapt(sx, sy)(qx).float().softmax(1)
    assert float((p32 - pbf).abs().max()) < 0.01  # measured 0.0016


def test_bf16_finetune_adaptation_matches_fp32(episode):
    """The head is fitted in float32 on features embedded under bfloat16: head and query probabilities agree."""
    sx, sy, qx, _ = episode
    torch.manual_seed(0)
    learner = FineTuneBaseline(ConvEncoder3D(in_channels=1, features=(8, 16), norm="group", num_groups=4), 16, 4,
                               finetune_steps=50, finetune_lr=0.1)
    torch.manual_seed(1)
    ref = learner.adapt(sx, sy)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = learner.adapt(sx, sy)
        pbf = bf16(qx).float().softmax(1)
    assert all(p.dtype == torch.float32 for p in bf16.head.parameters())
    cos, rel = _compare(_flat(ref.head.parameters()), _flat(bf16.head.parameters()))
    assert cos > BF16_COS and rel < BF16_REL, (cos, rel)
    assert float((ref(qx).softmax(1) - pbf).abs().max()) < 0.05  # measured 0.02


# ------------------------------------------------------------------------------------------- float16 inner loops
def _tiny_loss(weight: float):
    def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
        return weight * F.cross_entropy(logits.float(), y)

    return loss_fn


def _support_grads(model: nn.Module, sx: Tensor, sy: Tensor, weight: float, dtype, scaler) -> list[Tensor]:
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}

    def closure() -> Tensor:
        return _tiny_loss(weight)(torch.func.functional_call(model, params, (sx,)), sy)

    if dtype is None:
        return inner_grads(closure, list(params.values()), scaler=scaler)[1]
    with torch.autocast("cpu", dtype=dtype):
        return inner_grads(closure, list(params.values()), scaler=scaler)[1]


def test_fp16_inner_gradients_below_the_subnormal_range_are_recovered(episode):
    """A support loss of ``1e-7 * CE``: its gradients (about 1e-9) are below float16's smallest subnormal, so the
    unscaled float16 backward flushes every one of them to zero; with the inner loss scale they match float32."""
    sx, sy, _, _ = episode
    model = _model(zero_init_head=False)  # every parameter has a gradient
    ref = _flat(_support_grads(model, sx, sy, 1e-7, None, InnerLossScaler()))
    assert 0 < float(ref.abs().max()) < FP16_TINY
    naive = _flat(_support_grads(model, sx, sy, 1e-7, torch.float16, InnerLossScaler(enabled=False)))
    assert float(naive.abs().max()) == 0.0
    scaler = InnerLossScaler()
    scaled = _flat(_support_grads(model, sx, sy, 1e-7, torch.float16, scaler))
    cos, rel = _compare(ref, scaled)
    assert cos > FP16_COS and rel < FP16_REL, (cos, rel)
    assert scaler.fallbacks == 0 and scaler.scale == 2.0**16


@pytest.mark.parametrize("cls", [MAML, MetaSGD, Reptile])
def test_fp16_adaptation_with_tiny_gradients_matches_fp32(episode, cls):
    """End to end through ``adapt``: ``1e-7 * CE`` with an inner step size of ``1e6`` is an ordinary adaptation in
    float32; under float16 autocast the unscaled inner loop does not move at all, the scaled one matches float32."""
    sx, sy, _, _ = episode
    learner = cls(_model(), inner_lr=1e6, inner_steps=2, loss_fn=_tiny_loss(1e-7))

    def delta() -> Tensor:
        predictor = learner.adapt(sx, sy)
        return _flat(_delta(learner, predictor.adapted).values())

    ref = delta()
    learner.inner_scaler = InnerLossScaler(enabled=False)
    with torch.autocast("cpu", dtype=torch.float16):
        naive = delta()
    assert float(naive.abs().max()) == 0.0
    learner.inner_scaler = InnerLossScaler()
    with torch.autocast("cpu", dtype=torch.float16):
        scaled = delta()
    cos, rel = _compare(ref, scaled)
    # measured 0.9995 and 0.033: scaled by 2^16, the smallest activation gradients are still float16 subnormals
    assert cos > FP16_COS and rel < 0.06, (cos, rel)


def test_fp16_overflowing_step_is_recomputed_in_fp32(episode):
    """``1e4 * CE`` scaled by 2^16 overflows float16: that step's gradients are the float32 ones, the scale halves."""
    sx, sy, _, _ = episode
    model = _model(zero_init_head=False)
    ref = _support_grads(model, sx, sy, 1e4, None, None)
    scaler = InnerLossScaler()
    grads = _support_grads(model, sx, sy, 1e4, torch.float16, scaler)
    assert scaler.fallbacks == 1 and scaler.scale == 2.0**15
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    # the same loss without the factor fits float16 at the lowered scale
    _support_grads(model, sx, sy, 1.0, torch.float16, scaler)
    assert scaler.fallbacks == 1


@pytest.mark.parametrize("cls", [MAML, FOMAML, MetaSGD, ANIL])
def test_fp16_meta_gradient_matches_fp32(episode, cls):
    """Second order (MAML, Meta-SGD, ANIL) runs its support passes in float32 under float16 autocast (ANIL's head on
    the features embedded in float16): scaling the inner loss would pass the outer gradient divided by the scale
    through a float16 graph (measured relative error 0.95)."""
    learner = cls(_model(), inner_lr=0.1, inner_steps=2)
    ref = _meta_grad(learner, episode, None)
    fp16 = _meta_grad(learner, episode, torch.float16, outer_scale=2.0**16)
    cos, rel = _compare(ref, fp16)
    assert cos > FP16_COS and rel < FP16_REL, (cos, rel)


def test_inner_loss_scaler_grows_and_backs_off():
    scaler = InnerLossScaler(init_scale=8.0, growth_interval=2, min_scale=2.0, max_scale=16.0)
    scaler.update(True)
    assert scaler.scale == 8.0
    scaler.update(True)
    assert scaler.scale == 16.0
    scaler.update(True), scaler.update(True)
    assert scaler.scale == 16.0  # max_scale
    for expected in (8.0, 4.0, 2.0, 2.0):  # min_scale
        scaler.update(False)
        assert scaler.scale == expected
    assert scaler.fallbacks == 4
    with pytest.raises(ConfigError, match="init_scale=100.0 is outside"):
        InnerLossScaler(init_scale=100.0, max_scale=10.0)
    with pytest.raises(ConfigError, match="backoff_factor"):
        InnerLossScaler(backoff_factor=1.5)


def test_default_amp_dtype(monkeypatch):
    assert default_amp_dtype("cpu") == torch.bfloat16
    assert resolve_amp_dtype(torch.device("cpu")) == torch.bfloat16
    assert resolve_amp_dtype(torch.device("cpu"), "float16") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_amp_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_amp_dtype("cuda:0") == torch.float16
    assert resolve_amp_dtype(torch.device("cuda")) == torch.float16


def test_amp_scope_enables_autocast_only_in_forward_autocast():
    with amp_scope(True, "cpu", torch.bfloat16):
        assert not torch.is_autocast_enabled("cpu")
        with forward_autocast():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            with amp_scope(False, "cpu", torch.bfloat16), forward_autocast():
                assert torch.is_autocast_enabled("cpu")  # an enclosing autocast stays in force
        with amp_scope(False, "cpu", torch.bfloat16), forward_autocast():
            assert not torch.is_autocast_enabled("cpu")
    with forward_autocast():
        assert not torch.is_autocast_enabled("cpu")


# ------------------------------------------------------------------------------------- no autocast in backward
class _Record(torch.autograd.Function):
    """Identity that records whether CPU autocast is on in its forward and in its backward."""

    log: dict[str, list[bool]] = {"forward": [], "backward": []}

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        _Record.log["forward"].append(torch.is_autocast_enabled("cpu"))
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        _Record.log["backward"].append(torch.is_autocast_enabled("cpu"))
        return grad


class _Probe(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _Record.apply(x)


def _probed_encoder() -> nn.Module:
    return nn.Sequential(ConvEncoder3D(in_channels=1, features=(4, 8), norm="group", num_groups=2), _Probe())


def _probed(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "protonet":
        return ProtoNet(_probed_encoder())
    if name == "finetune":
        return FineTuneBaseline(_probed_encoder(), 8, n_base_classes=3, finetune_steps=2)
    model = FewShotClassifier(_probed_encoder(), feature_dim=8, n_way=3, zero_init_head=False)
    return {"maml": MAML, "fomaml": FOMAML, "metasgd": MetaSGD, "reptile": Reptile}[name](model, inner_steps=2)


def _reset_log() -> None:
    _Record.log["forward"].clear()
    _Record.log["backward"].clear()


def test_probe_sees_autocast_in_a_backward_pass_under_autocast():
    """The probe works: a backward pass run inside ``torch.autocast`` (what the trainer did before) records True."""
    _reset_log()
    x = torch.randn(2, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _Record.apply(x).sum().backward()
    assert _Record.log == {"forward": [True], "backward": [True]}


@pytest.mark.parametrize("name", ["maml", "fomaml", "metasgd", "reptile", "protonet", "finetune"])
def test_trainer_amp_never_autocasts_backward(name):
    learner = _probed(name)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    trainer = MetaTrainer("cpu", 1, EpisodeList(2, seed=1), learner, torch.optim.SGD(learner.parameters(), 0.1),
                          amp=True)
    _reset_log()
    trainer.run()
    log = dict(_Record.log)
    assert math.isfinite(trainer.state.output[0]["loss"])
    assert log["forward"] and all(log["forward"]), log  # the forward passes ran under autocast
    assert log["backward"] and not any(log["backward"]), log  # no backward pass did (inner ones included)
    assert any(not torch.equal(v, before[k]) for k, v in learner.state_dict().items())


@pytest.mark.parametrize("name", ["maml", "reptile", "finetune"])
def test_evaluator_amp_never_autocasts_backward(name):
    learner = _probed(name)
    evaluator = MetaEvaluator("cpu", EpisodeList(2, seed=7), learner, amp=True)
    _reset_log()
    evaluator.run()
    log = dict(_Record.log)
    assert 0.0 <= evaluator.state.metrics["accuracy"] <= 1.0
    assert log["forward"] and all(log["forward"]), log
    if name != "finetune":  # the fine-tuning head fit does not reach the encoder
        assert log["backward"] and not any(log["backward"]), log


def test_outer_step_under_callers_autocast_backward_outside(episode):
    """A caller that wraps the whole step in ``torch.autocast`` (the pattern the engines used) still gets its
    backward pass and optimizer step without autocast."""
    learner = FOMAML(FewShotClassifier(_probed_encoder(), feature_dim=8, n_way=2, zero_init_head=False),
                     inner_steps=1)
    _reset_log()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        learner.outer_step(*episode, torch.optim.SGD(learner.parameters(), 0.1))
    assert all(_Record.log["forward"]) and _Record.log["backward"] and not any(_Record.log["backward"])


# -------------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("cls", [MAML, FOMAML, MetaSGD, Reptile])
def test_cuda_fp16_amp_matches_fp32(episode, cls):
    """float16 AMP on the GPU as ``MetaTrainer`` runs it (``amp_scope`` + ``GradScaler``): the meta-gradient (the
    Reptile update for Reptile) agrees with float32 within the float16 tolerance."""
    sx, sy, qx, qy = (t.cuda() for t in episode)
    learner = cls(_model().cuda(), inner_lr=0.1, inner_steps=2)
    if cls is Reptile:
        ref = _flat(_delta(learner, learner.adapted_weights(sx, sy)).values())
        with amp_scope(True, "cuda", torch.float16):
            fp16 = _flat(_delta(learner, learner.adapted_weights(sx, sy)).values())
    else:
        opt = torch.optim.SGD(learner.parameters(), lr=0.0)
        loss, _ = learner.meta_loss(sx, sy, qx, qy)
        loss.backward()
        ref = _flat(p.grad for p in learner.parameters() if p.grad is not None)
        scaler = torch.amp.GradScaler("cuda")
        with amp_scope(True, "cuda", torch.float16):
            learner.outer_step(sx, sy, qx, qy, opt, scaler=scaler)  # scaler.step unscales the gradients in place
        assert scaler.get_scale() == 2.0**16  # no overflow, the step was taken
        fp16 = _flat(p.grad for p in learner.parameters() if p.grad is not None)
    cos, rel = _compare(ref, fp16)
    assert cos > FP16_COS and rel < 0.05, (cos, rel)
