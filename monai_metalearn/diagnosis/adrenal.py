"""Few-shot diagnosis of AdrenalMNIST3D shapes (normal adrenal gland vs adrenal mass): cases, 2-way episodes, shape
biomarkers.

AdrenalMNIST3D (MedMNIST v2) holds 1,584 binary 3D masks of adrenal glands segmented on CT, with official train /
val / test splits (1188 / 98 / 298 volumes, split by patient; the left and right glands of one patient are separate
volumes and the release does not say which belong together). Every volume is one *case*, id
``adrenalmnist3d_<split>_<index>``.

- :func:`adrenal_cases`: the cases of the official splits, images in memory (``[1, s, s, s]`` float32 in {0, 1}).
- :func:`adrenal_episodes`: 2-way K-shot evaluation episodes whose support comes from one split (train) and whose
  queries come from another (test): support and query cases are disjoint by construction, and every query case is
  queried the same number of times (``repeats``), each time beside another random support.
- :func:`shape_biomarkers`: the radiomics shape features of a mask (IBSI / pyradiomics definitions: mesh and voxel
  volume, surface area, sphericity, principal axis lengths, elongation, flatness), its bounding-box extents, fill and
  number of connected pieces: the shape analogue of the cardiac indices of
  :mod:`~monai_metalearn.diagnosis.biomarkers`, classified by its
  :class:`~monai_metalearn.diagnosis.BiomarkerClassifier` on the support alone.
- :func:`evaluate_episodes`, :func:`shape_predictor`, :func:`learner_predictor` and :func:`adrenal_summary`: per
  query records, and accuracy per case (mean over the episodes that queried it), then mean ± 95% Student-t interval
  over cases, balanced accuracy, per class, confusion matrix, case-level AUC and the majority-class reference.

Geometry: the release stores no voxel size. MedMNIST+ makes the 28^3 and 64^3 versions from the same centre crop (a
64^3 mask holds about (64/28)^3 = 11.9 times the voxels of its 28^3 twin: 12.0-13.2 in the first five training
volumes), so sizes in grid voxels are proportional to physical sizes within one resolution; ``spacing`` scales them
when the crop size is known.

Example::

    from monai_metalearn.diagnosis import BiomarkerClassifier
    from monai_metalearn.diagnosis.adrenal import (adrenal_cases, adrenal_episodes, adrenal_summary,
                                                   evaluate_episodes, shape_biomarker_matrix, shape_predictor)

    cases = adrenal_cases()                                      # 1584 cases
    episodes = adrenal_episodes(cases, k_shot=5, repeats=10)     # support: train, queries: test
    features = shape_biomarker_matrix(cases)                     # [1584, 15]
    records = evaluate_episodes(shape_predictor(features, "logistic"), cases, episodes)
    adrenal_summary(records)["mean"]                             # accuracy over the 298 test cases
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from monai_metalearn.data.sources import ADRENAL_CLASSES
from monai_metalearn.errors import ConfigError

from .cases import CaseError

__all__ = [
    "ADRENAL_SPLIT_SIZES",
    "SHAPE_BIOMARKER_NAMES",
    "adrenal_cases",
    "adrenal_episodes",
    "shape_biomarkers",
    "shape_biomarker_matrix",
    "shape_predictor",
    "learner_predictor",
    "evaluate_episodes",
    "adrenal_summary",
]

#: Volumes per official split of AdrenalMNIST3D (MedMNIST v2).
ADRENAL_SPLIT_SIZES: Mapping[str, int] = {"train": 1188, "val": 98, "test": 298}

#: The features of :func:`shape_biomarkers`, in the column order of :func:`shape_biomarker_matrix`.
SHAPE_BIOMARKER_NAMES: tuple[str, ...] = (
    "voxel_volume",
    "mesh_volume",
    "surface_area",
    "surface_volume_ratio",
    "sphericity",
    "major_axis_length",
    "minor_axis_length",
    "least_axis_length",
    "elongation",
    "flatness",
    "extent_0",
    "extent_1",
    "extent_2",
    "bbox_fill",
    "components",
)

_SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------------------------------
# cases and episodes


def adrenal_cases(data_dir: str | os.PathLike | None = None, size: int = 28,
                  splits: Sequence[str] = _SPLITS) -> list[dict[str, Any]]:
    """AdrenalMNIST3D volumes of the official ``splits`` as diagnosis cases, in split then index order.

    Each case: ``id`` and ``subject`` ``adrenalmnist3d_<split>_<index>`` (a volume, not a person: see the module
    docstring), ``image`` (``[1, s, s, s]`` float32 in {0, 1}, in memory), ``class`` (``"normal"`` or
    ``"adrenal_mass"``), ``class_index``, ``split``, ``index`` (within the split), ``intensity`` ``"binary"``.

    Args:
        data_dir: the data folder (default ``$MONAI_DATA_DIRECTORY``), holding ``medmnist3d/adrenalmnist3d.npz``.
        size: 28 or 64.
        splits: which official splits.

    Raises:
        ConfigError: an unknown split.
        CaseError: a split of the file holds no volume.
    """
    from monai_metalearn.data import load_datalist

    unknown = [s for s in splits if s not in _SPLITS]
    if unknown or not splits:
        raise ConfigError(f"splits must be a non-empty subset of {_SPLITS}, got {list(splits)}")
    cases = []
    for split in splits:
        items = load_datalist("adrenalmnist3d", data_dir, split=split, size=size)
        if not items:
            raise CaseError(f"AdrenalMNIST3D ({size}^3): the {split!r} split holds no volume")
        for index, item in enumerate(items):
            case_id = f"adrenalmnist3d_{split}_{index}"
            cases.append({
                "id": case_id,
                "subject": case_id,
                "image": item["image"],
                "class": item["class"],
                "class_index": int(item["class_index"]),
                "split": split,
                "index": index,
                "modality": item["modality"],
                "intensity": item["intensity"],
                "source": item["source"],
            })
    return cases


def adrenal_episodes(cases: Sequence[Mapping[str, Any]], k_shot: int, repeats: int = 10, query_size: int = 30,
                     seed: int = 0, support_split: str = "train", query_split: str = "test",
                     classes: Sequence[Hashable] = ADRENAL_CLASSES) -> list[dict[str, Any]]:
    """2-way (N-way) K-shot evaluation episodes: support from ``support_split``, queries from ``query_split``.

    ``repeats`` rounds; in each round the query cases are shuffled and cut into episodes of ``query_size`` queries
    (the last one shorter), and each episode draws ``k_shot`` support cases per class from the support split, without
    replacement within the episode. Every query case is thus queried exactly ``repeats`` times, beside
    ``repeats`` independent supports. The queries of an episode are whatever cases fall into it (not balanced by
    class): the classifiers judge each query on its own, so the grouping only sets how often a support is reused.

    Args:
        cases: the case list (:func:`adrenal_cases`; ``class`` and ``split`` are read).
        k_shot: support cases per class.
        repeats: times each query case is queried.
        query_size: queries per episode.
        seed: the episodes are a function of the seed.
        support_split, query_split: the splits of support and query cases (they must differ).
        classes: the classes, in label order (default ``ADRENAL_CLASSES``: ``normal`` 0, ``adrenal_mass`` 1).

    Returns:
        dicts with ``support`` (``[N * K]`` indices into ``cases``, grouped by class), ``support_labels``, ``query``,
        ``query_labels`` (``0..N-1`` in the order of ``classes_in_episode``) and ``classes_in_episode``, as
        :func:`~monai_metalearn.diagnosis.patient_episodes` (so :func:`~monai_metalearn.diagnosis.episode_tensors`
        reads them).

    Raises:
        ConfigError: non-positive ``k_shot``, ``repeats`` or ``query_size``, equal splits, or fewer than two classes.
        CaseError: a class has fewer than ``k_shot`` support cases, or the query split holds no case, or a query case
            has a class outside ``classes``.
    """
    if k_shot < 1 or repeats < 1 or query_size < 1:
        raise ConfigError(f"k_shot, repeats and query_size must be >= 1, got {k_shot}, {repeats}, {query_size}")
    if support_split == query_split:
        raise ConfigError(f"support and query must come from different splits, both are {support_split!r}")
    names = list(classes)
    if len(names) < 2:
        raise ConfigError(f"an episode needs at least two classes, got {names}")
    support_pool = {c: [i for i, case in enumerate(cases) if case["split"] == support_split and case["class"] == c]
                    for c in names}
    for c, pool in support_pool.items():
        if len(pool) < k_shot:
            raise CaseError(f"class {c!r} has {len(pool)} cases in the {support_split!r} split, fewer than the "
                            f"{k_shot} support cases of a {k_shot}-shot episode")
    queries = [i for i, case in enumerate(cases) if case["split"] == query_split]
    if not queries:
        raise CaseError(f"no case of the {query_split!r} split to query")
    way = {c: j for j, c in enumerate(names)}
    stray = sorted({str(cases[i]["class"]) for i in queries if cases[i]["class"] not in way})
    if stray:
        raise CaseError(f"query cases of classes {stray} are not among the episode classes {names}")
    rng = np.random.default_rng(int(seed))
    episodes = []
    for _ in range(int(repeats)):
        order = rng.permutation(queries).tolist()
        for start in range(0, len(order), int(query_size)):
            query = order[start:start + int(query_size)]
            support, s_lab = [], []
            for j, c in enumerate(names):
                support += rng.choice(support_pool[c], size=k_shot, replace=False).tolist()
                s_lab += [j] * k_shot
            episodes.append({"support": support, "support_labels": s_lab, "query": query,
                             "query_labels": [way[cases[i]["class"]] for i in query], "classes_in_episode": names})
    return episodes


# --------------------------------------------------------------------------------------------------------------------
# shape biomarkers


def _as_mask(mask: Any) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise CaseError(f"a shape mask must be 3-D (optionally with a leading channel of 1), got shape "
                        f"{tuple(arr.shape)}")
    return arr > 0.5


def _mesh(mask: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """Surface area and enclosed volume of the marching-cubes mesh (level 0.5) of the zero-padded mask."""
    from skimage import measure

    verts, faces, _, _ = measure.marching_cubes(np.pad(mask, 1).astype(np.float32), level=0.5,
                                                spacing=tuple(float(s) for s in spacing))
    area = float(measure.mesh_surface_area(verts, faces))
    tri = verts[faces].astype(np.float64)
    volume = abs(float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum()) / 6.0)
    return area, volume


def _face_area(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Area of the voxel faces between the mask and the background (each face: the product of the other two sizes)."""
    padded = np.pad(mask, 1)
    area = 0.0
    for axis in range(3):
        faces = int(np.count_nonzero(np.diff(padded.astype(np.int8), axis=axis)))
        others = [float(s) for i, s in enumerate(spacing) if i != axis]
        area += faces * others[0] * others[1]
    return area


