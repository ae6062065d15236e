"""Episodic meta-evaluation as a MONAI workflow: adapt on each episode's support set, score its query set."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines.evaluator import Evaluator
from monai.engines.utils import IterationEvents, default_metric_cmp_fn

from monai_metalearn.engines.utils import (
    default_prepare_episode,
    is_meta_batch,
    resolve_amp_dtype,
)
from monai_metalearn.learners.precision import amp_scope, forward_autocast
from monai_metalearn.metrics import EpisodeAccuracy, EpisodeDice, binary_dice, mean_ci95, mean_ci95_subjects, slab_dice, summarize

if TYPE_CHECKING:
    from ignite.engine import EventEnum
    from ignite.metrics import Metric

__all__ = ["MetaEvaluator"]

_DEFAULT = "default"


def _value_key(task: str) -> str:
    return "accuracy" if task == "classification" else "dice"


class MetaEvaluator(Evaluator):
    """Few-shot evaluation: for every episode, ``predictor = learner.adapt(support)`` and the query is scored.

    Classification episodes give the query accuracy (and per-class correct/total using the episode's
    ``classes`` names); segmentation episodes (``task="segmentation"``) give the mean query Dice of the argmax
    (2-channel logits) or ``logit > 0`` (1 channel) mask, grouped by the episode's ``structure``.

    Adaptation runs with gradients enabled (MAML-type learners differentiate through their inner loop; the query
    prediction itself runs under ``no_grad``), unlike ``monai.engines.SupervisedEvaluator``. The learner's
    parameters and buffers are restored after every episode (``restore_state=True``), so evaluation cannot change
    the learner, even a learner that fine-tunes itself in place or a ``mode="train"`` BatchNorm, and episodes
    stay independent. This class subclasses ``monai.engines.Evaluator`` (a ``Workflow``) so that MONAI's
    ``ValidationHandler`` accepts it, but does not use its ``no_grad`` forward mode.

    At ``EPOCH_COMPLETED`` (with the default key metric) ``engine.state.metrics`` holds ``accuracy`` (mean over
    episodes), ``accuracy_ci95`` (half width of its 95% CI, see :func:`~monai_metalearn.metrics.mean_ci95`) and
    ``n_episodes`` (``dice``, ``dice_ci95``, ``n_episodes`` for segmentation). Whatever the metrics,
    ``engine.state.per_class`` maps class (structure) name -> mean over the episodes it appeared in,
    ``engine.state.per_class_counts`` class name -> ``{"correct", "total"}`` query counts (classification),
    ``engine.state.episode_values`` lists the per-episode values and ``engine.state.summary`` is the
    ``metrics.json`` structure of :func:`~monai_metalearn.metrics.summarize`.

    ``engine.state.output`` is a list with one dict per episode: ``accuracy`` (or ``dice``), ``loss`` (query
    cross-entropy) and ``episode`` (the episode's index when it has one).

    Args:
        device: where the episodes go and the learner lives.
        val_data_loader: iterable of episodes (or lists of episodes).
        learner: the meta-learner, with ``adapt(support_x, support_y) -> predictor``.
        task: ``"classification"`` or ``"segmentation"``.
        epoch_length: episodes (iterations) per evaluation, default ``len(val_data_loader)``.
        non_blocking: asynchronous host-to-device copies.
        prepare_episode: ``(episode, device, non_blocking, **to_kwargs) -> (sx, sy, qx, qy)``.
        iteration_update: replaces :meth:`_iteration` when given.
        postprocessing: applied to batch and output at ``MODEL_COMPLETED``.
        key_val_metric: default ``{"accuracy": EpisodeAccuracy()}`` (``{"dice": EpisodeDice()}`` for
            segmentation); ``None`` for none.
        additional_metrics: more ignite metrics.
        metric_cmp_fn: compares the key metric with the best so far.
        val_handlers: handlers with ``attach(engine)``.
        amp: run adaptation and prediction under ``torch.autocast`` (bfloat16 on the CPU and on CUDA devices that
            support it, float16 otherwise); learners take their inner-loop gradients and fit their heads with
            autocast disabled (see :mod:`monai_metalearn.learners.precision`).
        amp_dtype: autocast dtype override.
        mode: ``"eval"`` (``learner.eval()``) or ``"train"`` (``learner.train()``, e.g. transductive BatchNorm)
            during evaluation; the learner's previous mode is restored afterwards.
        restore_state: restore the learner's state dict after each episode.
        event_names: additional custom ignite events.
        event_to_attr: maps events to ``engine.state`` attributes.
        decollate: MONAI decollation at ``MODEL_COMPLETED`` (outputs are already per episode).
        to_kwargs: further ``Tensor.to`` arguments for ``prepare_episode``.
        amp_kwargs: further ``torch.autocast`` arguments.
        progress: attach an ignite ``ProgressBar`` (tqdm).
        inferer: how the adapted predictor is run on the query images, ``inferer(query_x, predictor)`` (a MONAI
            ``Inferer``, e.g. ``SlidingWindowInferer(roi_size=(32, 32, 32))`` to segment whole volumes with a
            predictor adapted on patches); default ``predictor(query_x)``.
        mask_postprocess: segmentation only: applied to the binary query prediction ``[B, 1, *S]`` before it is
            scored, e.g. ``KeepLargestConnectedComponent`` per sample
            (:func:`~monai_metalearn.apps.segmentation.largest_component`); the record then also holds ``dice_raw``,
            the Dice before it.

    Classification episodes that name their query subjects (``query_subject``, one per query example) also give
    ``state.summary["accuracy_subjects"]``: each query subject's accuracy over all its query examples, then the mean
    and 95% interval over those subjects and their number (how a new subject would fare), and ``per_subject``
    (subject -> accuracy), so that runs over several folds can be pooled by subject.

    ``engine.state.episode_records`` holds one dict per episode: its value, ``structure`` (segmentation) and the
    support / query subjects when the episode names them; for segmentation also ``dice_slab`` (Dice on the slices of
    the last spatial axis that hold the reference structure, see :func:`~monai_metalearn.metrics.slab_dice`) and the
    predicted / reference voxel counts, e.g. to report CT-1 -> CT-2 and CT-2 -> CT-1 separately.

    Example::

        evaluator = MetaEvaluator(device, episode_loader(test_episodes), learner)
        evaluator.run()
        evaluator.state.metrics["accuracy"], evaluator.state.metrics["accuracy_ci95"], evaluator.state.per_class
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        learner: torch.nn.Module,
        task: str = "classification",
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_episode: Callable = default_prepare_episode,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_val_metric: dict[str, Metric] | None | str = _DEFAULT,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        amp_dtype: torch.dtype | str | None = None,
        mode: str = "eval",
        restore_state: bool = True,
        event_names: list[str | EventEnum | type[EventEnum]] | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
        progress: bool = False,
        inferer: Callable | None = None,
        mask_postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if task not in ("classification", "segmentation"):
            raise ValueError(f"task must be 'classification' or 'segmentation', got {task!r}.")
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}.")
        if isinstance(key_val_metric, str):
            if key_val_metric != _DEFAULT:
                raise ValueError(f"key_val_metric must be a dict of metrics or None, got {key_val_metric!r}.")
            key_val_metric = {"accuracy": EpisodeAccuracy()} if task == "classification" else {"dice": EpisodeDice()}
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_episode,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            val_handlers=val_handlers,
            amp=amp,
            mode=mode,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.learner = learner
        self.inferer = inferer
        self.mask_postprocess = mask_postprocess
        self.task = task
        self.value_key = _value_key(task)
        self.learner_mode = mode
        self.restore_state = restore_state
        self.prepare_episode = prepare_episode
        self.amp_dtype = resolve_amp_dtype(self.state.device, amp_dtype)
        self._reset_records()
        self._was_training = False
        self._snapshot: dict[str, torch.Tensor] | None = None
        self._grad_snapshot: dict[str, torch.Tensor | None] = {}
        self._register_internal_handlers()  # no-op when ``val_handlers`` were given (registered before them)
        if progress:
            from ignite.handlers import ProgressBar

            ProgressBar(persist=False, desc="meta-eval").attach(self)

    # ----------------------------------------------------------------------------------------------- bookkeeping
    def _reset_records(self) -> None:
        self.state.episode_values = []
        self.state.episode_records = []
        self.state.per_class = {}
        self.state.per_class_counts = {}
        self.state.summary = {}
        self._group_values: dict[str, list[float]] = defaultdict(list)
        self._group_counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self._query_correct: list[float] = []
        self._query_subjects: list[str] = []

    def _register_internal_handlers(self) -> None:
        """Reset the records at ``STARTED`` and summarize them at ``EPOCH_COMPLETED``, before the ``val_handlers``
        (so that a handler given in ``val_handlers`` sees ``state.summary`` and ``state.per_class``)."""
        if getattr(self, "_internal_handlers", False):
            return
        self._internal_handlers = True
        self.add_event_handler(Events.STARTED, self._on_started)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)

    def _register_handlers(self, handlers: Sequence) -> None:
        self._register_internal_handlers()
        super()._register_handlers(handlers)

    def run(self, global_epoch: int = 1) -> None:  # type: ignore[override]
        """Evaluate all episodes once; the learner's state and train/eval mode are restored afterwards.

        Args:
            global_epoch: the trainer's epoch when run by ``ValidationHandler``.
        """
        self._was_training = self.learner.training
        try:
            super().run(global_epoch)
        finally:
            self._restore()
            self._snapshot, self._grad_snapshot = None, {}
            self.learner.train(self._was_training)

    def _on_started(self, engine: MetaEvaluator) -> None:
        self._reset_records()

    def _take_snapshot(self) -> None:
        """Copy the learner's state (taken at the first episode, i.e. after any checkpoint loading)."""
        self._snapshot = {k: v.detach().clone() for k, v in self.learner.state_dict().items()}
        self._grad_snapshot = {
            n: None if p.grad is None else p.grad.detach().clone() for n, p in self.learner.named_parameters()
        }

    def _restore(self) -> None:
        """Put back the learner's parameters, buffers and gradients as they were before the first episode."""
        if self._snapshot is None:
            return
        self.learner.load_state_dict(self._snapshot)
        for n, p in self.learner.named_parameters():
            g = self._grad_snapshot.get(n)
            if g is None:
                p.grad = None
            elif p.grad is None or p.grad.shape != g.shape:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    def _on_epoch_completed(self, engine: MetaEvaluator) -> None:
        values = list(self.state.episode_values)
        groups = {k: list(v) for k, v in self._group_values.items()}
        group_key = "per_class" if self.task == "classification" else "per_structure"
        self.state.summary = summarize(values, per_class=groups, name=self.value_key, group_key=group_key)
        self.state.per_class = {k: mean_ci95(v)[0] for k, v in sorted(groups.items())}
        if self.task == "classification":
            self.state.per_class_counts = {
                k: {"correct": c, "total": t} for k, (c, t) in sorted(self._group_counts.items())
            }
            if self._query_subjects:  # each query subject's accuracy first, then the interval over subjects
                self.state.summary["accuracy_subjects"] = mean_ci95_subjects(
                    self._query_correct, self._query_subjects, per_subject=True
                )

    # ------------------------------------------------------------------------------------------------ iteration
    def _score(self, logits: torch.Tensor, qy: torch.Tensor, episode: Mapping[str, Any]) -> dict[str, Any]:
        """Per-episode value, query loss and per-group bookkeeping of one episode's query predictions."""
        logits = logits.detach().float()
        extra: dict[str, Any] = {}
        if self.task == "classification":
            target = qy.reshape(-1).long()
            pred = logits.argmax(1)
            correct = pred == target
            value = float(correct.float().mean())
            loss = float(F.cross_entropy(logits, target))
            classes = episode.get("classes")
            for c in torch.unique(target).tolist():
                name = str(classes[c]) if classes is not None and c < len(classes) else str(c)
                sel = target == c
                n_ok, n = int(correct[sel].sum()), int(sel.sum())
                self._group_values[name].append(n_ok / n)
                counts = self._group_counts[name]
                counts[0] += n_ok
                counts[1] += n
            subjects = episode.get("query_subject")
            if isinstance(subjects, (list, tuple)) and len(subjects) == len(target):
                self._query_correct += correct.float().tolist()
                self._query_subjects += [str(s) for s in subjects]
        else:
            target = qy if qy.ndim == logits.ndim else qy.unsqueeze(1)
            target = (target > 0).long()
            if logits.shape[1] == 1:
                pred = (logits > 0).long()
                loss = float(F.binary_cross_entropy_with_logits(logits, target.float()))
            else:
                pred = logits.argmax(1, keepdim=True)
                loss = float(F.cross_entropy(logits, target[:, 0]))
            if self.mask_postprocess is not None:
                extra["dice_raw"] = float(binary_dice(pred, target))
                pred = self.mask_postprocess(pred).to(target.dtype)
            value = float(binary_dice(pred, target))
            self._group_values[str(episode.get("structure", "structure"))].append(value)
            extra.update({"dice_slab": float(slab_dice(pred, target)), "pred_voxels": int(pred.sum()),
                          "true_voxels": int(target.sum())})
        self.state.episode_values.append(value)
        record: dict[str, Any] = {self.value_key: value, **extra}
        for key in ("episode", "structure", "support_subject", "query_subject"):
            if key in episode:
                record[key] = episode[key]
        self.state.episode_records.append(record)
        out: dict[str, Any] = {self.value_key: value, "loss": loss}
        if isinstance(episode.get("episode"), int):
            out["episode"] = episode["episode"]
        return out

    def _iteration(self, engine: MetaEvaluator, batchdata: Any) -> list[dict[str, Any]]:
        """Adapt on the support set of each episode and score its query set.

        Args:
            engine: this evaluator.
            batchdata: an episode dict, or a list of episode dicts.

        Returns:
            One dict per episode: ``accuracy`` (or ``dice``), ``loss`` and ``episode``.

        Raises:
            ValueError: when ``batchdata`` is None.
        """
        if batchdata is None:
            raise ValueError("Must provide an episode (or a list of episodes) for the current iteration.")
        episodes = list(batchdata) if is_meta_batch(batchdata) else [batchdata]
        device = engine.state.device
        outputs = []
        for ep in episodes:
            sx, sy, qx, qy = engine.prepare_episode(ep, device, engine.non_blocking, **engine.to_kwargs)
            engine.learner.train(engine.learner_mode == "train")
            if engine.restore_state and engine._snapshot is None:
                engine._take_snapshot()
            with torch.enable_grad(), amp_scope(engine.amp, device, engine.amp_dtype, **engine.amp_kwargs), \
                    forward_autocast():
                predictor = engine.learner.adapt(sx, sy)
                with torch.no_grad():
                    logits = predictor(qx) if engine.inferer is None else engine.inferer(qx, predictor)
            outputs.append(engine._score(logits, qy, ep))
            del predictor, logits
            if engine.restore_state:
                engine._restore()
        engine.state.output = outputs
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
