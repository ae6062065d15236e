"""The engines with the package's learners (ProtoNet, MAML, FOMAML, Reptile) on a small ConvEncoder3D."""

from __future__ import annotations

import math

import pytest
import torch
from monai.handlers import CheckpointLoader, CheckpointSaver

from monai_metalearn.engines import MetaEvaluator, MetaTrainer
from tests.engines.fakes import EpisodeList

learners = pytest.importorskip("monai_metalearn.learners")
networks = pytest.importorskip("monai_metalearn.networks")


def _encoder() -> torch.nn.Module:
    return networks.ConvEncoder3D(in_channels=1, features=(4, 8), norm="group", num_groups=2)


def _make(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "protonet":
        return learners.ProtoNet(_encoder())
    model = networks.FewShotClassifier(_encoder(), feature_dim=8, n_way=3)
    if name == "maml":
        return learners.MAML(model, inner_lr=0.1, inner_steps=1)
    if name == "fomaml":
        return learners.FOMAML(model, inner_lr=0.1, inner_steps=1)
    if name == "reptile":
        return learners.Reptile(model)
    raise ValueError(name)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ["protonet", "maml", "fomaml", "reptile"])
def test_train_then_evaluate_leaves_weights_unchanged(name):
    learner = _make(name)
    trainer = MetaTrainer("cpu", 1, EpisodeList(3, seed=1), learner, torch.optim.Adam(learner.parameters(), 1e-3))
    trainer.run()
    assert trainer.state.episode == 3
    assert math.isfinite(trainer.state.output[0]["loss"]) and "accuracy" in trainer.state.output[0]
    saved = _state(learner)
    evaluator = MetaEvaluator("cpu", EpisodeList(3, seed=7), learner)
    evaluator.run()
    m = evaluator.state.metrics
    assert m["n_episodes"] == 3 and 0.0 <= m["accuracy"] <= 1.0
    assert set(evaluator.state.per_class) <= {f"class{c}" for c in range(8)}
    for k, v in learner.state_dict().items():
        assert torch.equal(v, saved[k]), k


@pytest.mark.parametrize("name", ["maml", "reptile"])
def test_meta_batches(name):
    learner = _make(name)
    trainer = MetaTrainer(
        "cpu", 1, EpisodeList(2, seed=1, meta_batch_size=2), learner, torch.optim.SGD(learner.parameters(), 1e-3)
    )
    trainer.run()
    assert trainer.state.iteration == 2 and trainer.state.episode == 4
    assert math.isfinite(trainer.state.output[0]["loss"])


@pytest.mark.parametrize("name", ["protonet", "fomaml"])
def test_amp_cpu_bfloat16(name):
    learner = _make(name)
    before = _state(learner)
    trainer = MetaTrainer(
        "cpu", 1, EpisodeList(2, seed=1), learner, torch.optim.Adam(learner.parameters(), 1e-3), amp=True
    )
    trainer.run()
    assert math.isfinite(trainer.state.output[0]["loss"])
    assert any(not torch.equal(v, before[k]) for k, v in learner.state_dict().items())
    evaluator = MetaEvaluator("cpu", EpisodeList(2, seed=7), learner, amp=True)
    evaluator.run()
    assert 0.0 <= evaluator.state.metrics["accuracy"] <= 1.0


def test_resume_with_maml(tmp_path):
    learner = _make("maml")
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    trainer = MetaTrainer("cpu", 1, EpisodeList(2, seed=1), learner, opt)
    CheckpointSaver(str(tmp_path), {"learner": learner, "optimizer": opt, "trainer": trainer}, save_final=True).attach(
        trainer
    )
    trainer.run()
    (ckpt,) = tmp_path.glob("*.pt")
    learner2 = _make("maml")
    opt2 = torch.optim.Adam(learner2.parameters(), 1e-3)
    trainer2 = MetaTrainer("cpu", 2, EpisodeList(2, seed=1), learner2, opt2)
    CheckpointLoader(str(ckpt), {"learner": learner2, "optimizer": opt2, "trainer": trainer2}).attach(trainer2)
    trainer2.run()
    assert trainer2.state.iteration == 4 and trainer2.state.episode == 4
