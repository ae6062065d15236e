"""Cardiac biomarkers from ED/ES segmentations and a few-shot diagnosis classifier on them.

The baseline that cardiologists trust for the ACDC diagnosis task: the clinical features of the challenge's winning
classifiers (Isensee et al., 2017; Wolterink et al., 2017), computed from the right ventricle (RV), myocardium (MYO)
and left ventricle (LV) masks at end-diastole (ED) and end-systole (ES):

- volumes in ml (voxel count x voxel volume in mm^3 / 1000) of the LV, RV and myocardium at ED and ES;
- LV and RV ejection fractions ``(EDV - ESV) / EDV``;
- myocardial mass at ED (``1.05 g/ml`` x volume);
- the ratios ``RV_EDV / LV_EDV``, ``MYO_ED / LV_EDV`` and ``MYO_ES / LV_ESV``;
- the maximum and mean myocardial wall thickness at ED (:func:`myocardial_thickness`, per short-axis slice).

:class:`BiomarkerClassifier` is fitted on the support cases only (nearest class centroid or L2-regularised softmax
regression, after standardising with the support statistics), and :func:`evaluate_biomarker_episodes` measures it
over random N-way K-shot episodes with a 95% interval over query patients.

Geometry caveat: volumes, mass and thickness are in physical units only as far as the header spacing is right. The
shared ACDC copy (``geometry: "nominal"`` in its datalist items) has a placeholder spacing of 1.5 x 1.5 x 8 mm for
every patient (the real scans are 1.37-1.68 mm in-plane and 5-10 mm between slices), so its volumes and masses are
off by patient-specific factors (up to about 2x) and its thicknesses by up to about 10%. Ejection fractions and the
volume ratios do not depend on the spacing. The spacing in the header is used as given.

Example::

    from monai_metalearn.diagnosis import BiomarkerClassifier, biomarkers_from_files
    b = biomarkers_from_files("patient001_ED_gt.nii.gz", "patient001_ES_gt.nii.gz")
    b["lv_ef"]  # 0.237 (patient001, DCM)
    clf = BiomarkerClassifier("centroid").fit(support_features, support_labels)
    clf.predict(query_features)
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from os import PathLike
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from monai_metalearn.metrics import mean_ci95_subjects

__all__ = [
    "BIOMARKER_NAMES",
    "DEFAULT_LABELS",
    "MYOCARDIAL_DENSITY",
    "METHODS",
    "cardiac_biomarkers",
    "myocardial_thickness",
    "biomarkers_from_files",
    "biomarkers_from_datalist",
    "biomarker_matrix",
    "BiomarkerClassifier",
    "evaluate_biomarker_episodes",
]

#: Structure name -> label id in the ACDC label maps.
DEFAULT_LABELS: Mapping[str, int] = {"right_ventricle": 1, "myocardium": 2, "left_ventricle": 3}

#: Myocardial tissue density in g/ml (the value used by ACDC and the clinical literature).
MYOCARDIAL_DENSITY = 1.05

#: The biomarkers of :func:`cardiac_biomarkers`, in the column order of :func:`biomarker_matrix`.
BIOMARKER_NAMES: tuple[str, ...] = (
    "lv_edv_ml",
    "lv_esv_ml",
    "rv_edv_ml",
    "rv_esv_ml",
    "myo_ed_ml",
    "myo_es_ml",
    "lv_ef",
    "rv_ef",
    "myo_mass_ed_g",
    "rv_lv_edv_ratio",
    "myo_lv_ed_ratio",
    "myo_lv_es_ratio",
    "myo_thickness_max_ed_mm",
    "myo_thickness_mean_ed_mm",
)

#: The classifiers of :class:`BiomarkerClassifier`.
METHODS = ("centroid", "logistic")

_THICKNESS_NAMES = ("myo_thickness_max_ed_mm", "myo_thickness_mean_ed_mm")
_STRUCTURES = ("right_ventricle", "myocardium", "left_ventricle")


# --------------------------------------------------------------------------------------------------------------------
# biomarkers


def _spacing_from_affine(affine: Any) -> tuple[float, ...]:
    """Voxel sizes (column norms of the affine's linear part) of a 4x4 affine."""
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(0)))


