"""MetaTrainer: learning on the fake task, meta-batches, output format for MONAI handlers, AMP."""

from __future__ import annotations

import logging
import statistics
import warnings

import pytest
import torch
from ignite.engine import Events
from monai.handlers import StatsHandler, TensorBoardStatsHandler, from_engine

from monai_metalearn.engines import MetaTrainer, default_device, default_prepare_episode
from tests.engines.fakes import EpisodeList, TinyMAML, TinyProtoNet, make_episode


def _record_losses(trainer: MetaTrainer) -> list[float]:
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output[0]["loss"]))
    return losses


def test_default_device():
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_prepare_episode_drops_collate_batch_dim():
    ep = make_episode(0)
    collated = {k: (v[None] if isinstance(v, torch.Tensor) else v) for k, v in ep.items()}
    sx, sy, qx, qy = default_prepare_episode(collated, "cpu")
    assert sx.shape == ep["support_image"].shape and qy.shape == ep["query_label"].shape
    with pytest.raises(KeyError, match="query_label"):
        default_prepare_episode({k: v for k, v in ep.items() if k != "query_label"}, "cpu")


def test_loss_falls_and_episode_count():
    torch.manual_seed(0)
    learner = TinyProtoNet()
    trainer = MetaTrainer(
        device="cpu",
        max_epochs=2,
        train_data_loader=EpisodeList(20, seed=1),
        learner=learner,
        optimizer=torch.optim.Adam(learner.parameters(), 1e-2),
    )
    losses = _record_losses(trainer)
    trainer.run()
    assert trainer.state.iteration == 40 and trainer.state.episode == 40 and trainer.state.epoch == 2
    assert statistics.mean(losses[-10:]) < 0.5 * statistics.mean(losses[:10])
    out = trainer.state.output
    assert isinstance(out, list) and len(out) == 1
    assert isinstance(out[0]["loss"], float) and 0.0 <= out[0]["accuracy"] <= 1.0
    assert from_engine(["loss"], first=True)(out) == out[0]["loss"]


def test_meta_batch_uses_meta_batch_step():
    torch.manual_seed(0)
    learner = TinyProtoNet()
    trainer = MetaTrainer(
        "cpu", 1, EpisodeList(3, seed=1, meta_batch_size=4), learner, torch.optim.SGD(learner.parameters(), 0.01)
    )
    trainer.run()
    assert learner.meta_batch_calls == 3
    assert trainer.state.iteration == 3 and trainer.state.episode == 12
    assert len(trainer.state.output) == 4 and trainer.state.output[0] == trainer.state.output[3]


def test_second_run_restarts_episode_count():
    learner = TinyProtoNet()
    trainer = MetaTrainer("cpu", 1, EpisodeList(2), learner, torch.optim.SGD(learner.parameters(), 0.01))
    trainer.run()
    trainer.run()  # finished -> ignite restarts from iteration 0
    assert trainer.state.iteration == 2 and trainer.state.episode == 2


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_stats_handler_prints_loss():
    learner = TinyProtoNet()
    logger = logging.getLogger("metatrainer_test")
    capture = _ListHandler()
    logger.addHandler(capture)
    handler = StatsHandler(name="metatrainer_test", output_transform=from_engine(["loss"], first=True))
    trainer = MetaTrainer(
        "cpu", 1, EpisodeList(3), learner, torch.optim.SGD(learner.parameters(), 0.01), train_handlers=[handler]
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.run()
    finally:
        logger.removeHandler(capture)
    assert not [w for w in caught if "non-scalar" in str(w.message)]
    lines = [line for line in capture.lines if "Loss:" in line]
    assert len(lines) == 3 and "Iter: 3/3" in lines[-1]


def test_tensorboard_stats_handler_writes_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    learner = TinyProtoNet()
    trainer = MetaTrainer(
        "cpu",
        1,
        EpisodeList(3),
        learner,
        torch.optim.SGD(learner.parameters(), 0.01),
        train_handlers=[
            TensorBoardStatsHandler(log_dir=str(tmp_path / "a"), output_transform=from_engine(["loss"], first=True)),
            TensorBoardStatsHandler(log_dir=str(tmp_path / "b")),  # default transform: x[0], a dict of scalars
        ],
    )
    trainer.run()
    for sub, tags in (("a", {"Loss"}), ("b", {"loss", "accuracy"})):
        assert list((tmp_path / sub).glob("events.out.tfevents.*"))
        acc = EventAccumulator(str(tmp_path / sub))
        acc.Reload()
        assert tags <= set(acc.Tags()["scalars"])
        assert len(acc.Scalars(sorted(tags)[0])) == 3


def test_progress_bar_runs(capsys):
    learner = TinyProtoNet()
    trainer = MetaTrainer(
        "cpu", 1, EpisodeList(2), learner, torch.optim.SGD(learner.parameters(), 0.01), progress=True
    )
    trainer.run()
    assert trainer.state.iteration == 2


@pytest.mark.parametrize("learner_cls", [TinyProtoNet, lambda: TinyMAML(first_order=True)], ids=["protonet", "fomaml"])
def test_amp_cpu_bfloat16(learner_cls):
    torch.manual_seed(0)
    learner = learner_cls()
    before = [p.detach().clone() for p in learner.parameters()]
    trainer = MetaTrainer(
        "cpu", 1, EpisodeList(4, seed=1), learner, torch.optim.Adam(learner.parameters(), 1e-2), amp=True
    )
    losses = _record_losses(trainer)
    assert trainer.scaler is None and trainer.amp_dtype == torch.bfloat16
    trainer.run()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in learner.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, learner.parameters()))


def test_amp_autocast_is_active_in_the_learners_forward_only():
    """``amp=True`` opens an AMP scope around ``outer_step``: autocast is off there (backward passes and optimizer
    steps run outside it) and on inside the learner's ``forward_autocast`` (its forward passes)."""
    from monai_metalearn.learners.precision import forward_autocast

    seen: list[tuple[bool, bool, torch.dtype]] = []

    class Spy(TinyProtoNet):
        def outer_step(self, *args, **kwargs):
            with forward_autocast():
                inside = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
            seen.append((torch.is_autocast_enabled("cpu"), *inside))
            return super().outer_step(*args, **kwargs)

    learner = Spy()
    MetaTrainer("cpu", 1, EpisodeList(1), learner, torch.optim.SGD(learner.parameters(), 0.01), amp=True).run()
    MetaTrainer("cpu", 1, EpisodeList(1), learner, torch.optim.SGD(learner.parameters(), 0.01)).run()
    assert seen == [(False, True, torch.bfloat16), (False, False, seen[1][2])]


@pytest.mark.gpu
def test_amp_cuda_float16_with_grad_scaler():
    device = torch.device("cuda")
    torch.manual_seed(0)
    learner = TinyProtoNet().to(device)
    trainer = MetaTrainer(
        device, 2, EpisodeList(10, seed=1), learner, torch.optim.Adam(learner.parameters(), 1e-2), amp=True,
        amp_dtype="float16",  # the default is bfloat16 where the GPU supports it
    )
    assert isinstance(trainer.scaler, torch.amp.GradScaler) and trainer.amp_dtype == torch.float16
    losses = _record_losses(trainer)
    trainer.run()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert statistics.mean(losses[-5:]) < statistics.mean(losses[:5])
    assert trainer.scaler.get_scale() > 0
