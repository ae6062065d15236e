# Copyright (c) monai-metalearn contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""
The original (upstream) layouts of the multi-subject sets: finding them in a source folder, reading their metadata,
and converting what no reader can pair (CHAOS's PNG ground truth) into a NIfTI label map on the image's grid.

:mod:`monai_metalearn.data.sources` builds datalist items from what these functions find; each ``find_*`` returns
the folder holding the layout inside a source folder, or ``None`` when the layout is absent:

- BTCV (Synapse): ``img/img0001.nii.gz`` + ``label/label0001.nii.gz``, directly in the folder or under
  ``RawData/Training/`` or ``Abdomen/RawData/Training/`` (:func:`find_btcv`, :func:`btcv_cases`).
- CHAOS: ``Train_Sets/MR/<id>/T2SPIR/DICOM_anon/*.dcm`` + ``.../T2SPIR/Ground/*.png``, also without
  ``Train_Sets/`` (:func:`find_chaos`, :func:`chaos_cases`, :func:`chaos_ground_to_nifti`, :func:`chaos_label`).
- ACDC: ``training/patient001/`` (also ``database/training/``, or ``patient001/`` directly, and the testing split
  ``testing/patient101/`` where it has ``_gt`` files) with ``patient001_frame01.nii.gz``, ``..._gt.nii.gz`` and
  ``Info.cfg`` (:func:`find_acdc`, :func:`acdc_patients`, :func:`read_acdc_info`).
- LPBA40 (LONI): ``delineation_space/S01/S01.delineation.skullstripped.hdr`` + ``S01.delineation.structure.label.hdr``
  (image data in ``.img`` or ``.img.gz``), or ``.nii.gz``/``.nii`` of the same names (:func:`find_lpba40`,
  :func:`lpba40_cases`). Analyze pairs are read through ITK (:class:`~monai_metalearn.data.loading.LoadScan`), which
  reads ``.hdr`` + ``.img`` and ``.hdr`` + ``.img.gz``; nibabel reads ``.hdr`` + ``.img`` only. Analyze headers hold
  no orientation: ITK reads them with an identity direction (LPS), nibabel as LAS.

The label ids present in an upstream label map are not known in advance: :func:`label_ids` reads the map once and
raises :class:`LabelIdError` (naming the file) for an id outside the source's table.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from monai.config import PathLike
from monai.utils import optional_import

from monai_metalearn.data.loading import LoadScan
from monai_metalearn.errors import DataError

nib, _ = optional_import("nibabel")
pydicom, _ = optional_import("pydicom")
Image, _ = optional_import("PIL.Image")

__all__ = [
    "LabelIdError",
    "label_ids",
    "BTCV_LAYOUT",
    "CHAOS_LAYOUT",
    "ACDC_LAYOUT",
    "LPBA40_LAYOUT",
    "find_btcv",
    "btcv_cases",
    "find_chaos",
    "chaos_cases",
    "CHAOS_GREY_RANGES",
    "chaos_grey_to_ids",
    "chaos_ground_to_nifti",
    "chaos_label",
    "DEFAULT_CHAOS_CACHE",
    "find_acdc",
    "acdc_patients",
    "read_acdc_info",
    "find_lpba40",
    "lpba40_cases",
]

#: The upstream layouts in words (named in the errors of :mod:`monai_metalearn.data.sources`).
BTCV_LAYOUT = (
    "img/img0001.nii.gz + label/label0001.nii.gz (optionally under RawData/Training/ or Abdomen/RawData/Training/)"
)
CHAOS_LAYOUT = (
    "Train_Sets/MR/<id>/T2SPIR/DICOM_anon/*.dcm + Train_Sets/MR/<id>/T2SPIR/Ground/*.png (or MR/<id>/T2SPIR/...)"
)
ACDC_LAYOUT = (
    "training/patient001/{patient001_frame01.nii.gz, patient001_frame01_gt.nii.gz, Info.cfg} (or database/training/, "
    "or patient001/ directly; testing/patient101/ too where it has _gt files)"
)
LPBA40_LAYOUT = (
    "delineation_space/S01/S01.delineation.skullstripped.hdr (+ .img or .img.gz) + "
    "S01.delineation.structure.label.hdr (or .nii.gz), optionally under LPBA40/"
)

#: Default folder of the NIfTI label maps converted from CHAOS's PNG ground truth.
DEFAULT_CHAOS_CACHE = Path("~/.cache/monai_metalearn/chaos_labels")

#: CHAOS ground-truth grey value ranges (inclusive) -> label id: liver 63, right kidney 126, left kidney 189, spleen 252
#: (the ranges of the challenge's evaluation code); the ids are those of :data:`~.names.CHAOS_NAMES`.
CHAOS_GREY_RANGES: Mapping[int, tuple[int, int]] = {1: (55, 70), 2: (110, 135), 3: (175, 200), 4: (240, 255)}


class LabelIdError(DataError):
    """
    A label map holds values that are not ids of its source's label table.

    Args:
        message: the full message, naming the file.
        path: the label map (or ground-truth image) at fault.
        values: the offending values.
    """

    def __init__(self, message: str, path: PathLike, values: Sequence[float]) -> None:
        super().__init__(message)
        self.path = path
        self.values = tuple(values)


def _natural_key(path: Path) -> list:
    """Sort key that orders ``IMG-2.png`` before ``IMG-10.png`` (and zero-padded names as plain sorting does)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _first_existing(candidates: Sequence[Path]) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


def label_ids(path: PathLike, table: Mapping[int, str], source: str) -> list[int]:
    """
    Read a label map once and return the ids it holds (background 0 excluded), checking them against ``table``.

    The map is read with :class:`~monai_metalearn.data.loading.LoadScan`, as a datalist consumer would read it.

    Args:
        path: the label map.
        table: label id -> structure name of the source.
        source: the source's name, for messages.

    Raises:
        ScanLoadError: when the file cannot be read (the message names it).
        LabelIdError: when the map holds a value that is not an id of ``table`` (non-integer values included).
    """
    label = LoadScan(dtype=None, check_finite=False)(str(path), key="label")
    values = np.unique(label.detach().cpu().numpy())
    bad = [float(v) for v in values if v != 0 and (v != np.round(v) or int(v) not in table)]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise LabelIdError(
            f"source {source!r}: label map {path} holds values {shown} that are not label ids of the source "
            f"(valid ids: {min(table)}..{max(table)}, {len(table)} structures).",
            path,
            bad,
        )
    return [int(v) for v in values if v != 0]


# ----------------------------------------------------------------------------------------------------------------
# BTCV


def find_btcv(folder: PathLike) -> Path | None:
    """The folder holding BTCV's ``img/`` and ``label/`` inside ``folder``, or ``None``."""
    folder = Path(folder)
    for root in (folder, folder / "RawData" / "Training", folder / "Abdomen" / "RawData" / "Training"):
        if (root / "img").is_dir() and any((root / "img").glob("img*.nii*")):
            return root
    return None


def btcv_cases(root: PathLike) -> list[tuple[str, Path, Path]]:
    """
    BTCV's cases in ``root`` (as found by :func:`find_btcv`): ``(case number, image, label)``, e.g. ``"0001"``.

    Raises:
        FileNotFoundError: an image without its label map (the message names the missing file).
    """
    root = Path(root)
    cases = []
    for image in sorted((root / "img").glob("img*.nii*"), key=_natural_key):
        match = re.fullmatch(r"img(\d+)(\.nii(?:\.gz)?)", image.name)
        if match is None:
            continue
        case, suffix = match.groups()
        label = _first_existing([root / "label" / f"label{case}{s}" for s in (suffix, ".nii.gz", ".nii")])
        if label is None:
            raise FileNotFoundError(f"BTCV image {image} has no label map {root / 'label' / f'label{case}{suffix}'}.")
        cases.append((case, image, label))
    return cases


# ----------------------------------------------------------------------------------------------------------------
# CHAOS


def _chaos_case_dirs(mr: Path) -> list[Path]:
    if not mr.is_dir():
        return []
    dirs = [d for d in mr.iterdir() if d.name.isdigit() and (d / "T2SPIR" / "DICOM_anon").is_dir()]
    return sorted(dirs, key=lambda d: int(d.name))


def find_chaos(folder: PathLike) -> Path | None:
    """The ``MR`` folder of CHAOS's training set inside ``folder`` (``Train_Sets/MR`` or ``MR``), or ``None``."""
    folder = Path(folder)
    for mr in (folder / "Train_Sets" / "MR", folder / "CHAOS_Train_Sets" / "Train_Sets" / "MR", folder / "MR"):
        if _chaos_case_dirs(mr):
            return mr
    return None


def chaos_cases(root: PathLike) -> list[tuple[int, Path, Path]]:
    """
    CHAOS's T2-SPIR cases in the ``MR`` folder ``root``: ``(case id, DICOM series folder, ground-truth folder)``.

    Raises:
        FileNotFoundError: a case without its ``T2SPIR/Ground`` folder of PNGs.
    """
    cases = []
    for case in _chaos_case_dirs(Path(root)):
        ground = case / "T2SPIR" / "Ground"
        if not ground.is_dir() or not any(ground.glob("*.png")):
            raise FileNotFoundError(f"CHAOS case {case.name}: no ground-truth PNGs in {ground}.")
        cases.append((int(case.name), case / "T2SPIR" / "DICOM_anon", ground))
    return cases


def chaos_grey_to_ids(grey: np.ndarray, path: PathLike = "<array>") -> np.ndarray:
    """
    Map a CHAOS ground-truth PNG's grey values to label ids 1..4 (:data:`CHAOS_GREY_RANGES`), background 0 kept.

    Args:
        grey: the PNG's pixels (2D).
        path: the PNG, for messages.

    Raises:
        LabelIdError: a non-zero grey value outside every range (the message names the file and the values).
    """
    grey = np.asarray(grey)
    ids = np.zeros(grey.shape, dtype=np.uint8)
    known = grey == 0
    for label, (low, high) in CHAOS_GREY_RANGES.items():
        inside = (grey >= low) & (grey <= high)
        ids[inside] = label
        known |= inside
    if not known.all():
        bad = sorted({float(v) for v in np.unique(grey[~known])})
        raise LabelIdError(
            f"CHAOS ground truth {path}: grey values {', '.join(f'{v:g}' for v in bad[:10])} are none of liver "
            f"(55-70), right kidney (110-135), left kidney (175-200), spleen (240-255) or background 0.",
            path,
            bad,
        )
    return ids


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as png:
        pixels = np.asarray(png)
    if pixels.ndim == 3:  # grey stored as RGB(A): every colour channel must agree
        if not all(np.array_equal(pixels[..., 0], pixels[..., c]) for c in range(1, min(3, pixels.shape[-1]))):
            raise ValueError(f"CHAOS ground truth {path} is a colour image, not a grey-value label image.")
        pixels = pixels[..., 0]
    return pixels


def _dicom_files(folder: Path) -> list[Path]:
    files = [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")]
    return sorted(files, key=_natural_key)


def chaos_ground_to_nifti(dicom_dir: PathLike, ground_dir: PathLike, out_file: PathLike) -> Path:
    """
    Convert a CHAOS ground-truth folder (one PNG per DICOM slice) into a NIfTI label map on the series' grid.

    The PNGs pair with the DICOM files in the order of their names (natural order, so ``IMG-2`` precedes
    ``IMG-10``); PNG pixel ``(row, column)`` is the label of the paired slice's pixel ``(row, column)``. Each slice's
    pixels are placed through the slice's own geometry (``ImagePositionPatient``, ``ImageOrientationPatient``,
    ``PixelSpacing``) on the grid of the series as :class:`~monai_metalearn.data.loading.LoadScan` loads it, whose
    shape and affine the written NIfTI takes, so the image folder and the label load as one grid.

    Args:
        dicom_dir: the ``DICOM_anon`` series folder.
        ground_dir: the ``Ground`` folder of PNGs.
        out_file: the NIfTI file to write (``.nii.gz``); its folder is created if needed.

    Returns:
        ``out_file``.

    Raises:
        ScanLoadError: the series cannot be read.
        ValueError: PNG and DICOM counts or sizes differ, or a slice does not fall on the loaded grid (named).
        LabelIdError: a PNG holds grey values outside the CHAOS ranges (named).
    """
    dicom_dir, ground_dir, out_file = Path(dicom_dir), Path(ground_dir), Path(out_file)
    dicoms = _dicom_files(dicom_dir)
    pngs = sorted(ground_dir.glob("*.png"), key=_natural_key)
    if len(dicoms) != len(pngs):
        raise ValueError(
            f"CHAOS: {len(dicoms)} DICOM files in {dicom_dir} but {len(pngs)} ground-truth PNGs in {ground_dir}; "
            "the ground truth needs one PNG per slice."
        )
    image = LoadScan(dtype=None, check_finite=False)(str(dicom_dir), key="image")
    shape = tuple(int(s) for s in image.shape[1:])
    affine = image.affine.detach().cpu().numpy().astype(np.float64)
    to_voxel = np.linalg.inv(affine)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    label = np.zeros(shape, dtype=np.uint8)
    slices = []
    for dicom, png in zip(dicoms, pngs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(dicom), stop_before_pixels=True)
        ids = chaos_grey_to_ids(_read_png(png), png)
        if ids.shape != (int(ds.Rows), int(ds.Columns)):
            raise ValueError(
                f"CHAOS ground truth {png} is {ids.shape} pixels but its slice {dicom} is "
                f"{(int(ds.Rows), int(ds.Columns))}."
            )
        origin = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        row_spacing, column_spacing = (float(s) for s in ds.PixelSpacing)
        along_row, along_column = orientation[:3] * column_spacing, orientation[3:] * row_spacing  # per c, per r
        linear = to_voxel[:3, :3] @ lps_to_ras
        start = linear @ origin + to_voxel[:3, 3]
        rows, columns = np.mgrid[: ids.shape[0], : ids.shape[1]]
        coords = (
            start[:, None, None]
            + (linear @ along_column)[:, None, None] * rows
            + (linear @ along_row)[:, None, None] * columns
        )
        index = np.rint(coords).astype(np.int64)
        off = float(np.abs(coords - index).max())
        inside = all((index[a] >= 0).all() and (index[a] < shape[a]).all() for a in range(3))
        if off > 0.1 or not inside:
            raise ValueError(
                f"CHAOS slice {dicom} does not fall on the voxels of the series loaded from {dicom_dir} "
                f"(grid {shape}; off by up to {off:.3g} voxels, inside: {inside})."
            )
        label[index[0], index[1], index[2]] = ids
        slices.append(frozenset(np.unique(index[2]).tolist()))
    if len(set(slices)) != len(slices) or len(set().union(*slices)) != len(slices):
        raise ValueError(f"CHAOS slices of {dicom_dir} do not map one to one onto the slices of its loaded grid.")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    nifti = nib.Nifti1Image(label, affine)
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    partial = out_file.with_name(f".{out_file.name}.{os.getpid()}.partial.nii.gz")
    nib.save(nifti, str(partial))
    os.replace(partial, out_file)
    return out_file


def chaos_label(case: int, dicom_dir: PathLike, ground_dir: PathLike, cache_dir: PathLike | None = None) -> Path:
    """
    The NIfTI label map of a CHAOS case, converted by :func:`chaos_ground_to_nifti` into ``cache_dir`` once.

    The converted file is re-used while it is newer than every PNG and DICOM file of the case. Its name holds the case
    id and a hash of the ground-truth folder's path, so copies of CHAOS in different folders do not collide.

    Args:
        case: the CHAOS case id.
        dicom_dir: the ``DICOM_anon`` series folder.
        ground_dir: the ``Ground`` folder of PNGs.
        cache_dir: where converted labels are kept (default :data:`DEFAULT_CHAOS_CACHE`).

    Raises:
        see :func:`chaos_ground_to_nifti`.
    """
    dicom_dir, ground_dir = Path(dicom_dir), Path(ground_dir)
    cache = Path(DEFAULT_CHAOS_CACHE if cache_dir is None else cache_dir).expanduser()
    digest = hashlib.sha1(str(ground_dir.resolve()).encode()).hexdigest()[:12]
    out = cache / f"chaos_{case:02d}_{digest}_label.nii.gz"
    inputs = [*ground_dir.glob("*.png"), *_dicom_files(dicom_dir)]
    newest = max(f.stat().st_mtime_ns for f in inputs)
    if out.exists() and out.stat().st_mtime_ns > newest:
        return out
    return chaos_ground_to_nifti(dicom_dir, ground_dir, out)


# ----------------------------------------------------------------------------------------------------------------
# ACDC

_ACDC_SETS = ("training", "database/training", "testing", "database/testing", ".")


def _acdc_patient_dirs(folder: Path) -> list[Path]:
    found: dict[str, Path] = {}
    for sub in _ACDC_SETS:
        parent = folder / sub
        if not parent.is_dir():
            continue
        for d in sorted(parent.iterdir()):
            if re.fullmatch(r"patient\d{3}", d.name) and (d / "Info.cfg").is_file():
                found.setdefault(d.name, d)
    return [found[p] for p in sorted(found)]


def find_acdc(folder: PathLike) -> Path | None:
    """``folder`` if it holds ACDC patient folders (``patient001/`` with ``Info.cfg``) where expected, else ``None``."""
    return Path(folder) if _acdc_patient_dirs(Path(folder)) else None


def read_acdc_info(path: PathLike) -> dict[str, object]:
    """
    Read an ACDC ``Info.cfg`` (lines ``ED: 1``, ``ES: 12``, ``Group: DCM``, ``Height: 184``, ...).

    Returns:
        ``{"ED": int, "ES": int, "Group": str, ...}``: integers and decimals as numbers, other values as strings.

    Raises:
        ValueError: ``ED``, ``ES`` or ``Group`` missing or not readable (the message names the file).
    """
    info: dict[str, object] = {}
    for line in Path(path).read_text().splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if re.fullmatch(r"[+-]?\d+", value):
            info[key] = int(value)
        elif re.fullmatch(r"[+-]?\d*\.\d+(?:[eE][+-]?\d+)?|[+-]?\d+[eE][+-]?\d+", value):
            info[key] = float(value)
        else:
            info[key] = value
    missing = [k for k in ("ED", "ES") if not isinstance(info.get(k), int)] + (
        [] if isinstance(info.get("Group"), str) and info["Group"] else ["Group"]
    )
    if missing:
        raise ValueError(
            f"ACDC {path}: no readable {', '.join(missing)} line(s) (expected e.g. 'ED: 1', 'Group: DCM')."
        )
    return info


def _frame_file(patient_dir: Path, frame: int, suffix: str = "") -> Path | None:
    stem = f"{patient_dir.name}_frame{frame:02d}{suffix}"
    return _first_existing([patient_dir / f"{stem}.nii.gz", patient_dir / f"{stem}.nii"])


def acdc_patients(root: PathLike) -> list[dict[str, object]]:
    """
    ACDC's patients under ``root``: ``{"patient", "info", "frames": {"ED": (image, label, frame), "ES": ...}}``.

    Training patients must have both frames and their ``_gt`` files; testing patients without ``_gt`` files (the
    original release) are skipped.

    Raises:
        ValueError: an unreadable ``Info.cfg``.
        FileNotFoundError: a training patient's frame or ``_gt`` file is missing (the message names it).
    """
    patients = []
    for d in _acdc_patient_dirs(Path(root)):
        info = read_acdc_info(d / "Info.cfg")
        frames, missing = {}, []
        for phase in ("ED", "ES"):
            frame = int(info[phase])
            image, label = _frame_file(d, frame), _frame_file(d, frame, "_gt")
            for path, suffix in ((image, ""), (label, "_gt")):
                if path is None:
                    missing.append(f"{d / f'{d.name}_frame{frame:02d}{suffix}.nii.gz'} ({phase})")
            frames[phase] = (image, label, frame)
        if missing:
            if d.parent.name == "testing":  # the original testing release has no ground truth
                continue
            raise FileNotFoundError(f"ACDC patient {d.name}: missing {', '.join(missing)}.")
        patients.append({"patient": d.name, "info": info, "frames": frames})
    return patients


# ----------------------------------------------------------------------------------------------------------------
# LPBA40

_LPBA40_IMAGE, _LPBA40_LABEL = "delineation.skullstripped", "delineation.structure.label"


def _lpba40_file(subject_dir: Path, kind: str) -> Path | None:
    stem = subject_dir / f"{subject_dir.name}.{kind}"
    return _first_existing([Path(f"{stem}{s}") for s in (".nii.gz", ".nii", ".hdr")])


def _lpba40_subject_dirs(space: Path) -> list[Path]:
    if not space.is_dir():
        return []
    dirs = [d for d in space.iterdir() if re.fullmatch(r"S\d{2}", d.name) and _lpba40_file(d, _LPBA40_IMAGE)]
    return sorted(dirs, key=lambda d: d.name)


def find_lpba40(folder: PathLike) -> Path | None:
    """The ``delineation_space`` folder of LPBA40 inside ``folder`` (or ``folder/LPBA40``), or ``None``."""
    folder = Path(folder)
    for space in (folder / "delineation_space", folder / "LPBA40" / "delineation_space"):
        if _lpba40_subject_dirs(space):
            return space
    return None


def _check_analyze_pair(path: Path) -> None:
    if path.name.endswith(".hdr") and _first_existing([path.with_suffix(".img"), path.with_suffix(".img.gz")]) is None:
        raise FileNotFoundError(f"LPBA40 Analyze header {path} has no image data {path.with_suffix('.img')}[.gz].")


def lpba40_cases(root: PathLike) -> list[tuple[str, Path, Path]]:
    """
    LPBA40's subjects in the ``delineation_space`` folder ``root``: ``(subject, image, label)``, e.g. ``"S01"``.

    Raises:
        FileNotFoundError: a subject without its label map, or an Analyze header without its ``.img``/``.img.gz``.
    """
    cases = []
    for d in _lpba40_subject_dirs(Path(root)):
        image, label = _lpba40_file(d, _LPBA40_IMAGE), _lpba40_file(d, _LPBA40_LABEL)
        if label is None:
            raise FileNotFoundError(f"LPBA40 subject {d.name}: no {d / f'{d.name}.{_LPBA40_LABEL}'}.hdr/.nii.gz.")
        for path in (image, label):
            _check_analyze_pair(path)
        cases.append((d.name, image, label))
    return cases
