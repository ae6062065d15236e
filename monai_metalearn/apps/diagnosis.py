"""The glue of the classification bundle's diagnosis mode (``configs/diagnosis.json``): patient folds, the
novel-condition split, and patient-level evaluation written to ``metrics.json``.

Meta-training sees only the fold's training patients (and, with ``holdout``, none of the held-out diagnosis);
evaluation queries the fold's test patients, one per diagnosis per episode, with K support patients per diagnosis
drawn from every other patient (:func:`monai_metalearn.diagnosis.episodes.patient_episodes`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_metalearn.errors import ConfigError

__all__ = ["DiagnosisSplitError", "diagnosis_split", "evaluate_diagnosis"]


class DiagnosisSplitError(ConfigError):
    """The diagnosis fold or held-out condition does not fit the cases (names the value and what exists)."""


def diagnosis_split(cases: Sequence[Mapping[str, Any]], n_folds: int, fold: int,
                    holdout: str | None = None) -> dict[str, Any]:
    """Training and test patients of ``fold`` (of ``n_folds`` stratified by diagnosis).

    Returns:
        ``{"train": cases, "test_indices": [...], "train_classes": [...], "test_classes": [...]}``: with
        ``holdout`` (a diagnosis, the novel-condition setting) no patient of that diagnosis is a training case, and
        ``test_classes`` still holds every diagnosis.

    Raises:
        DiagnosisSplitError: ``fold`` out of range, or an unknown ``holdout``.
    """
    from monai_metalearn.diagnosis.episodes import stratified_patient_folds

    classes = [c["class"] for c in cases]
    names = sorted(set(classes))
    folds = stratified_patient_folds(classes, int(n_folds))
    if not 0 <= int(fold) < len(folds):
        raise DiagnosisSplitError(f"diagnosis_fold {fold} out of range: {len(folds)} folds")
    if holdout is not None and holdout not in names:
        raise DiagnosisSplitError(f"diagnosis_holdout {holdout!r} is not a diagnosis of the cases ({names})")
    test = set(folds[int(fold)])
    train = [c for i, c in enumerate(cases) if i not in test and c["class"] != holdout]
    return {"train": train, "test_indices": sorted(test), "train_classes": sorted({c["class"] for c in train}),
            "test_classes": names}


def evaluate_diagnosis(learner: torch.nn.Module, cases: Sequence[Mapping[str, Any]], test_indices: Sequence[int],
                       shots: Sequence[int], episodes: int, device: str | torch.device, output_dir: str,
                       seed: int = 0, **extra: Any) -> dict[str, Any]:
    """Patient-level N-way K-shot accuracy on the test patients; writes ``output_dir/metrics.json``.

    ``metrics.json``: ``by_shot`` (K -> ``mean``, ``ci95`` over query patients, ``n_subjects``, ``per_class``,
    ``confusion``, ``classes``, ``per_patient``), ``test_patients`` and ``extra`` (the bundle's settings).
    """
    from tqdm.auto import tqdm

    from monai_metalearn.diagnosis.episodes import episode_tensors, patient_accuracy_summary, patient_episodes

    classes = [c["class"] for c in cases]
    names = sorted(set(classes))
    learner = learner.to(device).eval()
    if getattr(learner, "n_way", None) not in (None, len(names)):
        from monai_metalearn.learners import FineTuneBaseline, MatchingNet, ProtoNet

        if not isinstance(learner, (ProtoNet, FineTuneBaseline, MatchingNet)):
            raise DiagnosisSplitError(f"{type(learner).__name__} was built {learner.n_way}-way and cannot answer "
                                      f"{len(names)}-way episodes; use protonet, matching or finetune with a held-out "
                                      "diagnosis")
        learner.n_way = None  # no fixed head: the episode decides
    by_shot = {}
    for k in shots:
        records = []
        for ep in tqdm(patient_episodes(classes, test_indices, int(k), int(episodes), seed=seed + int(k)),
                       desc=f"{k}-shot diagnosis", disable=not extra.get("progress", False)):
            sx, sy, qx, _ = episode_tensors(cases, ep)
            with torch.enable_grad():
                predictor = learner.adapt(sx.to(device), sy.to(device))
            with torch.no_grad():
                pred = predictor(qx.to(device)).argmax(1).tolist()
            for q, t, p in zip(ep["query"], ep["query_labels"], pred):
                records.append({"patient": cases[q].get("id", q), "truth": names[t], "prediction": names[p]})
        by_shot[str(k)] = patient_accuracy_summary(records, names)
    result = {"by_shot": by_shot, "test_patients": [cases[i].get("id", i) for i in test_indices],
              "extra": {k: v for k, v in extra.items() if isinstance(v, (str, int, float, bool, list, type(None)))}}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "metrics.json").write_text(json.dumps(result, indent=2))
    for k, s in by_shot.items():
        ci = "" if s["ci95"] is None else f" ± {100 * s['ci95']:.1f}"
        print(f"{len(names)}-way {k}-shot diagnosis accuracy {100 * s['mean']:.1f}{ci} % over "
              f"{s['n_subjects']} test patients")
    return result
