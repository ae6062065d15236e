# Copyright (c) monai-metalearn contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""
Canonical structure names, so that one class means one anatomical structure across sources.

Every structure has one snake_case name, with the side as a suffix (``_left``/``_right``) as in
TotalSegmentator. The label ids differ per source; a datalist item's ``structures`` field maps these
names to the id valid for that item's label map.

- CT (TotalSegmentator ``total`` task, v2 ids): :data:`TOTALSEG_NAMES`, e.g. ``5 -> liver``.
  The three TotalSegmentator label maps in the shared data (CT-1, CT-1 crop and CT-2) use these ids:
  liver (5) is the largest abdominal organ and lies on the subject's right, spleen (1) and kidney_left
  (3) on the left, humerus_left (69) far left in CT-2.
- Brain (FreeSurfer ``aseg`` ids, used by the voxelmorph ``seg`` and the SynthSeg training maps):
  :data:`FREESURFER_NAMES`, e.g. ``17 -> hippocampus_left``, ``53 -> hippocampus_right``.
- The multi-subject sets, each with its own ids but the names above wherever the structure is the same:
  :data:`BTCV_NAMES` (abdominal CT, ``6 -> liver``), :data:`CHAOS_NAMES` (abdominal MR, ``1 -> liver``),
  :data:`ACDC_NAMES` (cardiac MR: ``right_ventricle``, ``myocardium``, ``left_ventricle``) and
  :data:`LPBA40_NAMES` (brain MR: cortical gyri, ``insular_cortex_left``, ``cingulate_gyrus_left``, ``cerebellum``
  as one structure, and ``caudate_left``, ``putamen_left``, ``hippocampus_left``, ``brainstem`` as in FreeSurfer).
  A liver is ``liver`` in TotalSegmentator, BTCV and CHAOS; kidneys are ``kidney_left``/``kidney_right``.

The SynthSeg training label maps hold 21 ids beyond the 33 named by SynthSeg's ``labels_table.txt``:

- 25/57 (lesion), 30/62 (vessel), 72 (5th ventricle), 85 (optic chiasm): named as in FreeSurferColorLUT.
- 502, 506, 507, 508, 509, 511, 512, 514, 515, 516, 530: extra-cerebral labels of SimNIBS CHARM.
  FreeSurferColorLUT lists them 400 higher in its "SAMSEG-CHARM + 400" block (902 Artery, 906 EyeBalls,
  907 Other-Tissues, 908 Rectus-Muscles, 909 Mucosa, 911 Skin, 912 Charm-Spinal-Cord, 914 Vein,
  915 Bone-Cortical, 916 Bone-Cancellous, 930 Optic-Nerve); SynthSeg's tutorial calls 507
  "extra-cerebral soft tissues". The positions in the maps agree (eyeballs anterior next to the optic
  nerves, skin outermost, spinal cord below the brainstem, cortical bone next to CSF), so 512 is named
  ``spinal_cord`` like TotalSegmentator's. The +400 correspondence is inferred, not documented by SynthSeg.
- 136, 137 (left) and 163, 164 (right): FreeSurferColorLUT names these Left/Right-Caudate-Putamen and
  Left/Right-Subcortical-Gray-Matter, which does not fit the data: SynthSeg treats 136 and 137 as left
  and 163, 164 as their right twins, and in the maps 136/163 (about 1 ml) border the lateral ventricles
  and 137/164 (about 0.2 ml) the temporal horns and hippocampus, while the choroid plexus ids 31/63 are
  absent. They are probably the choroid plexus, but that is unconfirmed, so they keep neutral names
  (``synthseg_136_left``, ...).

Example::

    >>> canonical_name("Left-Hippocampus")
    'hippocampus_left'
    >>> canonical_name("left hippocampus")
    'hippocampus_left'
    >>> FREESURFER_NAMES[53], TOTALSEG_NAMES[5]
    ('hippocampus_right', 'liver')
