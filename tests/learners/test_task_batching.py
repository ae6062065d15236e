"""Batched tasks (``task_batching="vmap"``): the meta-batch as one ``torch.func.vmap`` gives the loop's meta-gradients,
updates and metrics, and every documented fallback to the loop happens (and is logged once).

Most comparisons run in float64, where the two paths agree to about 1e-14, so the 1e-5 relative tolerance has a wide
margin and a missing or extra term (e.g. a first-order update in a second-order learner: relative differences of
about 1e-1) cannot pass. One float32 case checks the precision users train in.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from monai_metalearn.errors import ConfigError
from monai_metalearn.learners import (
    ANIL,
    FOMAML,
    MAML,
    MetaSGD,
    Reptile,
    create_learner,
    create_segmentation_learner,
)
from monai_metalearn.learners.task_batching import TASK_BATCHING, batch_statistics_layers
from monai_metalearn.networks import ConvEncoder3D, FewShotClassifier

from .synthetic import TaskFamily
from .test_segmentation import blob_episode, tiny_unet

LOGGER = "monai_metalearn.learners.task_batching"

LEARNERS = {
    "maml": lambda m, **kw: MAML(m, inner_lr=0.3, inner_steps=2, **kw),
    "fomaml": lambda m, **kw: FOMAML(m, inner_lr=0.3, inner_steps=2, **kw),
    "anil": lambda m, **kw: ANIL(m, inner_lr=0.3, inner_steps=2, **kw),
    "metasgd": lambda m, **kw: MetaSGD(m, inner_lr=0.3, inner_steps=2, **kw),
    "reptile": lambda m, **kw: Reptile(m, inner_lr=0.1, inner_steps=2, epsilon=0.5, **kw),
    "reptile_opt": lambda m, **kw: Reptile(m, inner_lr=0.1, inner_steps=2, outer_update="optimizer", **kw),
}
#: second-order learners whose BatchNorm model falls back to the loop (see ``batch_statistics_layers``)
SECOND_ORDER = ("maml", "metasgd")


def _model(norm: str = "group", dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    enc = ConvEncoder3D(1, (4, 8), norm=norm, num_groups=2)
    return FewShotClassifier(enc, 8, 3, zero_init_head=False).to(dtype)


def _episodes(n_tasks: int = 3, dtype: torch.dtype = torch.float64, **kw) -> list[tuple]:
    """3-way 1-shot 2-query episodes of 8^3 volumes (``n_way``, ``k_shot``, ``n_query`` in ``kw``), seeded."""
    family = TaskFamily(size=8, seed=3)
    out = []
    for _ in range(n_tasks):
        sx, sy, qx, qy = family.episode(kw.get("n_way", 3), kw.get("k_shot", 1), kw.get("n_query", 2))
        out.append((sx.to(dtype), sy, qx.to(dtype), qy))
    return out


def _step(name: str, model: nn.Module, episodes: list, mode: str, **kw):
    """(learner, parameters after one step, gradients, metrics) of ``meta_batch_step`` from a copy of ``model``.

    MAML-family learners and ``reptile_opt`` step a zero-lr SGD (the gradients are the meta-gradients, the weights do
    not move); ``reptile`` interpolates (the weights move, no gradient)."""
    learner = LEARNERS[name](copy.deepcopy(model), task_batching=mode, **kw)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    metrics = learner.meta_batch_step(episodes, optimizer)
    params = {n: p.detach().clone() for n, p in learner.named_parameters()}
    grads = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
    return learner, params, grads, metrics


def _assert_close(ref: dict, got: dict, rtol: float = 1e-5) -> None:
    assert ref.keys() == got.keys() and ref
    for n in ref:
        scale = float(ref[n].abs().max())
        torch.testing.assert_close(got[n], ref[n], rtol=rtol, atol=rtol * scale, msg=lambda m, n=n: f"{n}: {m}")


def _compare(name: str, model: nn.Module, episodes: list, rtol: float = 1e-5, **kw):
    """Run the loop and vmap paths; assert equal parameters, gradients and metrics; return the vmap learner."""
    _, p_loop, g_loop, m_loop = _step(name, model, episodes, "loop", **kw)
    learner, p_vmap, g_vmap, m_vmap = _step(name, model, episodes, "vmap", **kw)
    if name != "reptile":
        assert sum(float(g.abs().sum()) for g in g_loop.values()) > 0  # a meta-gradient there is to compare
        _assert_close(g_loop, g_vmap, rtol)
    else:
        assert not g_loop and not g_vmap
        moved = max(float((p_loop[f"model.{n}"] - p.detach()).abs().max()) for n, p in model.named_parameters())
        assert moved > 1e-3
    _assert_close({n: p for n, p in p_loop.items()}, p_vmap, rtol)
    assert m_vmap.keys() == m_loop.keys() and m_loop["tasks"] == len(episodes)
    for k in m_loop:
        assert m_vmap[k] == pytest.approx(m_loop[k], rel=rtol, abs=1e-12), k
    return learner


# ------------------------------------------------------------------------------------------- vmap == loop
@pytest.mark.parametrize("name", list(LEARNERS))
def test_vmap_equals_loop_groupnorm(name):
    """GroupNorm network: vmap runs (no fallback) and matches the loop."""
    learner = _compare(name, _model("group"), _episodes())
    assert learner._task_batching.verified and learner._task_batching.failure is None


@pytest.mark.parametrize("name", list(LEARNERS))
def test_vmap_equals_loop_transductive_batchnorm(name, caplog):
    """BatchNorm in transductive mode: first-order learners (FOMAML, ANIL's head, Reptile) run under vmap with each
    task's own batch statistics; second-order MAML / Meta-SGD fall back to the loop (functorch's wrong double backward
    of batch_norm), logged once."""
    model = _model("batch")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        learner = _compare(name, model, _episodes())
        learner.meta_batch_step(_episodes(), torch.optim.SGD(learner.parameters(), lr=0.0))
    notes = [r.getMessage() for r in caplog.records if "BatchNorm3d" in r.getMessage()]
    if name in SECOND_ORDER:
        assert not learner._task_batching.verified
        assert len(notes) == 1 and "second-order" in notes[0]
    else:
        assert learner._task_batching.verified and not notes
    # running statistics are neither read nor updated
    bn = next(m for m in learner.model.modules() if isinstance(m, nn.BatchNorm3d))
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) and int(bn.num_batches_tracked) == 0


def test_anil_second_order_with_batchnorm_encoder_runs_under_vmap():
    """ANIL differentiates only its head twice: a BatchNorm encoder keeps the vmap path, and the second-order
    meta-gradient (which differs from the first-order one) matches the loop."""
    model, episodes = _model("batch"), _episodes()
    learner = _compare("anil", model, episodes)
    assert learner._task_batching.verified and not learner.first_order
    _, _, first, _ = _step("anil", model, episodes, "loop", first_order=True)
    _, _, second, _ = _step("anil", model, episodes, "loop")
    assert max(float((first[n] - second[n]).abs().max()) for n in first) > 1e-4


def test_vmap_equals_loop_float32():
    """In float32 the two paths differ by rounding only (measured: about 5e-6 of the largest gradient)."""
    _compare("maml", _model("group", torch.float32), _episodes(dtype=torch.float32), rtol=1e-4)


def test_batch_statistics_layers():
    assert batch_statistics_layers(_model("group")) == []
    assert batch_statistics_layers(_model("batch")) == ["BatchNorm3d"]
    assert batch_statistics_layers(_model("batch"), "frozen") == []
    assert batch_statistics_layers(_model("instance")) == ["InstanceNorm3d"]
    assert batch_statistics_layers(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))) == ["LayerNorm"]


# ------------------------------------------------------------------------------------------- fallbacks
@pytest.mark.parametrize("name", ["fomaml", "reptile"])
def test_unequal_episodes_fall_back_and_equal_the_loop(name, caplog):
    """Episodes of different shapes (1-shot and 2-shot) or different N (3-way 2-shot 2-query and 2-way 3-shot 3-query:
    the same shapes) cannot be stacked: the loop runs, logged once per kind of reason."""
    model = _model("group")
    shots = _episodes(2) + _episodes(1, k_shot=2)
    ways = _episodes(2, k_shot=2) + _episodes(1, n_way=2, k_shot=3, n_query=3)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        learner = _compare(name, model, shots)
        learner.meta_batch_step(shots, torch.optim.SGD(learner.parameters(), lr=0.0))
    notes = [r.getMessage() for r in caplog.records if "unequal" in r.getMessage()]
    assert len(notes) == 1 and "support_x" in notes[0] and not learner._task_batching.verified
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _compare(name, model, ways)
    assert any("unequal n_way" in r.getMessage() for r in caplog.records)


class _DataDependent(nn.Module):
    """A head with data-dependent control flow (``bool(tensor)``), which vmap cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(8**3, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        z = self.encoder(x)
        return self.head(z) if bool(z.sum() > -1e9) else -self.head(z)


def test_first_vmap_failure_falls_back_for_good(caplog):
    torch.manual_seed(0)
    model = _DataDependent().double()
    episodes = _episodes()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        learner = _compare("maml", model, episodes)
        state = learner._task_batching
        assert state.failure is not None and "RuntimeError" in state.failure and not state.verified
        before = learner.model.calls
        learner.meta_batch_step(episodes, torch.optim.SGD(learner.parameters(), lr=0.0))
        assert learner.model.calls - before == 3 * 3  # the loop: 2 inner steps + 1 query pass per task, no vmap try
    assert len([r for r in caplog.records if "vmap cannot run" in r.getMessage()]) == 1


def test_error_of_the_loop_too_is_raised_and_does_not_disable_vmap():
    """An error the loop raises as well (input of the wrong channel count) is the caller's, not vmap's."""
    learner = MAML(_model("group"), inner_lr=0.3, inner_steps=1, task_batching="vmap")
    bad = [(sx.repeat(1, 2, 1, 1, 1), sy, qx.repeat(1, 2, 1, 1, 1), qy) for sx, sy, qx, qy in _episodes()]
    with pytest.raises(RuntimeError):
        learner.meta_batch_step(bad, torch.optim.SGD(learner.parameters(), lr=0.0))
    assert learner._task_batching.failure is None
    learner.meta_batch_step(_episodes(), torch.optim.SGD(learner.parameters(), lr=0.0))
    assert learner._task_batching.verified


def test_malformed_episode_raises_value_error():
    learner = FOMAML(_model("group"), inner_lr=0.3, inner_steps=1, task_batching="vmap", n_way=3)
    sx, sy, qx, qy = _episodes(1)[0]
    with pytest.raises(ValueError, match="query_y has labels outside"):
        learner.meta_batch_step([(sx, sy, qx, qy), (sx, sy, qx, qy + 5)], torch.optim.SGD(learner.parameters(), 0.0))
    with pytest.raises(ValueError, match="at least one episode"):
        learner.meta_batch_step([], torch.optim.SGD(learner.parameters(), 0.0))


def test_reptile_adam_falls_back(caplog):
    model, episodes = _model("group"), _episodes()
    ref = Reptile(copy.deepcopy(model), inner_steps=2, inner_optimizer="adam", epsilon=0.5)
    ref.meta_batch_step(episodes)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        learner = Reptile(
            copy.deepcopy(model), inner_steps=2, inner_optimizer="adam", epsilon=0.5, task_batching="vmap"
        )
        learner.meta_batch_step(episodes)
    assert any("inner_optimizer='adam'" in r.getMessage() for r in caplog.records)
    for p, q in zip(ref.parameters(), learner.parameters()):
        assert torch.equal(p, q)


def test_float16_autocast_falls_back_and_bfloat16_stays_batched(caplog):
    """Under float16 autocast the loop runs (bitwise the loop's result); under bfloat16 vmap runs and agrees with the
    bfloat16 loop within bfloat16 rounding."""
    model, episodes = _model("group", torch.float32), _episodes(dtype=torch.float32)
    results = {}
    for dtype in (torch.float16, torch.bfloat16):
        for mode in ("loop", "vmap"):
            with caplog.at_level(logging.INFO, logger=LOGGER), torch.autocast("cpu", dtype=dtype):
                learner, _, grads, metrics = _step("maml", model, episodes, mode)
            results[dtype, mode] = (learner, grads, metrics)
    fp16 = results[torch.float16, "vmap"][0]._task_batching
    assert not fp16.verified and any("float16 autocast" in r.getMessage() for r in caplog.records)
    for n, g in results[torch.float16, "loop"][1].items():
        assert torch.equal(g, results[torch.float16, "vmap"][1][n])
    assert results[torch.bfloat16, "vmap"][0]._task_batching.verified
    loop = torch.cat([g.flatten() for g in results[torch.bfloat16, "loop"][1].values()])
    vmap = torch.cat([g.flatten() for g in results[torch.bfloat16, "vmap"][1].values()])
    assert float(torch.nn.functional.cosine_similarity(loop, vmap, dim=0)) > 0.999
    m_loop, m_vmap = results[torch.bfloat16, "loop"][2], results[torch.bfloat16, "vmap"][2]
    assert m_vmap["loss"] == pytest.approx(m_loop["loss"], rel=2e-2)


# ------------------------------------------------------------------------------------------- segmentation
@pytest.mark.parametrize("name", ["maml", "fomaml"])
def test_segmentation_learner_falls_back_and_equals_the_loop(name, caplog):
    """On the tiny MONAI UNet (InstanceNorm), second-order MAML falls back at once (InstanceNorm); FOMAML tries vmap,
    which cannot run ``SegmentationLoss`` (its ignore-label branch is data-dependent control flow, and MONAI's one-hot
    writes in place), and falls back for good. Both equal the loop."""
    gen = torch.Generator().manual_seed(0)
    episodes = [blob_episode(gen, k_shot=1, n_query=1, size=12) for _ in range(2)]
    torch.manual_seed(0)
    backbone = tiny_unet(4)
    results = {}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for mode in ("loop", "vmap"):
            torch.manual_seed(1)  # the same head
            learner = create_segmentation_learner(
                name, copy.deepcopy(backbone), 4, inner_lr=0.5, inner_steps=1, task_batching=mode
            )
            metrics = learner.meta_batch_step(episodes, torch.optim.SGD(learner.parameters(), lr=0.0))
            results[mode] = (learner, {n: p.grad.clone() for n, p in learner.named_parameters()}, metrics)
    state = results["vmap"][0]._task_batching
    assert not state.verified
    reason = "InstanceNorm3d" if name == "maml" else "vmap cannot run"
    assert any(reason in r.getMessage() for r in caplog.records)
    assert (state.failure is not None) == (name == "fomaml")
    for n, g in results["loop"][1].items():
        torch.testing.assert_close(results["vmap"][1][n], g, rtol=1e-5, atol=1e-7)
    assert results["vmap"][2] == pytest.approx(results["loop"][2])


# ------------------------------------------------------------------------------------------- the option
@pytest.mark.parametrize("cls", [MAML, FOMAML, ANIL, MetaSGD, Reptile])
def test_invalid_task_batching_raises(cls):
    with pytest.raises(ConfigError, match=r"task_batching must be one of \('loop', 'vmap', 'auto'\), got 'batch'"):
        cls(_model("group"), task_batching="batch")
    learner = cls(_model("group"))
    assert learner.task_batching == "loop"
    with pytest.raises(ValueError, match="task_batching"):
        learner.task_batching = "parallel"
    learner.task_batching = "vmap"
    assert learner.task_batching == "vmap" and learner._task_batching.wants_vmap


@pytest.mark.parametrize("cls", [MAML, FOMAML, ANIL, MetaSGD, Reptile])
def test_auto_is_the_measured_default(cls):
    assert cls.AUTO_TASK_BATCHING in ("loop", "vmap")
    learner = cls(_model("group"), task_batching="auto")
    assert learner._task_batching.wants_vmap == (cls.AUTO_TASK_BATCHING == "vmap")
    assert TASK_BATCHING == ("loop", "vmap", "auto")


def test_factories_pass_task_batching_through():
    learner = create_learner("fomaml", ConvEncoder3D(1, (4,), num_groups=2), 4, 3, inner_lr=0.1, task_batching="vmap")
    assert learner.task_batching == "vmap"
    with pytest.raises(ConfigError, match="task_batching"):
        create_learner("reptile", ConvEncoder3D(1, (4,), num_groups=2), 4, 3, task_batching="nope")
    seg = create_segmentation_learner("anil", tiny_unet(4), 4, task_batching="auto")
    assert seg.task_batching == "auto"


def test_checkpointed_inner_steps_fall_back_to_the_loop(caplog):
    """Second-order MAML with checkpointed inner steps (the memory option) runs as the loop, which checkpoints, and
    gives the loop's meta-gradients; the reason is logged."""
    model, episodes = _model("group"), _episodes()
    _, _, g_loop, _ = _step("maml", model, episodes, "loop")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        learner = LEARNERS["maml"](copy.deepcopy(model), task_batching="vmap")
        learner.checkpoint_inner_steps = True
        learner.meta_batch_step(episodes, torch.optim.SGD(learner.parameters(), lr=0.0))
    assert any("checkpoint_inner_steps" in r.getMessage() for r in caplog.records)
    assert not learner._task_batching.verified
    _assert_close(g_loop, {n: p.grad for n, p in learner.named_parameters() if p.grad is not None})