def shape_biomarkers(mask: Any, spacing: Sequence[float] = (1.0, 1.0, 1.0), surface: str = "mesh") -> dict[str, float]:
    """Shape biomarkers of a binary 3-D mask, in the units of ``spacing`` (grid voxels by default).

    IBSI / pyradiomics definitions:

    - ``voxel_volume``: voxel count x voxel volume.
    - ``mesh_volume``, ``surface_area``: volume enclosed by, and area of, the marching-cubes surface at level 0.5
      (``surface="mesh"``, scikit-image); with ``surface="faces"`` the area is that of the voxel faces between mask
      and background and the volume the voxel volume (a sphere's faces overstate its area by about 1.5).
    - ``surface_volume_ratio``: area / volume; ``sphericity``: ``(36 pi V^2)^(1/3) / A`` (1 for a ball; a
      marching-cubes ball of radius 10 voxels measures about 0.91, a cube about 0.8).
    - ``major_axis_length`` ≥ ``minor_axis_length`` ≥ ``least_axis_length``: ``4 sqrt(lambda)`` for the eigenvalues
      of the covariance (``ddof=0``) of the voxel centres' physical coordinates (a box of n voxels along an axis
      has variance ``(n^2 - 1) / 12`` along it); ``elongation`` ``sqrt(lambda_minor / lambda_major)``, ``flatness``
      ``sqrt(lambda_least / lambda_major)`` (1 for a ball, near 0 for a needle or a plate).
    - ``extent_0..2``: bounding-box size along each array axis (voxels x spacing); ``bbox_fill``: voxel count /
      bounding-box voxel count.
    - ``components``: connected pieces (26-connectivity).

    Args:
        mask: a 3-D array or tensor (optionally ``[1, D, H, W]``); values above 0.5 are inside.
        spacing: voxel size per axis.
        surface: ``"mesh"`` (marching cubes) or ``"faces"``.

    Raises:
        ConfigError: an unknown ``surface`` or a spacing that is not three positive numbers.
        CaseError: a mask that is not 3-D or is empty.
    """
    if surface not in ("mesh", "faces"):
        raise ConfigError(f"surface must be 'mesh' or 'faces', got {surface!r}")
    if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
        raise ConfigError(f"spacing must be three positive voxel sizes, got {tuple(spacing)}")
    m = _as_mask(mask)
    count = int(m.sum())
    if count == 0:
        raise CaseError(f"the shape mask of shape {m.shape} is empty: no shape biomarkers")
    sp = np.asarray([float(s) for s in spacing])
    voxel_volume = count * float(np.prod(sp))
    if surface == "mesh":
        area, mesh_volume = _mesh(m, sp)
    else:
        area, mesh_volume = _face_area(m, sp), voxel_volume
    coords = np.argwhere(m).astype(np.float64) * sp
    centred = coords - coords.mean(0)
    eig = np.sort(np.clip(np.linalg.eigvalsh(centred.T @ centred / count), 0.0, None))[::-1]  # major first
    lo, hi = np.argwhere(m).min(0), np.argwhere(m).max(0)
    extents = (hi - lo + 1).astype(np.float64) * sp
    _, components = ndimage.label(m, structure=np.ones((3, 3, 3), dtype=bool))
    major = eig[0]
    return {
        "voxel_volume": voxel_volume,
        "mesh_volume": mesh_volume,
        "surface_area": area,
        "surface_volume_ratio": area / mesh_volume if mesh_volume > 0 else math.inf,
        "sphericity": (36.0 * math.pi * mesh_volume**2) ** (1.0 / 3.0) / area,
        "major_axis_length": 4.0 * math.sqrt(eig[0]),
        "minor_axis_length": 4.0 * math.sqrt(eig[1]),
        "least_axis_length": 4.0 * math.sqrt(eig[2]),
        "elongation": math.sqrt(eig[1] / major) if major > 0 else 1.0,
        "flatness": math.sqrt(eig[2] / major) if major > 0 else 1.0,
        "extent_0": float(extents[0]),
        "extent_1": float(extents[1]),
        "extent_2": float(extents[2]),
        "bbox_fill": count / float(np.prod(hi - lo + 1)),
        "components": float(components),
    }