def _as_label_volume(x: Any, name: str) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """A 3-D numpy label map of ``x`` (array, tensor or MetaTensor, optional leading channel) and its affine spacing."""
    spacing = None
    affine = getattr(x, "affine", None)  # MONAI MetaTensor
    if isinstance(x, torch.Tensor):
        if affine is not None:
            spacing = _spacing_from_affine(affine)
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3-D label map (optionally with a leading channel of 1), got shape "
                         f"{tuple(arr.shape)}")
    return arr, spacing


def _check_labels(labels: Mapping[str, int]) -> dict[str, int]:
    missing = [s for s in _STRUCTURES if s not in labels]
    if missing:
        raise ValueError(f"labels must name the label ids of {_STRUCTURES}; missing {missing}")
    ids = {s: int(labels[s]) for s in _STRUCTURES}
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"the structures need distinct label ids, got {ids}")
    return ids


def myocardial_thickness(
    myocardium: np.ndarray, left_ventricle: np.ndarray, spacing: Sequence[float], slice_axis: int = -1
) -> tuple[float, float]:
    """Maximum and mean myocardial wall thickness in mm, measured per short-axis slice.

    In each slice that holds both structures, the local thickness at an endocardial point (a myocardium pixel
    4-connected to the LV cavity) is its in-plane Euclidean distance (:func:`scipy.ndimage.distance_transform_edt`
    with the in-plane spacing) to the nearest pixel outside myocardium and cavity (background or RV), i.e. the
    distance across the wall to the epicardium or the RV septal surface. A wall of ``n`` pixels along an image axis
    measures ``n`` pixel sizes. The maximum is over all endocardial points of all slices, the mean is their average.
    Where the ring of myocardium is open (basal slices) the points next to the gap measure short walls, which lowers
    the mean a little but not the maximum.

    Args:
        myocardium: boolean mask, 3-D.
        left_ventricle: boolean mask of the LV cavity, same shape.
        spacing: voxel size in mm per axis (3 values).
        slice_axis: the axis across short-axis slices (the last one in ACDC).

    Returns:
        ``(maximum, mean)`` in mm.

    Raises:
        ValueError: when the shapes differ or no slice holds myocardium next to the LV cavity.
    """
    myo = np.asarray(myocardium, dtype=bool)
    lv = np.asarray(left_ventricle, dtype=bool)
    if myo.shape != lv.shape or myo.ndim != 3 or len(spacing) != 3:
        raise ValueError(f"myocardium {myo.shape}, left ventricle {lv.shape} and spacing {tuple(spacing)} must be "
                         "3-D and agree")
    axis = slice_axis % 3
    in_plane = [float(s) for i, s in enumerate(spacing) if i != axis]
    myo, lv = np.moveaxis(myo, axis, 0), np.moveaxis(lv, axis, 0)
    cross = ndimage.generate_binary_structure(2, 1)
    values = []
    for m, c in zip(myo, lv):
        if not (m.any() and c.any()):
            continue
        endocardium = m & ndimage.binary_dilation(c, structure=cross)
        if not endocardium.any():
            continue
        distance = ndimage.distance_transform_edt(m | c, sampling=in_plane)
        values.append(distance[endocardium])
    if not values:
        raise ValueError("no short-axis slice holds myocardium next to the left ventricle: thickness undefined")
    local = np.concatenate(values)
    return float(local.max()), float(local.mean())


