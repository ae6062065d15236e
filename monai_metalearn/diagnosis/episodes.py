"""Patient-level diagnosis episodes for evaluation: every query patient is a held-out (test) patient, its support
cases are K *other* patients of each diagnosis, and accuracy is summarised per patient, then over patients.

Meta-training episodes over the training patients are ordinary
:class:`~monai_metalearn.data.ClassificationEpisodeDataset` episodes (``class_key="class"``, ``cross_subject=True``);
this module builds the evaluation side, where the query pool (a fold's test patients) and the support pool (every
other patient, confirmed cases) differ, which that sampler does not do.

Example::

    eps = patient_episodes(classes, query_pool=test_ids, k_shot=5, num_episodes=60, seed=0)
    for ep in eps:
        ep["support"], ep["query"]      # indices into the case list; one query patient per diagnosis
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["patient_episodes", "stratified_patient_folds", "episode_tensors", "patient_accuracy_summary"]


def stratified_patient_folds(classes: Sequence[Hashable], n_folds: int) -> list[list[int]]:
    """Case indices split into ``n_folds`` folds, each diagnosis spread evenly (round robin in case order).

    Raises:
        ValueError: a diagnosis has fewer cases than folds.
    """
    folds: list[list[int]] = [[] for _ in range(int(n_folds))]
    for c in sorted(set(classes), key=str):
        idx = [i for i, x in enumerate(classes) if x == c]
        if len(idx) < n_folds:
            raise ValueError(f"diagnosis {c!r} has {len(idx)} cases, fewer than the {n_folds} folds")
        for j, i in enumerate(idx):
            folds[j % n_folds].append(i)
    return [sorted(f) for f in folds]


def patient_episodes(classes: Sequence[Hashable], query_pool: Sequence[int], k_shot: int, num_episodes: int,
                     seed: int = 0, n_way: Sequence[Hashable] | None = None) -> list[dict[str, Any]]:
    """``num_episodes`` N-way K-shot episodes: per diagnosis one query case from ``query_pool`` (cycling through the
    pool's patients of that diagnosis so that each is queried equally often) and ``k_shot`` support cases drawn
    from the *other* cases of that diagnosis (any case but the query: support cases are confirmed cases, the query is
    the new patient).

    Args:
        classes: diagnosis of every case.
        query_pool: indices of the held-out cases.
        k_shot: support cases per diagnosis.
        num_episodes: episodes.
        seed: the episodes are a function of the seed.
        n_way: diagnoses in every episode (default all).

    Returns:
        dicts with ``support`` (``[N * K]`` indices, grouped by class), ``support_labels``, ``query``, ``query_labels``
        (``0..N-1`` in the order of ``classes_in_episode``) and ``classes_in_episode``.

    Raises:
        ValueError: a diagnosis has no query case, or fewer than ``k_shot`` other cases.
    """
    rng = np.random.default_rng(int(seed))
    names = sorted(set(classes), key=str) if n_way is None else list(n_way)
    pool = {c: [i for i in query_pool if classes[i] == c] for c in names}
    for c in names:
        if not pool[c]:
            raise ValueError(f"no query case of diagnosis {c!r} in the query pool")
        if sum(1 for x in classes if x == c) - 1 < k_shot:
            raise ValueError(f"diagnosis {c!r}: {k_shot}-shot needs {k_shot + 1} cases, "
                             f"has {sum(1 for x in classes if x == c)}")
    order = {c: rng.permutation(pool[c]).tolist() for c in names}
    episodes = []
    for e in range(int(num_episodes)):
        support, s_lab, query, q_lab = [], [], [], []
        for j, c in enumerate(names):
            q = order[c][e % len(order[c])]
            others = [i for i, x in enumerate(classes) if x == c and i != q]
            support += rng.choice(others, size=k_shot, replace=False).tolist()
            s_lab += [j] * k_shot
            query.append(q)
            q_lab.append(j)
        episodes.append({"support": support, "support_labels": s_lab, "query": query, "query_labels": q_lab,
                         "classes_in_episode": names})
    return episodes


def episode_tensors(cases: Sequence[Mapping[str, Any]], episode: Mapping[str, Any], key: str = "image"):
    """``(support_x, support_y, query_x, query_y)`` of an episode of :func:`patient_episodes` over loaded cases."""
    sx = torch.stack([torch.as_tensor(cases[i][key]) for i in episode["support"]])
    qx = torch.stack([torch.as_tensor(cases[i][key]) for i in episode["query"]])
    return sx, torch.tensor(episode["support_labels"]), qx, torch.tensor(episode["query_labels"])


def patient_accuracy_summary(records: Sequence[Mapping[str, Any]], names: Sequence[Hashable]) -> dict[str, Any]:
    """Accuracy per patient (mean over the episodes that queried it), then mean ± 95% t-interval over patients;
    per-class accuracy and a confusion matrix (rows: truth, columns: prediction, counts over all queries).

    Args:
        records: one per query, ``{"patient", "truth", "prediction"}`` (class names).
        names: class names, the confusion matrix's order.
    """
    from monai_metalearn.metrics import mean_ci95_subjects

    per_patient: dict[str, list[float]] = {}
    for r in records:
        per_patient.setdefault(str(r["patient"]), []).append(float(r["truth"] == r["prediction"]))
    patients = sorted(per_patient)
    values = [float(np.mean(per_patient[p])) for p in patients]
    summary = dict(mean_ci95_subjects(values, patients))
    index = {c: i for i, c in enumerate(names)}
    confusion = np.zeros((len(names), len(names)), dtype=int)
    for r in records:
        confusion[index[r["truth"]], index[r["prediction"]]] += 1
    summary["per_class"] = {str(c): float(confusion[i, i] / max(1, confusion[i].sum())) for c, i in index.items()}
    summary["confusion"] = confusion.tolist()
    summary["classes"] = [str(c) for c in names]
    summary["n_queries"] = len(records)
    summary["per_patient"] = dict(zip(patients, values))
    return summary