def shape_biomarker_matrix(cases: Sequence[Mapping[str, Any]], spacing: Sequence[float] = (1.0, 1.0, 1.0),
                           surface: str = "mesh", names: Sequence[str] = SHAPE_BIOMARKER_NAMES,
                           key: str = "image") -> np.ndarray:
    """``[P, F]`` float64 matrix of :func:`shape_biomarkers` of every case's ``key`` mask, columns ``names``.

    Raises:
        ConfigError: a name that is not one of :data:`SHAPE_BIOMARKER_NAMES`.
        CaseError: a case without ``key``, or with an empty or non-3-D mask (the message names the case).
    """
    unknown = [n for n in names if n not in SHAPE_BIOMARKER_NAMES]
    if unknown:
        raise ConfigError(f"unknown shape biomarkers {unknown}; choose from {SHAPE_BIOMARKER_NAMES}")
    rows = []
    for i, case in enumerate(cases):
        name = case.get("id", f"case {i}")
        if key not in case:
            raise CaseError(f"{name} has no {key!r} (keys: {sorted(case)})")
        try:
            b = shape_biomarkers(case[key], spacing=spacing, surface=surface)
        except CaseError as err:
            raise CaseError(f"{name}: {err}") from None
        rows.append([b[n] for n in names])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(names))