"""

from __future__ import annotations

import difflib
import re
from types import MappingProxyType

__all__ = [
    "TOTALSEG_NAMES",
    "FREESURFER_NAMES",
    "CHARM_NAMES",
    "SYNTHSEG_UNRESOLVED_NAMES",
    "BTCV_NAMES",
    "CHAOS_NAMES",
    "ACDC_NAMES",
    "LPBA40_NAMES",
    "EXTRA_NAMES",
    "STRUCTURE_NAMES",
    "canonical_name",
]

_TOTALSEG = (
    "spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right adrenal_gland_left "
    "lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right lung_middle_lobe_right lung_lower_lobe_right "
    "esophagus trachea thyroid_gland small_bowel duodenum colon urinary_bladder prostate kidney_cyst_left "
    "kidney_cyst_right sacrum vertebrae_S1 vertebrae_L5 vertebrae_L4 vertebrae_L3 vertebrae_L2 vertebrae_L1 "
    "vertebrae_T12 vertebrae_T11 vertebrae_T10 vertebrae_T9 vertebrae_T8 vertebrae_T7 vertebrae_T6 vertebrae_T5 "
    "vertebrae_T4 vertebrae_T3 vertebrae_T2 vertebrae_T1 vertebrae_C7 vertebrae_C6 vertebrae_C5 vertebrae_C4 "
    "vertebrae_C3 vertebrae_C2 vertebrae_C1 heart aorta pulmonary_vein brachiocephalic_trunk subclavian_artery_right "
    "subclavian_artery_left common_carotid_artery_right common_carotid_artery_left brachiocephalic_vein_left "
    "brachiocephalic_vein_right atrial_appendage_left superior_vena_cava inferior_vena_cava "
    "portal_vein_and_splenic_vein iliac_artery_left iliac_artery_right iliac_vena_left iliac_vena_right "
    "humerus_left humerus_right scapula_left scapula_right clavicula_left clavicula_right femur_left femur_right "
    "hip_left hip_right spinal_cord gluteus_maximus_left gluteus_maximus_right gluteus_medius_left "
    "gluteus_medius_right gluteus_minimus_left gluteus_minimus_right autochthon_left autochthon_right "
    "iliopsoas_left iliopsoas_right brain skull rib_left_1 rib_left_2 rib_left_3 rib_left_4 rib_left_5 rib_left_6 "
    "rib_left_7 rib_left_8 rib_left_9 rib_left_10 rib_left_11 rib_left_12 rib_right_1 rib_right_2 rib_right_3 "
    "rib_right_4 rib_right_5 rib_right_6 rib_right_7 rib_right_8 rib_right_9 rib_right_10 rib_right_11 "
    "rib_right_12 sternum costal_cartilages"
).split()

#: TotalSegmentator ``total`` task (v2): label id -> canonical name (the tool's own names; vertebra levels keep
#: their upper-case letter, e.g. ``vertebrae_L1``).
TOTALSEG_NAMES: MappingProxyType[int, str] = MappingProxyType({i + 1: n for i, n in enumerate(_TOTALSEG)})

_SIDED = {  # FreeSurfer aseg: (left id, right id) -> name without side
    (2, 41): "cerebral_white_matter",
    (3, 42): "cerebral_cortex",
    (4, 43): "lateral_ventricle",
    (5, 44): "inferior_lateral_ventricle",
    (7, 46): "cerebellum_white_matter",
    (8, 47): "cerebellum_cortex",
    (10, 49): "thalamus",
    (11, 50): "caudate",
    (12, 51): "putamen",
    (13, 52): "pallidum",
    (17, 53): "hippocampus",
    (18, 54): "amygdala",
    (25, 57): "lesion",
    (26, 58): "accumbens",
    (28, 60): "ventral_dc",
    (30, 62): "vessel",
    (31, 63): "choroid_plexus",
}
_UNSIDED = {
    14: "third_ventricle",
    15: "fourth_ventricle",
    16: "brainstem",
    24: "csf",
    72: "fifth_ventricle",
    77: "white_matter_hypointensities",
    80: "non_white_matter_hypointensities",
    85: "optic_chiasm",
    251: "corpus_callosum_posterior",
    252: "corpus_callosum_mid_posterior",
    253: "corpus_callosum_central",
    254: "corpus_callosum_mid_anterior",
    255: "corpus_callosum_anterior",
}

#: SimNIBS CHARM extra-cerebral labels found in the SynthSeg training maps (FreeSurferColorLUT id - 400).
CHARM_NAMES: MappingProxyType[int, str] = MappingProxyType(
    {
        502: "artery",
        506: "eyeball",
        507: "extracerebral_soft_tissue",
        508: "rectus_muscles",
        509: "mucosa",
        511: "skin",
        512: "spinal_cord",
        514: "vein",
        515: "bone_cortical",
        516: "bone_cancellous",
        530: "optic_nerve",
    }
)

#: SynthSeg-map ids whose FreeSurferColorLUT names contradict the data (probably choroid plexus, unconfirmed).
SYNTHSEG_UNRESOLVED_NAMES: MappingProxyType[int, str] = MappingProxyType(
    {136: "synthseg_136_left", 137: "synthseg_137_left", 163: "synthseg_163_right", 164: "synthseg_164_right"}
)

_fs: dict[int, str] = {}
for (_left, _right), _base in _SIDED.items():
    _fs[_left], _fs[_right] = f"{_base}_left", f"{_base}_right"
_fs.update(_UNSIDED)
_fs.update(CHARM_NAMES)
_fs.update(SYNTHSEG_UNRESOLVED_NAMES)

#: Brain label id -> canonical name: FreeSurfer aseg ids, CHARM ids and the unresolved SynthSeg ids. Covers every id
#: present in the voxelmorph ``seg`` and in the 20 SynthSeg training maps (background 0 is not a structure).
FREESURFER_NAMES: MappingProxyType[int, str] = MappingProxyType(dict(sorted(_fs.items())))

#: BTCV abdominal CT (Multi-Atlas Labeling Beyond the Cranial Vault, also SSL-ALPNet's "SABS"): label id -> name.
BTCV_NAMES: MappingProxyType[int, str] = MappingProxyType(
    {
        1: "spleen",
        2: "kidney_right",
        3: "kidney_left",
        4: "gallbladder",
        5: "esophagus",
        6: "liver",
        7: "stomach",
        8: "aorta",
        9: "inferior_vena_cava",
        10: "portal_vein_and_splenic_vein",
        11: "pancreas",
        12: "adrenal_gland_right",
        13: "adrenal_gland_left",
    }
)

#: CHAOS abdominal MR (ids of the SSL-ALPNet NIfTI labels; the challenge's PNGs use grey values 63, 126, 189, 252).
CHAOS_NAMES: MappingProxyType[int, str] = MappingProxyType(
    {1: "liver", 2: "kidney_right", 3: "kidney_left", 4: "spleen"}
)

#: ACDC cine cardiac MR: label id -> name (the challenge's RV, MYO, LV).
ACDC_NAMES: MappingProxyType[int, str] = MappingProxyType(
    {1: "right_ventricle", 2: "myocardium", 3: "left_ventricle"}
)

_LPBA40_SIDED = {  # LPBA40: left id -> name without side; the right twin is left id + 1
    21: "superior_frontal_gyrus",
    23: "middle_frontal_gyrus",
    25: "inferior_frontal_gyrus",
    27: "precentral_gyrus",
    29: "middle_orbitofrontal_gyrus",
    31: "lateral_orbitofrontal_gyrus",
    33: "gyrus_rectus",
    41: "postcentral_gyrus",
    43: "superior_parietal_gyrus",
    45: "supramarginal_gyrus",
    47: "angular_gyrus",
    49: "precuneus",
    61: "superior_occipital_gyrus",
    63: "middle_occipital_gyrus",
    65: "inferior_occipital_gyrus",
    67: "cuneus",
    81: "superior_temporal_gyrus",
    83: "middle_temporal_gyrus",
    85: "inferior_temporal_gyrus",
    87: "parahippocampal_gyrus",
    89: "lingual_gyrus",
    91: "fusiform_gyrus",
    101: "insular_cortex",
    121: "cingulate_gyrus",
    161: "caudate",
    163: "putamen",
    165: "hippocampus",
}
_lpba: dict[int, str] = {}
for _left, _base in _LPBA40_SIDED.items():
    _lpba[_left], _lpba[_left + 1] = f"{_base}_left", f"{_base}_right"
_lpba.update({181: "cerebellum", 182: "brainstem"})

#: LPBA40 brain MR (56 structures): label id -> name. Caudate, putamen, hippocampus and brainstem share FreeSurfer's
#: names; ``cerebellum`` is the whole cerebellum (FreeSurfer splits it into cortex and white matter per side).
LPBA40_NAMES: MappingProxyType[int, str] = MappingProxyType(_lpba)

#: Structures of the other sources, which have no shared id table (spinal cord tissue, tumours, phantom labels).
EXTRA_NAMES: frozenset[str] = frozenset(
    {
        "spinal_cord_gray_matter",
        "spinal_cord_white_matter",
        "brain_tumor",
        "breast_lesion",
        "prostate_phantom_label_1",
        "prostate_phantom_label_7",
        "prostate_phantom_label_8",
        "prostate_phantom_label_9",
    }
)

#: Every canonical structure name.
STRUCTURE_NAMES: frozenset[str] = frozenset(TOTALSEG_NAMES.values()).union(
    FREESURFER_NAMES.values(),
    BTCV_NAMES.values(),
    CHAOS_NAMES.values(),
    ACDC_NAMES.values(),
    LPBA40_NAMES.values(),
    EXTRA_NAMES,
)

# Spellings used by the sources themselves (FreeSurferColorLUT, SynthSeg labels_table.txt, CHARM) -> canonical name.
_SOURCE_SPELLINGS = {
    "Left-Cerebral-White-Matter": "cerebral_white_matter_left",
    "Left-Cerebral-Cortex": "cerebral_cortex_left",
    "Left-Lateral-Ventricle": "lateral_ventricle_left",
    "Left-Inf-Lat-Vent": "inferior_lateral_ventricle_left",
    "Left-Cerebellum-White-Matter": "cerebellum_white_matter_left",
    "Left-Cerebellum-Cortex": "cerebellum_cortex_left",
    "Left-Thalamus": "thalamus_left",
    "Left-Thalamus-Proper": "thalamus_left",
    "Left-Caudate": "caudate_left",
    "Left-Putamen": "putamen_left",
    "Left-Pallidum": "pallidum_left",
    "Left-Hippocampus": "hippocampus_left",
    "Left-Amygdala": "amygdala_left",
    "Left-Lesion": "lesion_left",
    "Left-Accumbens-area": "accumbens_left",
    "left accumbens area": "accumbens_left",
    "Left-VentralDC": "ventral_dc_left",
    "left ventral DC": "ventral_dc_left",
    "Left-vessel": "vessel_left",
    "Left-choroid-plexus": "choroid_plexus_left",
    "3rd-Ventricle": "third_ventricle",
    "4th-Ventricle": "fourth_ventricle",
    "5th-Ventricle": "fifth_ventricle",
    "Brain-Stem": "brainstem",
    "WM-hypointensities": "white_matter_hypointensities",
    "non-WM-hypointensities": "non_white_matter_hypointensities",
    "Optic-Chiasm": "optic_chiasm",
    "CC_Posterior": "corpus_callosum_posterior",
    "CC_Mid_Posterior": "corpus_callosum_mid_posterior",
    "CC_Central": "corpus_callosum_central",
    "CC_Mid_Anterior": "corpus_callosum_mid_anterior",
    "CC_Anterior": "corpus_callosum_anterior",
    "EyeBalls": "eyeball",
    "Other-Tissues": "extracerebral_soft_tissue",
    "extra-cerebral soft tissues": "extracerebral_soft_tissue",
    "Charm-Spinal-Cord": "spinal_cord",
    "Optic-Nerve": "optic_nerve",
    "RV": "right_ventricle",  # ACDC
    "MYO": "myocardium",
    "LV": "left_ventricle",
    "IVC": "inferior_vena_cava",  # BTCV
    "portal and splenic vein": "portal_vein_and_splenic_vein",
}
# "L"/"R" as a side word: LPBA40 writes "L superior frontal gyrus".
_WORD_SYNONYMS = {
    "grey": "gray",
    "tumour": "tumor",
    "lh": "left",
    "rh": "right",
    "l": "left",
    "r": "right",
    "wm": "white_matter",
}
_SIDES = ("left", "right")


def _normalise(name: str) -> str:
    """Lower-case snake_case with British spellings and FreeSurfer abbreviations made canonical."""
    words = re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_").split("_")
    return "_".join(_WORD_SYNONYMS.get(w, w) for w in words if w)


_CANONICAL_BY_KEY: dict[str, str] = {_normalise(n): n for n in STRUCTURE_NAMES}
_ALIASES: dict[str, str] = {}
for _spelling, _canonical in _SOURCE_SPELLINGS.items():
    _ALIASES[_normalise(_spelling)] = _canonical
    if _spelling.lower().startswith("left"):  # the right-side twin of every left-side spelling
        _right = "right" + _spelling[4:]
        _ALIASES[_normalise(_right)] = _canonical[: -len("_left")] + "_right"


def _lookup(key: str) -> str | None:
    return _CANONICAL_BY_KEY.get(key) or _ALIASES.get(key)


def canonical_name(name: str) -> str:
    """
    Return the canonical name of a structure, accepting the spellings users and sources write.

    Case, separators (``-``, spaces, ``_``), a leading side word (``Left-Hippocampus``), British spellings
    (``grey``, ``tumour``) and the FreeSurfer, SynthSeg and CHARM label names are all understood.

    Args:
        name: a structure name, e.g. ``"Left-Hippocampus"``, ``"left hippocampus"``, ``"Liver"``.

    Returns:
        The canonical snake_case name, e.g. ``"hippocampus_left"``.

    Raises:
        KeyError: when ``name`` names no known structure; the message lists the closest known names.

    Example::

        >>> canonical_name("Right-Lateral-Ventricle")
        'lateral_ventricle_right'
        >>> canonical_name("vertebrae l1")
        'vertebrae_L1'
    """
    if not isinstance(name, str):
        raise TypeError(f"structure name must be a str, got {type(name).__name__}.")
    key = _normalise(name)
    found = _lookup(key)
    if found is None:
        words = key.split("_")
        if len(words) > 1 and words[0] in _SIDES:  # "left_hippocampus" -> "hippocampus_left"
            found = _lookup("_".join(words[1:] + words[:1]))
    if found is None:
        close = difflib.get_close_matches(key, sorted(_CANONICAL_BY_KEY), n=5, cutoff=0.6)
        hint = ", ".join(_CANONICAL_BY_KEY[c] for c in close) if close else "none"
        raise KeyError(f"unknown structure name {name!r}; closest known names: {hint}.")
    return found
