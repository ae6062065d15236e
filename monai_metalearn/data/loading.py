# Copyright (c) monai-metalearn contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""
Checked loading of scans: MONAI's ``LoadImage`` underneath, one clear error for every way a scan can be bad.

:class:`LoadScan` / :class:`LoadScand` read NIfTI, NRRD (ITK), DICOM series folders (ITK/GDCM, including JPEG 2000
lossless) and ``"file.npz#key"`` arrays (:class:`~monai_metalearn.data.readers.NpzReader`), channel-first, and
raise :class:`ScanLoadError` (a :class:`~monai_metalearn.errors.DataError` and a ``RuntimeError``) whose message
starts with the key and the file path when:

- the file or folder does not exist;
- it cannot be read (truncated or garbage NIfTI, a DICOM folder with files that are not slices of its series, an
  unknown ``npz`` key, ...);
- the image has NaN or infinite values (``check_finite``);
- the image and label grids differ in shape or affine beyond ``geometry_atol`` mm (``check_geometry``).

:func:`validate_datalist` checks a whole datalist up front by reading headers only.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai.config import DtypeLike, KeysCollection, PathLike
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, Transform
from monai.utils import get_equivalent_dtype, optional_import

from monai_metalearn.data.readers import NpzReader, split_npz_path
from monai_metalearn.errors import DataError

# On machines without NVIDIA's nvImageCodec, MONAI logs a warning each time a DICOM series is read; the pydicom
# fallback it announces is exactly what we use, so the message is noise in every progress bar.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

nib, _ = optional_import("nibabel")
itk, _ = optional_import("itk")
pydicom, _ = optional_import("pydicom")

__all__ = [
    "ScanLoadError",
    "LoadScan",
    "LoadScand",
    "LoadScanD",
    "LoadScanDict",
    "validate_datalist",
    "dicom_series_files",
]