# --------------------------------------------------------------------------------------------------------------------
# evaluation

#: ``episode -> [Q, N]`` class probabilities of the episode's queries (columns in ``classes_in_episode`` order).
Predictor = Callable[[Mapping[str, Any]], np.ndarray]


def shape_predictor(features: Any, method: str = "centroid", **classifier_kwargs: Any) -> Predictor:
    """A predictor that fits :class:`~monai_metalearn.diagnosis.BiomarkerClassifier` (``method``) on the rows of the
    episode's support cases and returns the class probabilities of its query rows.

    Args:
        features: ``[P, F]``, one row per case of the case list the episodes index.
        method: ``"centroid"`` or ``"logistic"``.
        classifier_kwargs: further classifier arguments (``C``, ``scale``).
    """
    from .biomarkers import BiomarkerClassifier

    x = np.asarray(features, dtype=np.float64)
    BiomarkerClassifier(method, **classifier_kwargs)  # fail early on a bad method or argument

    def predict(episode: Mapping[str, Any]) -> np.ndarray:
        clf = BiomarkerClassifier(method, **classifier_kwargs).fit(x[episode["support"]], episode["support_labels"])
        proba = clf.predict_proba(x[episode["query"]])
        out = np.zeros((proba.shape[0], len(episode["classes_in_episode"])))
        out[:, clf.classes_.astype(int)] = proba
        return out

    return predict


