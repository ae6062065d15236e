"""Few-shot diagnosis: patient-level cases and episodes, and the clinical-biomarker baseline.

- :mod:`~monai_metalearn.diagnosis.cases`: one case per patient, several images as channels (ACDC: ED and ES),
  the diagnosis as the class.
- :mod:`~monai_metalearn.diagnosis.episodes`: patient-level evaluation episodes, stratified folds and the
  per-patient accuracy summary.
- :mod:`~monai_metalearn.diagnosis.biomarkers`: cardiac biomarkers from ED/ES masks (volumes, ejection fractions,
  mass, ratios, wall thickness), :class:`BiomarkerClassifier` fitted on the support alone, and
  :func:`evaluate_biomarker_episodes`.
"""

from __future__ import annotations

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
]