def cardiac_biomarkers(
    ed_label: Any,
    es_label: Any,
    spacing: Sequence[float] | None = None,
    labels: Mapping[str, int] = DEFAULT_LABELS,
    thickness: bool = True,
    slice_axis: int = -1,
) -> dict[str, float]:
    """The clinical biomarkers of one patient from its ED and ES label maps.

    Args:
        ed_label: end-diastole label map: numpy array, torch tensor or MONAI MetaTensor, ``[H, W, S]`` or with a
            leading channel of 1.
        es_label: end-systole label map, same shape.
        spacing: voxel size in mm per spatial axis; ``None`` takes it from the MetaTensors' affines (the header).
        labels: structure name -> label id for ``"right_ventricle"``, ``"myocardium"`` and ``"left_ventricle"``
            (an item's ``structures``).
        thickness: also compute the ED wall thickness (:func:`myocardial_thickness`).
        slice_axis: the axis across short-axis slices, for the thickness.

    Returns:
        ``{name: value}`` for :data:`BIOMARKER_NAMES` (without the two thickness entries when ``thickness=False``):
        volumes in ml, ejection fractions and ratios as fractions, mass in g, thickness in mm.

    Raises:
        ValueError: for ED and ES of different shapes, no spacing (or different ED and ES spacings from the
            affines), non-positive spacing, label ids missing or shared, or a structure that is empty at ED or ES.
    """
    ed, ed_spacing = _as_label_volume(ed_label, "ed_label")
    es, es_spacing = _as_label_volume(es_label, "es_label")
    if ed.shape != es.shape:
        raise ValueError(f"ED and ES label maps differ in shape: {tuple(ed.shape)} vs {tuple(es.shape)}")
    if spacing is None:
        if ed_spacing is None and es_spacing is None:
            raise ValueError("spacing is required unless the label maps are MetaTensors with an affine")
        if ed_spacing is not None and es_spacing is not None and not np.allclose(ed_spacing, es_spacing):
            raise ValueError(f"ED and ES affines give different spacings: {ed_spacing} vs {es_spacing}")
        spacing = ed_spacing if ed_spacing is not None else es_spacing
    spacing = tuple(float(s) for s in spacing)  # type: ignore[union-attr]
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {spacing}")
    ids = _check_labels(labels)
    voxel_ml = float(np.prod(spacing)) / 1000.0

    volume: dict[tuple[str, str], float] = {}
    for phase, arr in (("ED", ed), ("ES", es)):
        for structure, label_id in ids.items():
            count = int(np.count_nonzero(arr == label_id))
            if count == 0:
                raise ValueError(f"{structure} (label {label_id}) is empty at {phase}")
            volume[structure, phase] = count * voxel_ml
    lv_edv, lv_esv = volume["left_ventricle", "ED"], volume["left_ventricle", "ES"]
    rv_edv, rv_esv = volume["right_ventricle", "ED"], volume["right_ventricle", "ES"]
    myo_ed, myo_es = volume["myocardium", "ED"], volume["myocardium", "ES"]
    out = {
        "lv_edv_ml": lv_edv,
        "lv_esv_ml": lv_esv,
        "rv_edv_ml": rv_edv,
        "rv_esv_ml": rv_esv,
        "myo_ed_ml": myo_ed,
        "myo_es_ml": myo_es,
        "lv_ef": (lv_edv - lv_esv) / lv_edv,
        "rv_ef": (rv_edv - rv_esv) / rv_edv,
        "myo_mass_ed_g": MYOCARDIAL_DENSITY * myo_ed,
        "rv_lv_edv_ratio": rv_edv / lv_edv,
        "myo_lv_ed_ratio": myo_ed / lv_edv,
        "myo_lv_es_ratio": myo_es / lv_esv,
    }
    if thickness:
        t_max, t_mean = myocardial_thickness(
            ed == ids["myocardium"], ed == ids["left_ventricle"], spacing, slice_axis=slice_axis
        )
        out["myo_thickness_max_ed_mm"] = t_max
        out["myo_thickness_mean_ed_mm"] = t_mean
    return out


def biomarkers_from_files(
    ed_gt_path: str | PathLike,
    es_gt_path: str | PathLike,
    labels: Mapping[str, int] = DEFAULT_LABELS,
    thickness: bool = True,
) -> dict[str, float]:
    """:func:`cardiac_biomarkers` of two NIfTI label maps, with the spacing of the ED header (nibabel).

    Raises:
        ValueError: as :func:`cardiac_biomarkers`, and when the ED and ES headers give different spacings.
    """
    import nibabel as nib

    ed_img, es_img = nib.load(str(ed_gt_path)), nib.load(str(es_gt_path))
    ed_spacing = tuple(float(z) for z in ed_img.header.get_zooms()[:3])
    es_spacing = tuple(float(z) for z in es_img.header.get_zooms()[:3])
    if not np.allclose(ed_spacing, es_spacing):
        raise ValueError(f"{ed_gt_path} and {es_gt_path} have different spacings: {ed_spacing} vs {es_spacing}")
    return cardiac_biomarkers(
        np.asarray(ed_img.dataobj), np.asarray(es_img.dataobj), ed_spacing, labels=labels, thickness=thickness
    )