def learner_predictor(learner: Any, cases: Sequence[Mapping[str, Any]], key: str = "image",
                      device: str | torch.device = "cpu", cache: bool = False, batch_size: int = 64) -> Predictor:
    """A predictor running ``learner.adapt(support_x, support_y)(query_x)`` (no gradients) on the episode's images;
    the softmax of its logits are the probabilities (for Matching Networks' ``log p`` that is ``p`` itself).

    Args:
        learner: a classification learner with ``adapt`` (in eval mode).
        cases: the case list the episodes index.
        key: the image key of the cases.
        device: where the images go.
        cache: embed every case once with ``learner.embed`` and run ``adapt`` on the stored features (the learner's
            ``encoder`` is swapped for an identity during each call). Exact only for an encoder that treats each
            sample on its own (GroupNorm / InstanceNorm / no norm, as :class:`~monai_metalearn.networks.ConvEncoder3D`
            by default; not BatchNorm in transductive mode) and a learner whose ``adapt`` embeds through
            ``encoder``; much faster when the episodes reuse the cases.
        batch_size: cases per forward pass when caching.

    Raises:
        ConfigError: ``cache=True`` for a learner without ``embed`` and ``encoder``.
    """
    from .episodes import episode_tensors

    table: torch.Tensor | None = None
    if cache:
        if not (hasattr(learner, "embed") and isinstance(getattr(learner, "encoder", None), torch.nn.Module)):
            raise ConfigError(f"cache=True needs a learner with embed() and an encoder module; "
                              f"{type(learner).__name__} has not both")
        parts = []
        with torch.no_grad():
            for start in range(0, len(cases), int(batch_size)):
                x = torch.stack([torch.as_tensor(c[key]) for c in cases[start:start + int(batch_size)]])
                parts.append(learner.embed(x.float().to(device)))
        table = torch.cat(parts)

    def predict(episode: Mapping[str, Any]) -> np.ndarray:
        sy = torch.tensor(episode["support_labels"]).to(device)
        with torch.no_grad():
            if table is None:
                sx, _, qx, _ = episode_tensors(cases, episode, key=key)
                logits = learner.adapt(sx.float().to(device), sy)(qx.float().to(device))
            else:
                encoder = learner.encoder
                learner.encoder = torch.nn.Identity()
                try:
                    logits = learner.adapt(table[episode["support"]], sy)(table[episode["query"]])
                finally:
                    learner.encoder = encoder
        return logits.float().softmax(1).cpu().numpy().astype(np.float64)

    return predict


def evaluate_episodes(predict: Predictor, cases: Sequence[Mapping[str, Any]],
                      episodes: Sequence[Mapping[str, Any]], positive: Hashable = "adrenal_mass") -> list[dict]:
    """One record per query: ``{"patient"`` (the case id), ``"truth"``, ``"prediction"`` (class names), ``"score"``
    (the predicted probability of ``positive``; ``None`` when it is not an episode class), ``"episode"}``.

    Raises:
        CaseError: a predictor output of the wrong shape (names the episode).
    """
    records = []
    for e, episode in enumerate(episodes):
        names = list(episode["classes_in_episode"])
        proba = np.asarray(predict(episode), dtype=np.float64)
        if proba.shape != (len(episode["query"]), len(names)):
            raise CaseError(f"episode {e}: the predictor returned shape {proba.shape}, expected "
                            f"{(len(episode['query']), len(names))} (queries x classes)")
        col = names.index(positive) if positive in names else None
        for q, t, p in zip(episode["query"], episode["query_labels"], proba):
            records.append({"patient": str(cases[q].get("id", q)), "truth": names[t],
                            "prediction": names[int(p.argmax())], "score": None if col is None else float(p[col]),
                            "episode": e})
    return records


