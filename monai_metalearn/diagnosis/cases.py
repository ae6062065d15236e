"""Diagnosis cases: one item per patient, several co-registered images as channels, the diagnosis as the class.

A *case* is a dict ``{"id", "subject", "image": [paths...], "label": [paths...] (optional), "class"}``: the images of
one patient that belong together (ACDC: the end-diastolic and end-systolic cine frames) are loaded as the channels of
one image by :class:`~monai_metalearn.data.LoadScand` (which checks they share one grid and names both files when
not). Episodes over cases are :class:`~monai_metalearn.data.ClassificationEpisodeDataset` episodes with
``class_key="class"`` and ``cross_subject=True``: N diagnoses, K confirmed patients each, query patients never in the
support.

Example::

    from monai_metalearn.diagnosis import acdc_cases, load_cases
    from monai_metalearn.data import ClassificationEpisodeDataset

    cases = load_cases(acdc_cases(data_dir))                 # 30 patients, image [2, 64, 64, 16] (ED, ES)
    episodes = ClassificationEpisodeDataset(cases, n_way=5, k_shot=5, q_query=1, num_episodes=100,
                                            cross_subject=True, seed=0)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from monai_metalearn.errors import DataError

__all__ = [
    "ACDC_DIAGNOSES",
    "CaseError",
    "acdc_cases",
    "case_transforms",
    "load_cases",
    "scale_channels",
]

#: ACDC's five groups: dilated / hypertrophic cardiomyopathy, previous myocardial infarction, normal, abnormal RV
ACDC_DIAGNOSES = ("DCM", "HCM", "MINF", "NOR", "RV")


class CaseError(DataError):
    """A diagnosis case list is malformed (names the case and the key)."""


def acdc_cases(data_dir: str | os.PathLike | None = None, phases: Sequence[str] = ("ED", "ES"),
               patients: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """ACDC patients as diagnosis cases: ``image`` the cine frames of ``phases`` (paths, in order), ``label`` their
    manual masks (RV 1, myocardium 2, LV 3), ``class`` the diagnosis group, ``id`` / ``subject`` the patient.

    Args:
        data_dir: the data folder (default ``$MONAI_DATA_DIRECTORY``); the shared layout or ACDC's own.
        phases: which frames, as channels (``"ED"``, ``"ES"``).
        patients: keep only these patient ids (``"patient001"``).

    Raises:
        CaseError: a patient lacks one of the phases, or a requested patient is not in the data.
    """
    from monai_metalearn.data import load_datalist

    items = load_datalist("acdc", data_dir, phases=list(phases))
    by_patient: dict[str, dict[str, Mapping[str, Any]]] = {}
    for item in items:
        by_patient.setdefault(str(item["patient"]), {})[str(item["phase"])] = item
    wanted = sorted(by_patient) if patients is None else [str(p) for p in patients]
    missing = [p for p in wanted if p not in by_patient]
    if missing:
        raise CaseError(f"ACDC patients {missing} are not in the data ({len(by_patient)} patients found)")
    cases = []
    for patient in wanted:
        frames = by_patient[patient]
        absent = [ph for ph in phases if ph not in frames]
        if absent:
            raise CaseError(f"ACDC {patient}: no {absent} frame (has {sorted(frames)})")
        first = frames[phases[0]]
        cases.append({
            "id": patient,
            "subject": first["subject"],
            "image": [frames[ph]["image"] for ph in phases],
            "label": [frames[ph]["label"] for ph in phases],
            "phases": list(phases),
            "class": first["diagnosis"],
            "modality": "MR",
            "intensity": "mr",
            "source": "acdc",
            "structures": dict(first["structures"]),
        })
    return cases


def scale_channels(image: torch.Tensor, intensity: str | None = "mr") -> torch.Tensor:
    """Each channel scaled to ``[0, 1]`` on its own (per image, by its intensity kind: never an HU window on MR)."""
    from monai_metalearn.transforms import scale_intensity

    return torch.stack([scale_intensity(c, intensity) for c in torch.as_tensor(image)])


class _ScaleChannelsd:
    def __init__(self, key: str = "image") -> None:
        self.key = key

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        from monai.data import MetaTensor

        d = dict(data)
        img = d[self.key]
        scaled = scale_channels(img, d.get("intensity", "mr"))
        d[self.key] = MetaTensor(scaled, meta=img.meta) if isinstance(img, MetaTensor) else scaled
        return d


def case_transforms(spatial_size: Sequence[int] = (64, 64, 16), pixdim: Sequence[float] | None = (3.0, 3.0, 8.0),
                    with_label: bool = False):
    """Read a case (its images as channels, checked on one grid), reorient to RAS, resample to ``pixdim``, scale
    every channel on its own and crop / pad the centre to ``spatial_size``.

    The defaults (192 x 192 mm in-plane at 3 mm, 16 slices of 8 mm) hold the whole heart of every ACDC patient: the
    heart's centre lies within 60 mm of the image centre in the 30 shared patients, its extent below 130 mm.
    """
    from monai.transforms import Compose, EnsureTyped, Orientationd, ResizeWithPadOrCropd, Spacingd

    from monai_metalearn.data import LoadScand

    keys = ["image", "label"] if with_label else ["image"]
    steps: list[Any] = [LoadScand(keys=keys),
                        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    if pixdim is not None:
        steps.append(Spacingd(keys=keys, pixdim=pixdim, mode=["bilinear" if k == "image" else "nearest" for k in keys]))
    steps += [_ScaleChannelsd("image"), ResizeWithPadOrCropd(keys=keys, spatial_size=spatial_size),
              EnsureTyped(keys=keys, track_meta=False)]
    return Compose(steps)


def load_cases(cases: Sequence[Mapping[str, Any]], transform: Any = None, progress: bool = False) -> list[dict[str, Any]]:
    """Every case read and preprocessed once (``transform``, default :func:`case_transforms`), held in memory: a
    list of dicts with tensors, ready for :class:`~monai_metalearn.data.ClassificationEpisodeDataset`.

    Raises:
        CaseError: a case without ``image`` or ``class``.
        ScanLoadError: unreadable files or images of one case on different grids.
    """
    from tqdm.auto import tqdm

    for i, case in enumerate(cases):
        for key in ("image", "class"):
            if key not in case:
                raise CaseError(f"case {i} ({case.get('id', '?')}) has no {key!r} key (keys: {sorted(case)})")
    transform = case_transforms() if transform is None else transform
    return [dict(transform(dict(c))) for c in tqdm(cases, desc="load cases", disable=not progress)]
