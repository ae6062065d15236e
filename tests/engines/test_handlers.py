"""MONAI and ignite handlers, unchanged, on the meta engines: checkpoint/resume, validation, early stopping."""

from __future__ import annotations

import copy

import torch
from ignite.engine import Events
from ignite.handlers import EarlyStopping
from monai.handlers import CheckpointLoader, CheckpointSaver, StatsHandler, ValidationHandler

from monai_metalearn.engines import MetaEvaluator, MetaTrainer
from tests.engines.fakes import EpisodeList, TinyProtoNet

EPISODES_PER_EPOCH = 2


def _trainer(learner, optimizer, max_epochs, handlers=()):
    return MetaTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=EpisodeList(EPISODES_PER_EPOCH, seed=3),
        learner=learner,
        optimizer=optimizer,
        train_handlers=list(handlers),
    )


def _fresh(seed: int):
    torch.manual_seed(seed)
    learner = TinyProtoNet()
    return learner, torch.optim.Adam(learner.parameters(), 1e-2)


def _assert_nested_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_nested_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_nested_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_checkpoint_resume_continues_like_an_uninterrupted_run(tmp_path):
    # first part: 4 iterations (2 epochs), checkpoint every epoch
    learner, opt = _fresh(0)
    trainer = _trainer(learner, opt, max_epochs=2)
    saver = CheckpointSaver(
        str(tmp_path),
        save_dict={"learner": learner, "optimizer": opt, "trainer": trainer},
        save_interval=1,
        n_saved=1,
    )
    saver.attach(trainer)
    trainer.run()
    assert trainer.state.iteration == 4
    ckpts = list(tmp_path.glob("*.pt"))
    assert [p.name for p in ckpts] == ["checkpoint_epoch=2.pt"]
    saved = torch.load(ckpts[0], weights_only=True)
    assert saved["trainer"]["iteration"] == 4 and saved["trainer"]["episode"] == 4

    # resume in a new process-like setting: other initial weights, new optimizer, trainer and loader
    learner2, opt2 = _fresh(123)
    trainer2 = _trainer(learner2, opt2, max_epochs=4)
    loader = CheckpointLoader(str(ckpts[0]), {"learner": learner2, "optimizer": opt2, "trainer": trainer2})
    loader.attach(trainer2)
    at_start = {}

    @trainer2.on(Events.STARTED)
    def _after_load(engine):  # runs after the loader (handlers fire in attach order)
        at_start["iteration"], at_start["episode"] = engine.state.iteration, engine.state.episode
        at_start["optimizer"] = copy.deepcopy(opt2.state_dict())  # live tensors move on during training

    iterations = []
    trainer2.add_event_handler(Events.ITERATION_STARTED, lambda e: iterations.append(e.state.iteration))
    trainer2.run()
    assert at_start["iteration"] == 4 and at_start["episode"] == 4
    _assert_nested_equal(at_start["optimizer"], saved["optimizer"])
    assert iterations == [5, 6, 7, 8]
    assert trainer2.state.iteration == 8 and trainer2.state.episode == 8 and trainer2.state.epoch == 4

    # the same 8 iterations without interruption
    learner3, opt3 = _fresh(0)
    _trainer(learner3, opt3, max_epochs=4).run()
    for (k, a), b in zip(learner3.state_dict().items(), learner2.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    _assert_nested_equal(opt2.state_dict()["state"][0]["step"], opt3.state_dict()["state"][0]["step"])


def test_checkpoint_without_episode_key_resumes_from_iteration(tmp_path):
    learner, opt = _fresh(0)
    trainer = _trainer(learner, opt, max_epochs=3)
    trainer.load_state_dict({"iteration": 2, "epoch_length": EPISODES_PER_EPOCH, "max_epochs": 3})
    assert trainer.state.episode == 2 and trainer.state.epoch == 1


def test_validation_handler_runs_meta_validation():
    torch.manual_seed(0)
    learner = TinyProtoNet()
    evaluator = MetaEvaluator("cpu", EpisodeList(4, seed=9), learner, val_handlers=[StatsHandler(iteration_log=False)])
    runs = []
    evaluator.add_event_handler(Events.COMPLETED, lambda e: runs.append((e.state.epoch, e.state.metrics["accuracy"])))
    trainer = MetaTrainer(
        "cpu",
        3,
        EpisodeList(3, seed=1),
        learner,
        torch.optim.Adam(learner.parameters(), 1e-2),
        train_handlers=[ValidationHandler(validator=evaluator, interval=1)],
    )
    trainer.run()
    assert [r[0] for r in runs] == [1, 2, 3]
    assert evaluator.state.metrics["n_episodes"] == 4
    assert 1 <= evaluator.state.best_metric_epoch <= 3
    assert learner.training  # evaluation restored the learner's mode for the next training epoch


def test_early_stopping_on_validation_accuracy():
    torch.manual_seed(0)
    learner = TinyProtoNet()
    evaluator = MetaEvaluator("cpu", EpisodeList(3, seed=9), learner)
    trainer = MetaTrainer(
        "cpu",
        10,
        EpisodeList(2, seed=1),
        learner,
        torch.optim.SGD(learner.parameters(), lr=0.0),  # no progress: accuracy never improves
        train_handlers=[ValidationHandler(validator=evaluator, interval=1)],
    )
    stopper = EarlyStopping(patience=2, score_function=lambda e: e.state.metrics["accuracy"], trainer=trainer)
    evaluator.add_event_handler(Events.COMPLETED, stopper)
    trainer.run()
    assert trainer.state.epoch == 3  # best at epoch 1, no improvement at 2 and 3 -> stop
    assert trainer.state.iteration == 6