def biomarkers_from_datalist(
    items: Sequence[Mapping[str, Any]], thickness: bool = True
) -> tuple[list[dict[str, float]], list[str], list[str]]:
    """Biomarkers of every patient of an ACDC datalist (``load_datalist("acdc")``: one item per patient and phase).

    Each patient's ED and ES items are paired by ``patient``; their ``structures`` give the label ids.

    Returns:
        ``(biomarkers, diagnoses, patients)``, one entry per patient, sorted by patient.

    Raises:
        ValueError: for a patient without exactly one ED and one ES item.
    """
    phases: dict[str, dict[str, Mapping[str, Any]]] = {}
    for item in items:
        phases.setdefault(str(item["patient"]), {})[str(item["phase"])] = item
    out: list[dict[str, float]] = []
    diagnoses: list[str] = []
    patients = sorted(phases)
    for patient in patients:
        pair = phases[patient]
        if set(pair) != {"ED", "ES"}:
            raise ValueError(f"{patient} has phases {sorted(pair)}, expected ED and ES")
        ed, es = pair["ED"], pair["ES"]
        out.append(biomarkers_from_files(ed["label"], es["label"], labels=ed["structures"], thickness=thickness))
        diagnoses.append(str(ed["diagnosis"]))
    return out, diagnoses, patients


def biomarker_matrix(
    biomarkers: Sequence[Mapping[str, float]], names: Sequence[str] = BIOMARKER_NAMES
) -> np.ndarray:
    """Stack biomarker dicts into a ``[P, F]`` float64 matrix with the columns of ``names``.

    Raises:
        ValueError: when a dict lacks one of ``names`` (e.g. computed with ``thickness=False``).
    """
    rows = []
    for i, b in enumerate(biomarkers):
        missing = [n for n in names if n not in b]
        if missing:
            raise ValueError(f"biomarkers[{i}] lacks {missing}")
        rows.append([float(b[n]) for n in names])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(names))


# --------------------------------------------------------------------------------------------------------------------
# few-shot classifier


def _as_features(x: Any, name: str = "features") -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [B, F], got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds non-finite values")
    return arr