def _auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count one half); ``None`` without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def _auc_bootstrap(scores: np.ndarray, positive: np.ndarray, resamples: int, seed: int) -> list[float] | None:
    """95% percentile interval of the AUC over ``resamples`` bootstrap resamples of the cases (resamples that miss a
    class are drawn again); ``None`` without both classes or for ``resamples < 1``."""
    if resamples < 1 or positive.all() or not positive.any():
        return None
    rng = np.random.default_rng(int(seed))
    values: list[float] = []
    while len(values) < resamples:
        idx = rng.integers(0, len(scores), len(scores))
        auc = _auc(scores[idx], positive[idx])
        if auc is not None:
            values.append(auc)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def adrenal_summary(records: Sequence[Mapping[str, Any]], classes: Sequence[Hashable] = ADRENAL_CLASSES,
                    positive: Hashable = "adrenal_mass", auc_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Case-level summary of per-query records (:func:`evaluate_episodes`).

    :func:`~monai_metalearn.diagnosis.patient_accuracy_summary` (accuracy per case, averaged over the episodes that
    queried it; per-class accuracy and confusion matrix over all queries), with the 95% interval of the mean over
    cases from Student's t (``n - 1`` degrees of freedom), and:

    - ``per_class_ci95``: t-interval of each class's mean case accuracy; ``balanced_accuracy``: the mean of the
      per-class accuracies (chance 0.5 for two classes whatever the prevalence), ``balanced_ci95`` its half width
      ``sqrt(sum_c ci_c^2) / C`` (the classes' cases are independent);
    - ``auc``: ROC AUC over cases of each case's mean ``score`` (probability of ``positive``), ``None`` without scores;
      ``auc_ci95``: its 95% percentile interval over ``auc_resamples`` bootstrap resamples of the cases (``[lo, hi]``);
    - ``majority_class``, ``majority_accuracy``: the most frequent class among the query cases and the accuracy of
      always predicting it (the reference an imbalanced test set sets for plain accuracy);
    - ``n_cases_per_class``.

    Args:
        records: ``{"patient", "truth", "prediction"}`` and optionally ``"score"`` per query.
        classes: class names, the confusion matrix's order.
        positive: the class whose score the AUC ranks.
        auc_resamples: bootstrap resamples of the AUC interval (0: none).
        seed: seed of the bootstrap.

    Raises:
        CaseError: no records, or a case recorded with two different truths.
    """
    from monai_metalearn.metrics import mean_ci95

    from .episodes import patient_accuracy_summary

    if not records:
        raise CaseError("no query records to summarise")
    names = list(classes)
    truth: dict[str, Hashable] = {}
    for r in records:
        case = str(r["patient"])
        if truth.setdefault(case, r["truth"]) != r["truth"]:
            raise CaseError(f"case {case} is recorded as {truth[case]!r} and as {r['truth']!r}")
    summary = patient_accuracy_summary(records, names)
    per_case = summary["per_patient"]
    mean, ci = mean_ci95(list(per_case.values()), method="t")
    summary["mean"] = mean
    summary["ci95"] = None if not math.isfinite(ci) else ci
    summary["ci_method"] = "t"
    per_class_ci, counts, class_means = {}, {}, {}
    for c in names:
        values = [v for case, v in per_case.items() if truth[case] == c]
        counts[str(c)] = len(values)
        if values:
            m, h = mean_ci95(values, method="t")
            class_means[str(c)] = m
            per_class_ci[str(c)] = None if not math.isfinite(h) else h
    summary["per_class_ci95"] = per_class_ci
    summary["n_cases_per_class"] = counts
    summary["balanced_accuracy"] = float(np.mean(list(class_means.values())))
    halves = list(per_class_ci.values())
    summary["balanced_ci95"] = (None if not halves or any(h is None for h in halves)
                                else math.sqrt(sum(h * h for h in halves)) / len(halves))
    scores: dict[str, list[float]] = {}
    for r in records:
        if r.get("score") is not None:
            scores.setdefault(str(r["patient"]), []).append(float(r["score"]))
    scored = sorted(scores)
    case_scores = np.asarray([float(np.mean(scores[c])) for c in scored])
    is_positive = np.asarray([truth[c] == positive for c in scored], dtype=bool)
    summary["auc"] = _auc(case_scores, is_positive) if scored else None
    summary["auc_ci95"] = _auc_bootstrap(case_scores, is_positive, auc_resamples, seed) if scored else None
    majority = max(counts, key=lambda c: counts[c])
    summary["majority_class"] = majority
    summary["majority_accuracy"] = counts[majority] / len(per_case)
    return summary
