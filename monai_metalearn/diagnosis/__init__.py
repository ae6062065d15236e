"""Few-shot diagnosis: patient-level cases and episodes, and the clinical-biomarker baseline.

- :mod:`~monai_metalearn.diagnosis.cases`: one case per patient, several images as channels (ACDC: ED and ES),
  the diagnosis as the class.
- :mod:`~monai_metalearn.diagnosis.episodes`: patient-level evaluation episodes, stratified folds and the
  per-patient accuracy summary.
- :mod:`~monai_metalearn.diagnosis.biomarkers`: cardiac biomarkers from ED/ES masks (volumes, ejection fractions,
  mass, ratios, wall thickness), :class:`BiomarkerClassifier` fitted on the support alone, and
  :func:`evaluate_biomarker_episodes`.
- :mod:`~monai_metalearn.diagnosis.adrenal`: AdrenalMNIST3D cases (one per volume, official splits), 2-way K-shot
  episodes with train-split support and test-split queries, shape biomarkers of the masks (volume, surface,
  sphericity, principal axes, extents) and the case-level accuracy summary.
"""

from __future__ import annotations

from .adrenal import (
    ADRENAL_SPLIT_SIZES,
    SHAPE_BIOMARKER_NAMES,
    adrenal_cases,
    adrenal_episodes,
    adrenal_summary,
    evaluate_episodes,
    learner_predictor,
    shape_biomarker_matrix,
    shape_biomarkers,
    shape_predictor,
)
from .biomarkers import (
    BIOMARKER_NAMES,
    DEFAULT_LABELS,
    METHODS,
    MYOCARDIAL_DENSITY,
    BiomarkerClassifier,
    biomarker_matrix,
    biomarkers_from_datalist,
    biomarkers_from_files,
    cardiac_biomarkers,
    evaluate_biomarker_episodes,
    myocardial_thickness,
)
from .cases import ACDC_DIAGNOSES, CaseError, acdc_cases, case_transforms, load_cases, scale_channels
from .episodes import episode_tensors, patient_accuracy_summary, patient_episodes, stratified_patient_folds

__all__ = [
    # cases
    "ACDC_DIAGNOSES",
    "CaseError",
    "acdc_cases",
    "case_transforms",
    "load_cases",
    "scale_channels",
    # episodes
    "episode_tensors",
    "patient_accuracy_summary",
    "patient_episodes",
    "stratified_patient_folds",
    # biomarkers
    "BIOMARKER_NAMES",
    "DEFAULT_LABELS",
    "METHODS",
    "MYOCARDIAL_DENSITY",
    "BiomarkerClassifier",
    "biomarker_matrix",
    "biomarkers_from_datalist",
    "biomarkers_from_files",
    "cardiac_biomarkers",
    "evaluate_biomarker_episodes",
    "myocardial_thickness",
    # adrenal shapes
    "ADRENAL_SPLIT_SIZES",
    "SHAPE_BIOMARKER_NAMES",
    "adrenal_cases",
    "adrenal_episodes",
    "adrenal_summary",
    "evaluate_episodes",
    "learner_predictor",
    "shape_biomarker_matrix",
    "shape_biomarkers",
    "shape_predictor",
]