class BiomarkerClassifier:
    """Few-shot classifier on biomarker vectors, fitted on the support cases only.

    :meth:`fit` standardises each feature with the support mean and a support scale, and nothing of the query set is
    ever used: predictions of a query do not depend on the other queries. The scale (``scale="pooled"``, default) is
    the pooled within-class standard deviation of the support (``sqrt(sum_c sum_i (x_i - mu_c)^2 / (n - N))``, the
    diagonal of LDA's covariance), which needs two cases in at least one class; with one shot per class (K = 1, no
    within-class spread) it falls back to the standard deviation of all support cases around their mean (``ddof=1``),
    defined for N >= 2. ``scale="total"`` always uses the latter. A feature whose scale is zero or not finite (constant
    over the support) gets scale 1: it is then only centred, which cannot favour a class because every support case,
    hence every centroid, has the same value.

    Methods, in the standardised space:

    - ``"centroid"``: nearest class centroid; ``predict_proba`` is ``softmax(-||z - mu_c||^2 / 2)``.
    - ``"logistic"``: multinomial logistic regression with an L2 penalty, objective
      ``sum_i CE_i + ||W||^2 / (2 C)`` (scikit-learn's convention; the bias is not penalised), minimised by torch
      L-BFGS in float64 from zero (the problem is strictly convex in ``W``, so the result is deterministic).

    Args:
        method: ``"centroid"`` or ``"logistic"``.
        C: inverse L2 strength of the logistic regression.
        scale: ``"pooled"`` or ``"total"`` (see above).
        max_iter: L-BFGS iterations.

    Raises:
        ValueError: for an unknown ``method`` or ``scale``, or a non-positive ``C``.

    Example::

        clf = BiomarkerClassifier("logistic").fit(support_x, support_y)   # [K*N, F], [K*N]
        proba = clf.predict_proba(query_x)                                  # [B, N], columns in clf.classes_ order
    """

    def __init__(self, method: str = "centroid", C: float = 1.0, scale: str = "pooled", max_iter: int = 200) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if scale not in ("pooled", "total"):
            raise ValueError(f"scale must be 'pooled' or 'total', got {scale!r}")
        if not C > 0:
            raise ValueError(f"C must be > 0, got {C}")
        self.method = method
        self.C = float(C)
        self.scale = scale
        self.max_iter = int(max_iter)
        self.classes_: np.ndarray | None = None
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.centroids_: np.ndarray | None = None
        self.coef_: np.ndarray | None = None
        self.intercept_: np.ndarray | None = None

    def fit(self, features: Any, labels: Any) -> BiomarkerClassifier:
        """Fit on the support set: ``features`` ``[K*N, F]``, ``labels`` ``[K*N]`` (any sortable class ids).

        Raises:
            ValueError: for mismatched sizes, fewer than two classes, or non-finite features.
        """
        x = _as_features(features)
        y_raw = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
        if y_raw.ndim != 1 or y_raw.shape[0] != x.shape[0]:
            raise ValueError(f"features {tuple(x.shape)} and labels {tuple(y_raw.shape)} do not match")
        self.classes_, y = np.unique(y_raw, return_inverse=True)
        n, n_way = x.shape[0], len(self.classes_)
        if n_way < 2:
            raise ValueError(f"the support needs at least two classes, got {n_way}")
        self.mean_ = x.mean(0)
        one_hot = np.eye(n_way)[y]  # [n, N]
        class_means = (one_hot.T @ x) / one_hot.sum(0)[:, None]
        if self.scale == "pooled" and n > n_way:
            var = ((x - class_means[y]) ** 2).sum(0) / (n - n_way)
        else:
            var = ((x - self.mean_) ** 2).sum(0) / (n - 1)
        std = np.sqrt(var)
        tiny = 1e-12 * np.maximum(1.0, np.abs(self.mean_))
        self.scale_ = np.where(np.isfinite(std) & (std > tiny), std, 1.0)
        z = self._standardise(x)
        if self.method == "centroid":
            self.centroids_ = (one_hot.T @ z) / one_hot.sum(0)[:, None]
        else:
            self.coef_, self.intercept_ = self._fit_logistic(z, y, n_way)
        return self

    def _fit_logistic(self, z: np.ndarray, y: np.ndarray, n_way: int) -> tuple[np.ndarray, np.ndarray]:
        zt = torch.as_tensor(z, dtype=torch.float64)
        yt = torch.as_tensor(y, dtype=torch.long)
        w = torch.zeros(z.shape[1], n_way, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(n_way, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [w, b], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(zt @ w + b, yt, reduction="sum") + (w**2).sum() / (2 * self.C)
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach().numpy().copy(), b.detach().numpy().copy()

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean_) / self.scale_

    def decision_function(self, features: Any) -> np.ndarray:
        """Logits ``[B, N]`` (columns in :attr:`classes_` order); each row depends on that query only.

        Raises:
            RuntimeError: before :meth:`fit`.
            ValueError: for features of the wrong width.
        """
        if self.mean_ is None:
            raise RuntimeError("call fit(support_features, support_labels) first")
        x = _as_features(features)
        if x.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"features have {x.shape[1]} columns, the support had {self.mean_.shape[0]}")
        z = self._standardise(x)
        if self.method == "centroid":
            return -0.5 * ((z[:, None, :] - self.centroids_[None, :, :]) ** 2).sum(-1)
        return z @ self.coef_ + self.intercept_

    def predict_proba(self, features: Any) -> np.ndarray:
        """Class probabilities ``[B, N]`` (softmax of :meth:`decision_function`)."""
        logits = self.decision_function(features)
        logits = logits - logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)

    def predict(self, features: Any) -> np.ndarray:
        """Predicted class ids ``[B]`` (values of :attr:`classes_`)."""
        return self.classes_[self.decision_function(features).argmax(1)]


# --------------------------------------------------------------------------------------------------------------------
# episodic evaluation