class ScanLoadError(DataError, RuntimeError):
    """
    A scan is missing, unreadable, not finite, or does not fit its partner's grid.

    A :class:`~monai_metalearn.errors.DataError` (so also a ``ValueError``) and, as MONAI's own loading errors, a
    ``RuntimeError``.

    Args:
        message: the full message, starting with the key (if any) and the path.
        key: the datalist key of the scan (``"image"``, ``"label"``), or ``None``.
        path: the path of the scan.
    """

    def __init__(self, message: str, key: Hashable | None = None, path: PathLike | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.path = path


def _prefix(path: Any, key: Hashable | None) -> str:
    return f"{path}" if key is None else f"{key}: {path}"


def _is_complete_dicom_slice(file: str) -> bool:
    """Whether pydicom parses ``file`` as DICOM with complete pixel data (fast: no decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(file)
        if "PixelData" not in ds:  # e.g. encapsulated pixel data cut short: pydicom drops the element
            return False
        if not ds.file_meta.TransferSyntaxUID.is_compressed:
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            expected = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * int(ds.BitsAllocated) // 8 * frames
            return len(ds.PixelData) >= expected
        return True
    except Exception:
        return False


def _stray_error(stray: Sequence[str], total: int) -> ValueError:
    shown = ", ".join(Path(f).name for f in stray[:5]) + (", ..." if len(stray) > 5 else "")
    return ValueError(
        f"{len(stray)} of {total} files are not readable slices of the DICOM series "
        f"(corrupt, truncated or not DICOM): {shown}"
    )


def dicom_series_files(folder: PathLike) -> list[str]:
    """
    Return the files of the single DICOM series in ``folder``, checking that every file belongs to it.

    Every file is first parsed with pydicom (complete pixel data required, nothing decoded), then grouped into
    series as MONAI's ``ITKReader`` does (GDCM, series UID and series date). GDCM silently skips files it cannot
    parse and ``ITKReader`` silently reads only the first of several series; both are errors here.

    Args:
        folder: a folder holding one DICOM series and nothing else (hidden files are ignored).

    Raises:
        ValueError: no series, several series, or files that are not slices of the series (all named).
    """
    folder = str(folder)
    present = sorted(
        str(Path(folder, f)) for f in os.listdir(folder) if not f.startswith(".") and Path(folder, f).is_file()
    )
    stray = [f for f in present if not _is_complete_dicom_slice(f)]
    if stray:
        raise _stray_error(stray, len(present))
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # as monai.data.ITKReader
    names.SetGlobalWarningDisplay(False)
    names.SetDirectory(folder)
    uids = list(names.GetSeriesUIDs())
    if not uids:
        raise ValueError("no DICOM series found in the folder")
    if len(uids) > 1:
        raise ValueError(f"the folder holds {len(uids)} DICOM series; keep one series per folder")
    files = [str(f) for f in names.GetFileNames(uids[0])]
    stray = sorted(set(present) - {str(Path(f)) for f in files})
    if stray:
        raise _stray_error(stray, len(present))
    return files


class LoadScan(Transform):
    """
    Load one scan channel-first with MONAI's ``LoadImage``, raising :class:`ScanLoadError` on any problem.

    Reads NIfTI and other nibabel formats, NRRD/MHA and DICOM series folders through ITK, and ``"file.npz#key"``
    arrays through :class:`~monai_metalearn.data.readers.NpzReader` (LIA 1 mm affine unless ``npz_affine``).

    Args:
        dtype: data type of the returned tensor (``None`` keeps the file's).
        check_finite: raise when the image holds NaN or infinite values.
        npz_affine: affine for ``.npz`` arrays; ``None`` for FreeSurfer's LIA 1 mm, centred.

    Raises:
        ScanLoadError: when the file is missing or unreadable, or has non-finite values.

    Example::

        load = LoadScan()
        ct = load("totalsegmentator/example_ct_dicom")  # MetaTensor (1, 512, 512, 20), HU
    """

    def __init__(
        self, dtype: DtypeLike | None = np.float32, check_finite: bool = True, npz_affine: np.ndarray | None = None
    ) -> None:
        self.dtype = dtype
        self.check_finite = check_finite
        with warnings.catch_warnings():  # MONAI warns on CPU-only machines that nvImageCodec is not available
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            self._loader = LoadImage(reader=None, image_only=True, dtype=dtype, ensure_channel_first=True)
        self._loader.register(NpzReader(affine=npz_affine))  # registered last: tried first for .npz paths

    def __call__(self, filename: PathLike, key: Hashable | None = None) -> MetaTensor:
        """
        Args:
            filename: a file, a DICOM series folder, or ``"file.npz#key"``.
            key: name used at the start of error messages (the datalist key, e.g. ``"image"``).
        """
        prefix = _prefix(filename, key)
        path = Path(split_npz_path(filename)[0]).expanduser()
        if not path.exists():
            raise ScanLoadError(f"{prefix}: file not found", key, filename)
        if path.is_dir():
            try:
                dicom_series_files(path)
            except Exception as e:
                raise ScanLoadError(f"{prefix}: unreadable DICOM series folder: {e}", key, filename) from e
        try:
            img = self._loader(str(filename))
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ScanLoadError(
                f"{prefix}: cannot be read ({type(e).__name__}: {reason})", key, filename
            ) from e
        if self.check_finite:
            _check_finite(img, prefix, key, filename)
        return img


def _check_finite(img: torch.Tensor, prefix: str, key: Hashable | None, path: Any) -> None:
    if not torch.is_floating_point(img):
        return
    finite = torch.isfinite(img)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(img).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ScanLoadError(f"{prefix}: {n_nan} NaN and {n_inf} infinite intensities", key, path)


_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


def correct_orientation(img: MetaTensor, codes: str, key: Hashable | None = None) -> MetaTensor:
    """
    ``img`` with its affine mirrored so that its orientation codes read ``codes`` (e.g. ``"LAS"``): for files whose
    header points a voxel axis the wrong way. Each voxel axis whose header code is the opposite of ``codes`` has its
    world axis mirrored (the affine's row negated); the voxel data do not move. The header's affine is kept in
    ``meta["header_affine"]``.

    Raises:
        ScanLoadError: ``codes`` is not three of L/R, A/P, S/I, or names a voxel axis along another world axis than
            the header's (only flips can be corrected, not permutations).
    """
    codes = codes.upper()
    path = _describe(img)
    if len(codes) != 3 or any(c not in _OPPOSITE for c in codes):
        raise ScanLoadError(f"{_prefix(path, key)}: orientation {codes!r} is not three codes of L/R, A/P, S/I", key, path)
    affine = img.affine.detach().cpu().numpy().astype(np.float64)
    header = "".join(nib.aff2axcodes(affine))
    mirror = np.eye(4)
    for axis, (have, want) in enumerate(zip(header, codes)):
        if have == want:
            continue
        if _OPPOSITE[have] != want:
            raise ScanLoadError(
                f"{_prefix(path, key)}: orientation {codes!r} permutes the header's axes ({header}); only flips of "
                "the header's axes can be corrected", key, path)
        mirror[int(np.argmax(np.abs(affine[:3, axis]))), :] *= -1.0  # that voxel axis' world axis
    meta = {k: v for k, v in img.meta.items() if k != "affine"}
    out = MetaTensor(img.as_tensor(), affine=torch.as_tensor(mirror @ affine), meta=meta)
    out.meta["header_affine"] = torch.as_tensor(affine)
    return out


def _canonical_grid(img: torch.Tensor) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape and affine of ``img`` as they would be after reorienting to RAS (no data is moved)."""
    shape = tuple(int(s) for s in img.shape[1:])
    affine = img.affine.detach().cpu().numpy().astype(np.float64) if isinstance(img, MetaTensor) else np.eye(4)
    ornt = nib.orientations.io_orientation(affine)
    canonical_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    canonical_shape = [0] * len(shape)
    for axis, (target, _) in enumerate(ornt):
        canonical_shape[int(target)] = shape[axis]
    return tuple(canonical_shape), canonical_affine


class LoadScand(MapTransform):
    """
    Dictionary version of :class:`LoadScan`: load every key, then check that the scans share one grid.

    A list of paths under one key (``"image": ["ed.nii.gz", "es.nii.gz"]``: cardiac phases, MR sequences) loads as
    the channels of one image, in order; the files must share one grid, and the error names both files when not.
    Values that are already arrays or tensors (e.g. AdrenalMNIST3D items) are wrapped as channel-first MetaTensors
    and checked for finiteness. When the data holds ``f"{key}{threshold_postfix}"`` (e.g. ``label_threshold``), the
    loaded scan is binarised as ``scan > threshold`` (soft masks such as SCT's ``mt1_gmseg``).

    When the data holds ``orientation_key`` (default ``"orientation"``, e.g. ``"LAS"``), the files' headers are known
    to point one or more voxel axes the wrong way (BTCV as preprocessed for SSL-ALPNet: the headers say LPS, the
    anatomy says LAS): every loaded scan's affine is mirrored along the world axes of those voxel axes, so that its
    orientation codes read ``orientation``; the header's affine is kept in ``meta["header_affine"]`` (writers that
    save a mask beside the file restore it). Only flips can be corrected: codes that permute the header's axes raise.

    The geometry check compares spatial shapes and affines after reorienting each scan to RAS (without moving data),
    so an image and label stored with different axis orders or flips of the same grid (e.g. the LPS DICOM series and
    the LAS label map of TotalSegmentator's CT-2) pass, while different grids fail.

    Args:
        keys: keys of the scans to load.
        dtype: data type of the loaded tensors (``None`` keeps the files').
        check_geometry: raise when the loaded scans differ in spatial shape or affine.
        check_finite: raise when a scan holds NaN or infinite values.
        geometry_atol: tolerance of the affine comparison, in mm (default 1e-3).
        threshold_postfix: postfix of the optional per-item binarisation threshold key; ``None`` to ignore.
        orientation_key: key of the optional per-item orientation correction (see above); ``None`` to ignore.
        npz_affine: affine for ``.npz`` arrays; ``None`` for FreeSurfer's LIA 1 mm, centred.
        allow_missing_keys: skip keys absent from the data instead of raising ``KeyError``.

    Raises:
        ScanLoadError: missing or unreadable file, non-finite values, or mismatching geometry; the message starts with
            the key and the file path.
        KeyError: a key is missing and ``allow_missing_keys`` is False.

    Example::

        load = LoadScand(keys=["image", "label"])
        item = load({"image": ".../example_ct.nii.gz", "label": ".../example_seg_fast_force_split.nii.gz"})
        item["image"].shape  # torch.Size([1, 122, 101, 112])
    """

    def __init__(
        self,
        keys: KeysCollection,
        dtype: DtypeLike | None = np.float32,
        check_geometry: bool = True,
        check_finite: bool = True,
        geometry_atol: float = 1e-3,
        threshold_postfix: str | None = "_threshold",
        npz_affine: np.ndarray | None = None,
        allow_missing_keys: bool = False,
        orientation_key: str | None = "orientation",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.orientation_key = orientation_key
        self.check_geometry = check_geometry
        self.check_finite = check_finite
        self.geometry_atol = float(geometry_atol)
        self.threshold_postfix = threshold_postfix
        self.dtype = dtype
        self._load = LoadScan(dtype=dtype, check_finite=check_finite, npz_affine=npz_affine)

    def _wrap_array(self, value: Any, key: Hashable) -> MetaTensor:
        img = value if isinstance(value, MetaTensor) else MetaTensor(torch.as_tensor(np.asarray(value)))
        if self.dtype is not None:
            img = img.to(get_equivalent_dtype(self.dtype, torch.Tensor))
        if self.check_finite:
            _check_finite(img, f"{key}: <in-memory array>", key, None)
        return img

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        loaded: dict[Hashable, MetaTensor] = {}
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (str, os.PathLike)):
                img = self._load(value, key=key)
            elif _is_path_list(value):
                img = self._load_channels(value, key)
            else:
                img = self._wrap_array(value, key)
            threshold = d.get(f"{key}{self.threshold_postfix}") if self.threshold_postfix else None
            if threshold is not None:
                img = (img > float(threshold)).to(img.dtype)
            codes = d.get(self.orientation_key) if self.orientation_key else None
            if codes:
                img = correct_orientation(img, str(codes), key=key)
            d[key] = loaded[key] = img
        if self.check_geometry and len(loaded) > 1:
            self._check_geometry(loaded)
        return d

    def _load_channels(self, paths: Sequence[PathLike], key: Hashable) -> MetaTensor:
        """Several co-registered scans of one case (cardiac phases, MR sequences) as the channels of one image, in
        the order given; every scan must lie on the first one's grid (the error names both files)."""
        if not paths:
            raise ScanLoadError(f"{key}: empty list of files", key, None)
        images = [self._load(p, key=key) for p in paths]
        ref_shape, ref_affine = _canonical_grid(images[0])
        for path, img in zip(paths[1:], images[1:]):
            shape, affine = _canonical_grid(img)
            where = f"{key}: {path}: grid differs from {paths[0]} (the files of one {key!s} are its channels)"
            if shape != ref_shape:
                raise ScanLoadError(f"{where}: spatial shape {shape} vs {ref_shape} (both in RAS)", key, path)
            diff = float(np.abs(affine - ref_affine).max())
            if diff > self.geometry_atol:
                raise ScanLoadError(f"{where}: affines differ by up to {diff:.4g} mm (tolerance "
                                    f"{self.geometry_atol:g} mm)", key, path)
        out = torch.cat([img.as_tensor() for img in images], dim=0)
        meta = dict(images[0].meta)
        meta["filename_or_obj"] = str(paths[0])
        meta["channel_files"] = [str(p) for p in paths]
        meta.pop("affine", None)
        return MetaTensor(out, affine=images[0].affine, meta=meta)

    def _check_geometry(self, loaded: Mapping[Hashable, MetaTensor]) -> None:
        ref_key, *others = list(loaded)
        ref_shape, ref_affine = _canonical_grid(loaded[ref_key])
        for key in others:
            shape, affine = _canonical_grid(loaded[key])
            path = _describe(loaded[key])
            where = f"{_prefix(path, key)}: grid differs from {ref_key} ({_describe(loaded[ref_key])})"
            if shape != ref_shape:
                raise ScanLoadError(f"{where}: spatial shape {shape} vs {ref_shape} (both in RAS)", key, path)
            diff = float(np.abs(affine - ref_affine).max())
            if diff > self.geometry_atol:
                raise ScanLoadError(
                    f"{where}: affines differ by up to {diff:.4g} mm (tolerance {self.geometry_atol:g} mm, both "
                    f"reoriented to RAS)\n{np.round(affine, 4)}\nvs\n{np.round(ref_affine, 4)}",
                    key,
                    path,
                )

def _describe(value: Any) -> str:
    if isinstance(value, MetaTensor):
        return str(value.meta.get("filename_or_obj", "<in-memory array>")) or "<in-memory array>"
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    return "<in-memory array>"


LoadScanD = LoadScanDict = LoadScand


def _is_path_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value)


def _check_header(path_text: PathLike) -> None:
    """Read the header of one scan (no voxel data); raise ``ValueError``/``OSError`` on any problem."""
    file, npz_key = split_npz_path(path_text)
    path = Path(file).expanduser()
    if not path.exists():
        raise FileNotFoundError("file not found")
    if path.is_dir():
        files = dicom_series_files(path)
        io = itk.GDCMImageIO.New()
        io.SetFileName(files[0])
        io.ReadImageInformation()
        return
    name = path.name.lower()
    if name.endswith(".npz"):
        with zipfile.ZipFile(path) as archive:
            members = [m[: -len(".npy")] for m in archive.namelist() if m.endswith(".npy")]
            if npz_key is None and len(members) != 1:
                raise ValueError(f"holds arrays {members}: address one as 'file.npz#<key>'")
            member = (npz_key if npz_key is not None else members[0]) + ".npy"
            if member not in archive.namelist():
                raise ValueError(f"has no array {npz_key!r}; it holds {members}")
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
                shape = (read_header or np.lib.format.read_array_header_2_0)(f)[0]
        if len(shape) < 2:
            raise ValueError(f"array {member[:-4]!r} has shape {shape}, not an image")
        return
    if name.endswith((".nii", ".nii.gz", ".mgz", ".mgh", ".img", ".hdr")):
        header_shape = nib.load(str(path)).shape
        if len(header_shape) < 2:
            raise ValueError(f"header shape {header_shape} is not an image")
        return
    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise ValueError("no ITK image reader recognises this file")
    io.SetFileName(str(path))
    io.ReadImageInformation()


def validate_datalist(datalist: Sequence[Mapping[Hashable, Any]], keys: Iterable[Hashable] = ("image", "label")):
    """
    Check that every scan of a datalist exists and has a readable header, before any training starts.

    Reads headers only (nibabel header, ITK image information, ``.npy`` header inside ``.npz``, the file list of each
    DICOM series), so it is fast but does not detect damage inside the voxel data: :class:`LoadScan` does.
    Keys absent from an item (e.g. ``image`` of label-only sources) and in-memory arrays are skipped.

    Args:
        datalist: items as built by :mod:`monai_metalearn.data.sources`.
        keys: the keys holding scan paths.

    Returns:
        ``datalist``, unchanged, so calls can be chained.

    Raises:
        ScanLoadError: at the first problem, naming the item's subject, the key and the path.

    Example::

        items = validate_datalist(load_datalist("sct_spinal_cord"))
    """
    keys = tuple(keys)
    for index, item in enumerate(datalist):
        subject = item.get("subject", f"item {index}")
        for key in keys:
            value = item.get(key)
            if not isinstance(value, (str, os.PathLike)):
                continue
            try:
                _check_header(value)
            except Exception as e:
                raise ScanLoadError(
                    f"subject {subject!r}: {key}: {value}: {type(e).__name__}: {e}", key, value
                ) from e
    return datalist
