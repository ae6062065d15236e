"""Episode-level metrics for few-shot evaluation: mean and 95% confidence interval over episodes, Dice, ignite metrics.

Few-shot results are reported as the mean over test episodes with a 95% confidence interval of that mean, and,
because episodes drawn from a few scans are not independent, also over subjects: :func:`mean_ci95_subjects`
averages the episodes of each query subject first and gives the interval of the mean over those subject means (the
figure that says how a new subject would fare), with the number of subjects behind it.
:func:`mean_ci95` uses the Student t quantile for fewer than 30 episodes (where ``1.96`` would understate the
interval noticeably) and the normal quantile ``1.96`` from 30 episodes on, which is the convention of the few-shot
literature (``1.96 * std / sqrt(n)`` over 600 or more episodes). In both cases ``std`` is the sample standard
deviation (``ddof=1``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

__all__ = [
    "Z_95",
    "T_SWITCH_N",
    "mean_ci95",
    "mean_ci95_subjects",
    "binary_dice",
    "slab_dice",
    "summarize",
    "summarize_groups",
    "EpisodeMetric",
    "EpisodeAccuracy",
    "EpisodeDice",
]

Z_95 = 1.96
"""Normal 95% quantile as used in the few-shot literature (``1.96 * std / sqrt(n)``; exactly 1.95996...)."""

T_SWITCH_N = 30
"""From this many values on, :func:`mean_ci95` (``method="auto"``) uses the normal quantile instead of Student t."""


def _t_quantile_975(dof: int) -> float:
    """Two-sided 95% quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy.stats import t  # lazy: scipy is only needed for small samples

    return float(t.ppf(0.975, dof))


def _as_floats(values: Iterable[Any]) -> list[float]:
    if isinstance(values, torch.Tensor):
        return [float(v) for v in values.detach().flatten().cpu().tolist()]
    return [float(v.item() if isinstance(v, torch.Tensor) else v) for v in values]


def mean_ci95(values: Iterable[float] | torch.Tensor, method: str = "auto") -> tuple[float, float]:
    """Mean of ``values`` and the half width of its 95% confidence interval.

    ``half_width = q * s / sqrt(n)``, with ``s`` the sample standard deviation (``ddof=1``) and ``q`` the
    two-sided 95% quantile: Student t with ``n - 1`` degrees of freedom (``method="t"``), the normal ``1.96``
    (``method="normal"``), or, by default (``method="auto"``), t for ``n < 30`` and 1.96 from 30 values on.

    Args:
        values: per-episode values (accuracies, Dice scores, ...).
        method: ``"auto"``, ``"normal"`` or ``"t"``.

    Returns:
        ``(mean, half_width)``; the half width is ``nan`` for a single value, both are ``nan`` for no value.

    Raises:
        ValueError: when ``method`` is unknown.
    """
    if method not in ("auto", "normal", "t"):
        raise ValueError(f"method must be 'auto', 'normal' or 't', got {method!r}.")
    xs = _as_floats(values)
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, math.nan
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    use_t = method == "t" or (method == "auto" and n < T_SWITCH_N)
    q = _t_quantile_975(n - 1) if use_t else Z_95
    return mean, q * std / math.sqrt(n)


def mean_ci95_subjects(
    values: Iterable[float] | torch.Tensor, subjects: Sequence[Any], method: str = "auto", per_subject: bool = False
) -> dict[str, Any]:
    """Mean over subjects and its 95% interval: each subject's values are averaged first.

    Args:
        values: one value per episode (or per query).
        subjects: the query subject of each value (same length).
        method: see :func:`mean_ci95`, applied to the subject means.
        per_subject: also return ``per_subject`` (subject -> its mean), e.g. to pool several runs by subject.

    Returns:
        ``{"mean", "ci95", "n_subjects"}``: mean of the subject means, half width of its 95% interval (``None`` for
        one subject), number of distinct subjects.

    Raises:
        ValueError: when ``values`` and ``subjects`` differ in length.

    Example::

        mean_ci95_subjects([0.8, 0.6, 0.9], ["a", "a", "b"])  # {"mean": 0.8, "ci95": ..., "n_subjects": 2}
    """
    xs = _as_floats(values)
    subjects = [str(s) for s in subjects]
    if len(xs) != len(subjects):
        raise ValueError(f"{len(xs)} values but {len(subjects)} subjects.")
    per: dict[str, list[float]] = {}
    for x, sub in zip(xs, subjects):
        per.setdefault(sub, []).append(x)
    by_subject = {sub: math.fsum(v) / len(v) for sub, v in sorted(per.items())}
    means = list(by_subject.values())
    mean, ci = mean_ci95(means, method=method)
    out = {"mean": _finite_or_none(mean), "ci95": _finite_or_none(ci), "n_subjects": len(means)}
    return {**out, "per_subject": by_subject} if per_subject else out