def evaluate_biomarker_episodes(
    features: Any,
    labels: Sequence[Hashable],
    patients: Sequence[Hashable],
    n_way: int,
    k_shot: int,
    episodes: int = 200,
    seed: int = 0,
    method: str = "centroid",
    n_query: int | None = None,
    classifier_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Accuracy of :class:`BiomarkerClassifier` over seeded random N-way K-shot episodes, per query patient.

    Each episode draws ``n_way`` classes (among those with at least ``k_shot + max(n_query, 1)`` patients), then per
    class ``k_shot`` support patients and ``n_query`` query patients (``None``: all its other patients), disjoint.
    The classifier is fitted on the support only and predicts the queries. Each query patient's accuracy is averaged
    over the episodes it is a query in, and the mean and 95% Student-t interval are over those patient means
    (:func:`~monai_metalearn.metrics.mean_ci95_subjects` with ``method="t"``).

    Args:
        features: ``[P, F]``, one row per patient (e.g. :func:`biomarker_matrix`).
        labels: the class of each row (e.g. the diagnosis).
        patients: the patient id of each row (distinct).
        n_way: classes per episode.
        k_shot: support patients per class.
        episodes: number of episodes.
        seed: seed of the episode draws (``numpy.random.default_rng``).
        method: ``"centroid"`` or ``"logistic"``.
        n_query: query patients per class; ``None`` takes every patient of the class not in the support.
        classifier_kwargs: further :class:`BiomarkerClassifier` arguments (``C``, ``scale``, ...).

    Returns:
        A JSON-serialisable dict: ``mean`` and ``ci95`` (half width; ``None`` for one patient) over query patients,
        ``n_patients`` (patients that were a query at least once), ``per_class`` (class -> mean of its patients'
        accuracies), ``confusion`` (``[C][C]`` counts over all query predictions, rows true, columns predicted, in
        ``classes`` order), ``classes``, ``query_accuracy`` (pooled over all query predictions), ``episodes``,
        ``n_way``, ``k_shot``, ``method``.

    Raises:
        ValueError: for mismatched lengths, repeated patients, or too few classes with enough patients.
    """
    x = _as_features(features)
    labels, patients = list(labels), list(patients)
    if not (len(labels) == len(patients) == x.shape[0]):
        raise ValueError(f"{x.shape[0]} feature rows, {len(labels)} labels and {len(patients)} patients")
    if len(set(patients)) != len(patients):
        raise ValueError("patients must be distinct: one feature row per patient")
    if k_shot < 1 or n_way < 2 or episodes < 1 or (n_query is not None and n_query < 1):
        raise ValueError(f"need k_shot >= 1, n_way >= 2, episodes >= 1, n_query >= 1, got {k_shot}, {n_way}, "
                         f"{episodes}, {n_query}")
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    rows = {c: [i for i, lab in enumerate(labels) if lab == c] for c in classes}
    eligible = [c for c in classes if len(rows[c]) >= k_shot + (n_query or 1)]
    if len(eligible) < n_way:
        raise ValueError(f"{n_way}-way {k_shot}-shot needs {n_way} classes with >= {k_shot + (n_query or 1)} "
                         f"patients; only {len(eligible)} have them")
    rng = np.random.default_rng(seed)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    correct: list[float] = []
    query_patients: list[str] = []
    for _ in range(episodes):
        chosen = [eligible[i] for i in rng.choice(len(eligible), n_way, replace=False)]
        support, support_y, query, query_y = [], [], [], []
        for way, c in enumerate(chosen):
            perm = [rows[c][i] for i in rng.permutation(len(rows[c]))]
            stop = len(perm) if n_query is None else k_shot + n_query
            support += perm[:k_shot]
            support_y += [way] * k_shot
            query += perm[k_shot:stop]
            query_y += [way] * (stop - k_shot)
        clf = BiomarkerClassifier(method, **dict(classifier_kwargs or {})).fit(x[support], np.asarray(support_y))
        pred = clf.predict(x[query])
        for row, true_way, pred_way in zip(query, query_y, pred):
            confusion[index[chosen[true_way]], index[chosen[int(pred_way)]]] += 1
            correct.append(float(true_way == pred_way))
            query_patients.append(str(patients[row]))
    summary = mean_ci95_subjects(correct, query_patients, method="t")
    per_patient: dict[str, list[float]] = {}
    for value, patient in zip(correct, query_patients):
        per_patient.setdefault(patient, []).append(value)
    class_of = {str(p): lab for p, lab in zip(patients, labels)}
    per_class: dict[str, float] = {}
    for c in classes:
        means = [float(np.mean(v)) for p, v in per_patient.items() if class_of[p] == c]
        if means:
            per_class[str(c)] = float(np.mean(means))
    return {
        "mean": summary["mean"],
        "ci95": summary["ci95"],
        "n_patients": summary["n_subjects"],
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "classes": [str(c) for c in classes],
        "query_accuracy": float(np.mean(correct)),
        "episodes": int(episodes),
        "n_way": int(n_way),
        "k_shot": int(k_shot),
        "method": method,
    }
