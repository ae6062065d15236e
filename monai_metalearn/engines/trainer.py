"""Episodic meta-training as a MONAI workflow: one iteration is one meta-update on an episode or a meta-batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from ignite.engine import Events
from monai.engines.trainer import Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn
from torch.optim.optimizer import Optimizer

from monai_metalearn.engines.distributed import MetaGradientSync
from monai_metalearn.engines.utils import (
    default_prepare_episode,
    is_meta_batch,
    resolve_amp_dtype,
)
from monai_metalearn.learners.precision import amp_scope

if TYPE_CHECKING:
    from ignite.engine import EventEnum
    from ignite.metrics import Metric

__all__ = ["MetaTrainer", "first_loss"]


def _to_float(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().item())
    return value


def first_loss(output: Any) -> Any:
    """``output[0]["loss"]`` of a list-of-dicts engine output (what ``from_engine(["loss"], first=True)`` gives)."""
    if isinstance(output, Sequence) and output and isinstance(output[0], Mapping):
        return output[0].get("loss")
    if isinstance(output, Mapping):
        return output.get("loss")
    return output


class MetaTrainer(Trainer):
    """Episodic meta-trainer: each iteration feeds one episode (or a meta-batch) to the learner's outer step.

    The data loader yields either one episode dict (``support_image``, ``support_label``, ``query_image``,
    ``query_label``, ...) per iteration, which goes to ``learner.outer_step(sx, sy, qx, qy, optimizer, scaler)``,
    or a list of episode dicts (a meta-batch), which goes to ``learner.meta_batch_step(tasks, optimizer, scaler)``.
    The learner computes the meta-loss, back-propagates and steps the optimizer; the trainer moves the episode to
    the device, runs the step in an AMP scope when ``amp`` is on (see below), and counts episodes.

    ``engine.state.output`` is a list with one dict per episode of the iteration, each holding the learner's
    statistics of the step (``loss`` and ``accuracy``, or ``dice``) as floats, replicated like MONAI's decollated
    outputs: ``StatsHandler(output_transform=from_engine(["loss"], first=True))``, ``TensorBoardStatsHandler``
    and their defaults (``lambda x: x[0]``) work unchanged. ``engine.state.episode`` counts the episodes trained
    on (the iteration count when each iteration is one episode); it is part of ``state_dict`` so that
    ``CheckpointSaver``/``CheckpointLoader`` with ``{"trainer": trainer}`` resume it with the iteration count.

    AMP: ``amp=True`` runs the learner step inside :func:`~monai_metalearn.learners.precision.amp_scope`: the
    learner computes its forward passes and losses under ``torch.autocast(device.type, dtype=amp_dtype)`` and its
    backward passes, inner-loop gradients and optimizer steps with autocast disabled (the policy of
    :mod:`monai_metalearn.learners.precision`). ``amp_dtype`` defaults to bfloat16 on the CPU and on CUDA devices
    that support it, float16 on older GPUs; with float16 a ``torch.amp.GradScaler`` is handed to the learner as
    ``scaler`` (it is created once, so ``{"scaler": trainer.scaler}`` can be checkpointed) and the inner loops scale
    their losses themselves.

    Args:
        device: where the episodes go and the learner lives, see :func:`~monai_metalearn.engines.default_device`.
        max_epochs: the number of epochs to train.
        train_data_loader: iterable of episodes or meta-batches (lists of episodes), e.g. ``episode_loader``.
        learner: the meta-learner (``outer_step``/``meta_batch_step``), an ``nn.Module`` already on ``device``.
        optimizer: the outer-loop optimizer of the learner's parameters.
        epoch_length: iterations per epoch, default ``len(train_data_loader)``.
        non_blocking: asynchronous host-to-device copies.
        prepare_episode: ``(episode, device, non_blocking, **to_kwargs) -> (sx, sy, qx, qy)``.
        iteration_update: replaces :meth:`_iteration` when given.
        postprocessing: applied to batch and output at ``MODEL_COMPLETED``.
        key_train_metric: ignite metrics computed on the outputs, e.g. ``{"train_acc": EpisodeAccuracy()}``.
        additional_metrics: more ignite metrics.
        metric_cmp_fn: compares the key metric with the best so far.
        train_handlers: handlers with ``attach(engine)`` (``StatsHandler``, ``CheckpointSaver`` ...).
        amp: mixed precision, see above.
        amp_dtype: autocast dtype (``"float16"``, ``"bfloat16"``), default bfloat16 where supported, else float16.
        event_names: additional custom ignite events.
        event_to_attr: maps events to ``engine.state`` attributes.
        decollate: MONAI decollation of batch and output at ``MODEL_COMPLETED`` (outputs are already per episode).
        to_kwargs: further ``Tensor.to`` arguments for ``prepare_episode``.
        amp_kwargs: further ``torch.autocast`` arguments.
        progress: attach an ignite ``ProgressBar`` (tqdm) showing the loss.
        distributed: one rank of a distributed run (see :mod:`monai_metalearn.engines.distributed`): the learner is
            broadcast from rank 0, the meta-gradients are averaged over the ranks before each optimizer step
            (:class:`~monai_metalearn.engines.distributed.MetaGradientSync`), and ``state.output`` and
            ``state.episode`` hold the statistics and episode counts of all ranks. Needs an initialised process
            group and a loader of this rank's share of each meta-batch (``distributed_episode_loader``).

    Example::

        trainer = MetaTrainer(
            device=default_device(), max_epochs=10, train_data_loader=episode_loader(train_episodes),
            learner=ProtoNet(encoder), optimizer=torch.optim.Adam(learner.parameters(), 1e-3),
            train_handlers=[StatsHandler(output_transform=from_engine(["loss"], first=True)),
                            ValidationHandler(validator=evaluator, interval=1)],
        )
        trainer.run()
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        learner: torch.nn.Module,
        optimizer: Optimizer,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_episode: Callable = default_prepare_episode,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        amp_dtype: torch.dtype | str | None = None,
        event_names: list[str | EventEnum | type[EventEnum]] | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
        progress: bool = False,
        distributed: bool = False,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_episode,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.learner = learner
        self.optimizer = optimizer
        self.prepare_episode = prepare_episode
        self.state.episode = 0
        self.state_dict_user_keys.append("episode")
        self.amp_dtype = resolve_amp_dtype(self.state.device, amp_dtype)
        self.sync: MetaGradientSync | None = MetaGradientSync(learner, optimizer) if distributed else None
        use_scaler = amp and self.state.device.type == "cuda" and self.amp_dtype == torch.float16
        self.scaler: torch.amp.GradScaler | None = None
        if use_scaler:
            self.scaler = torch.amp.GradScaler("cuda") if self.sync is None else self.sync.grad_scaler("cuda")
        if progress:
            from ignite.handlers import ProgressBar

            ProgressBar(persist=False).attach(self, output_transform=first_loss)
        self.add_event_handler(Events.EPOCH_STARTED, self._set_data_epoch)

    def _set_data_epoch(self, engine: MetaTrainer) -> None:
        """New episodes every epoch: ``dataset.set_epoch(epoch - 1)`` on episodic datasets (0-based, so the first
        epoch serves the dataset's own episodes), like ``DistributedSampler.set_epoch``."""
        dataset = getattr(self.data_loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(engine.state.epoch - 1)

    def run(self) -> None:  # type: ignore[override]
        """Train until ``max_epochs``; a second call continues from the current state (as MONAI trainers do).

        Unlike ``monai.engines.Trainer.run`` the GradScaler is not re-created here (it is made in ``__init__``,
        CUDA float16 only), so its state survives checkpointing and repeated runs.
        """
        if self.state.iteration == 0 or self._is_done(self.state):
            self.state.episode = 0  # ignite restarts a finished run from iteration 0
        super(Trainer, self).run()

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Ignite ``Engine.load_state_dict``; a checkpoint without ``episode`` resumes it from the iteration."""
        if "episode" in state_dict:
            super().load_state_dict(state_dict)
            return
        super().load_state_dict({**state_dict, "episode": -1})
        self.state.episode = self.state.iteration

    def _iteration(self, engine: MetaTrainer, batchdata: Any) -> list[dict[str, Any]]:
        """One meta-update on an episode or a meta-batch.

        Args:
            engine: this trainer.
            batchdata: an episode dict, or a list of episode dicts (a meta-batch).

        Returns:
            One dict per episode holding the learner's step statistics (floats), e.g. ``loss`` and ``accuracy``.

        Raises:
            ValueError: when ``batchdata`` is None or an empty meta-batch.
        """
        if batchdata is None:
            raise ValueError("Must provide an episode (or a list of episodes) for the current iteration.")
        meta_batch = is_meta_batch(batchdata)
        episodes = list(batchdata) if meta_batch else [batchdata]
        if not episodes:
            raise ValueError("Empty meta-batch.")
        device = engine.state.device
        tasks = [engine.prepare_episode(ep, device, engine.non_blocking, **engine.to_kwargs) for ep in episodes]

        engine.learner.train()
        if engine.sync is not None:
            engine.sync.begin_step()
        with amp_scope(engine.amp, device, engine.amp_dtype, **engine.amp_kwargs):  # autocast: forward passes only
            if meta_batch:
                stats = engine.learner.meta_batch_step(tasks, engine.optimizer, scaler=engine.scaler)
            else:
                stats = engine.learner.outer_step(*tasks[0], engine.optimizer, scaler=engine.scaler)
        stats = {k: _to_float(v) for k, v in dict(stats or {}).items()}
        n_tasks = len(tasks)
        if engine.sync is not None:  # all ranks: same weights, statistics and episode count of the global meta-batch
            stats, n_tasks = engine.sync.end_step(stats, n_tasks)
        engine.state.episode += n_tasks
        engine.state.output = [dict(stats) for _ in tasks]
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