def binary_dice(
    pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean", empty_score: float = 1.0
) -> torch.Tensor:
    """Dice overlap ``2 |P & T| / (|P| + |T|)`` of binary masks, per sample (the first dimension is the batch).

    Args:
        pred: predicted mask ``[B, ...]`` (e.g. ``[B, 1, D, H, W]``); nonzero is foreground.
        target: reference mask of the same shape; nonzero is foreground.
        reduction: ``"mean"`` (a 0-d tensor) or ``"none"`` (one score per sample, ``[B]``).
        empty_score: the score of a sample whose prediction and reference are both empty.

    Returns:
        Float tensor of Dice scores in ``[0, 1]``.

    Raises:
        ValueError: on a shape mismatch or an unknown ``reduction``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)}, {tuple(target.shape)}.")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
    p = (pred != 0).reshape(pred.shape[0], -1).float() if pred.ndim > 1 else (pred != 0).float()[None]
    t = (target != 0).reshape(target.shape[0], -1).float() if target.ndim > 1 else (target != 0).float()[None]
    inter = (p * t).sum(1)
    denom = p.sum(1) + t.sum(1)
    dice = torch.where(denom > 0, 2.0 * inter / denom.clamp_min(1.0), torch.full_like(denom, float(empty_score)))
    return dice.mean() if reduction == "mean" else dice


def slab_dice(pred: torch.Tensor, target: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Dice restricted to the slices (along ``axis``, default the last: axial in RAS) that hold reference voxels.

    The 3D analogue of the 2D few-shot protocol (e.g. SSL-ALPNet) that scores only the slices containing the
    organ: false positives far above or below the structure do not count, those beside it in its slices do. Use it
    next to the whole-volume Dice, never instead of it.

    Args:
        pred: predicted mask ``[B, ...]``; nonzero is foreground.
        target: reference mask of the same shape.
        axis: the slice axis.

    Returns:
        0-d tensor: Dice over all samples' slab voxels pooled (1.0 if the reference is empty and so is the prediction).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)}, {tuple(target.shape)}.")
    axis = axis % target.ndim
    other = [d for d in range(target.ndim) if d != axis]
    keep = (target != 0).permute(axis, *other).reshape(target.shape[axis], -1).any(1)
    if not bool(keep.any()):
        return binary_dice(pred.reshape(1, -1), target.reshape(1, -1))
    p = pred.permute(axis, *other).reshape(target.shape[axis], -1)[keep].reshape(1, -1)
    t = target.permute(axis, *other).reshape(target.shape[axis], -1)[keep].reshape(1, -1)
    return binary_dice(p, t)


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def summarize(
    values: Iterable[float] | torch.Tensor,
    per_class: Mapping[str, Iterable[float]] | None = None,
    name: str = "accuracy",
    group_key: str = "per_class",
    method: str = "auto",
) -> dict[str, Any]:
    """The ``metrics.json`` structure of an evaluation.

    Example::

        summarize([0.6, 0.8], per_class={"liver": [0.5, 1.0], "spleen": [0.7, 0.6]})
        # {"accuracy": {"mean": 0.7, "ci95": 1.27, "n_episodes": 2},
        #  "per_class": {"liver": {"mean": 0.75, "ci95": 3.18, "n": 2}, "spleen": {...}}}

    Args:
        values: one value per episode.
        per_class: class (or structure) name -> its per-episode values, over the episodes it appeared in.
        name: key of the overall entry (``"accuracy"`` or ``"dice"``).
        group_key: key of the per-group entry (``"per_class"``; ``"per_structure"`` for segmentation).
        method: confidence interval method, see :func:`mean_ci95`.

    Returns:
        A JSON-serialisable dict; an undefined interval (a single episode) is ``None``.
    """
    xs = _as_floats(values)
    mean, ci = mean_ci95(xs, method=method)
    out: dict[str, Any] = {name: {"mean": _finite_or_none(mean), "ci95": _finite_or_none(ci), "n_episodes": len(xs)}}
    if per_class is not None:
        out[group_key] = summarize_groups(per_class, method=method)
    return out


def summarize_groups(groups: Mapping[str, Iterable[float]], method: str = "auto") -> dict[str, Any]:
    """``{group: {"mean", "ci95", "n"}}`` of per-group episode values (classes, structures, subject pairs),
    sorted by name; an undefined interval (a single episode) is ``None``."""
    out: dict[str, Any] = {}
    for key in sorted(groups, key=str):
        xs = _as_floats(groups[key])
        m, c = mean_ci95(xs, method=method)
        out[str(key)] = {"mean": _finite_or_none(m), "ci95": _finite_or_none(c), "n": len(xs)}
    return out


def _values_from_output(output: Any, key: str) -> list[float]:
    """Per-episode values of ``key`` in an engine output: a number, a 0-d tensor, a dict holding ``key``,
    or a list of those (one item per episode, as :class:`~monai_metalearn.engines.MetaEvaluator` returns)."""
    if output is None:
        return []
    if isinstance(output, Mapping):
        return _values_from_output(output[key], key) if key in output else []
    if isinstance(output, torch.Tensor):
        return _as_floats(output.reshape(-1))
    if isinstance(output, (int, float)):
        return [float(output)]
    if isinstance(output, Sequence) and not isinstance(output, str):
        vals: list[float] = []
        for item in output:
            vals.extend(_values_from_output(item, key))
        return vals
    raise TypeError(f"cannot read per-episode '{key}' values from an output of type {type(output).__name__}.")


class EpisodeMetric(Metric):
    """Mean over episodes of a per-episode value, with its 95% confidence interval.

    ``update`` takes the transformed engine output: a number, a tensor of per-episode values, a dict with the
    value under ``key``, or a list of those. At ``EPOCH_COMPLETED`` the engine gets ``metrics[name]`` (the mean),
    ``metrics[name + "_ci95"]`` (the half width, see :func:`mean_ci95`) and ``metrics["n_episodes"]``.

    Args:
        key: the entry of the per-episode output dicts to average.
        output_transform: applied to ``engine.state.output`` before ``update``.
        device: kept for the ignite ``Metric`` interface; values are accumulated on the CPU.
        ci_method: see :func:`mean_ci95`.
    """

    key = "value"

    def __init__(
        self,
        key: str | None = None,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
        ci_method: str = "auto",
    ) -> None:
        if key is not None:
            self.key = key
        self.ci_method = ci_method
        self._values: list[float] = []
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._values = []

    @reinit__is_reduced
    def update(self, output: Any) -> None:
        self._values.extend(self._read(output))

    def _read(self, output: Any) -> list[float]:
        return _values_from_output(output, self.key)

    @property
    def values(self) -> list[float]:
        """The per-episode values seen since the last ``reset``."""
        return list(self._values)

    def compute(self) -> float:
        """Mean over the episodes seen (``nan`` when none)."""
        return mean_ci95(self._values, method=self.ci_method)[0]

    def compute_ci95(self) -> tuple[float, float]:
        """``(mean, half_width)`` over the episodes seen."""
        return mean_ci95(self._values, method=self.ci_method)

    def iteration_completed(self, engine: Engine) -> None:
        """Update from ``engine.state.output`` (no ignite ``(y_pred, y)`` unrolling: outputs are per episode)."""
        self.update(self._output_transform(engine.state.output))

    def completed(self, engine: Engine, name: str) -> None:
        """Put the mean, its 95% CI half width and the episode count into ``engine.state.metrics``."""
        mean, ci = self.compute_ci95()
        engine.state.metrics[name] = mean
        engine.state.metrics[f"{name}_ci95"] = ci
        engine.state.metrics["n_episodes"] = len(self._values)


class EpisodeAccuracy(EpisodeMetric):
    """Mean per-episode query accuracy with its 95% CI.

    Besides the forms of :class:`EpisodeMetric`, ``update`` accepts a ``(logits_or_labels, target)`` pair of
    tensors for one episode: logits ``[Q, N]`` are reduced by argmax, integer predictions ``[Q]`` are used as is.

    Example::

        evaluator = MetaEvaluator(..., key_val_metric={"accuracy": EpisodeAccuracy()})
        # evaluator.state.metrics -> {"accuracy": 0.71, "accuracy_ci95": 0.02, "n_episodes": 600}
    """

    key = "accuracy"

    def _read(self, output: Any) -> list[float]:
        if (
            isinstance(output, (tuple, list))
            and len(output) == 2
            and all(isinstance(o, torch.Tensor) and o.ndim >= 1 for o in output)
        ):
            pred, target = output
            if pred.is_floating_point() and pred.ndim == target.ndim + 1:
                pred = pred.argmax(1)
            return [float((pred == target).float().mean())]
        return super()._read(output)


class EpisodeDice(EpisodeMetric):
    """Mean per-episode query Dice with its 95% CI.

    Besides the forms of :class:`EpisodeMetric`, ``update`` accepts a ``(pred_mask, target_mask)`` pair of
    tensors ``[Q, 1, D, H, W]`` for one episode (the episode value is the mean Dice over its query images).
    """

    key = "dice"

    def _read(self, output: Any) -> list[float]:
        if (
            isinstance(output, (tuple, list))
            and len(output) == 2
            and all(isinstance(o, torch.Tensor) and o.ndim >= 2 for o in output)
        ):
            return [float(binary_dice(output[0], output[1]))]
        return super()._read(output)
