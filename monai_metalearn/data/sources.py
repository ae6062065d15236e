# Copyright (c) monai-metalearn contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""
The real public CT and MRI sources, each as a MONAI datalist (a list of dicts, one per image/label pair).

Every file is read in place from the data directory (``MONAI_DATA_DIRECTORY``, one sub-folder per source
folder) or fetched from its pinned public URL with :meth:`Source.download`, which checks its sha256.

The multi-subject sets (``btcv_sabs``, ``chaos_t2``, ``acdc``, ``lpba40``) come from challenges with data-use
registration, so they have no public URL: their folder holds either the shared, repackaged layout this project tests
with (the files of :attr:`Source.files`) or the original (upstream) layout of the user's own download, detected
automatically (``load_datalist(name, layout="auto")``) or chosen with ``layout="shared"``/``"upstream"``; see
:mod:`monai_metalearn.data.upstream`.

An image/label item holds:

- ``image``: path of the image (a file, a DICOM series folder, or ``"file.npz#key"``); absent for label-only
  sources, whose images must be synthesised from the label map.
- ``label``: path of the label map.
- ``subject``: who was scanned, unique across sources and equal for the same person (so cross-subject sampling
  never pairs two crops of one person).
- ``modality`` (``"CT"``/``"MR"``), ``source`` (the source name), ``synthetic`` (``True`` when any image
  must be synthesised from the label map), optional ``contrast`` (MR weighting or sequence: ``"T1w"``, ``"T2w"``,
  ``"T2SPIR"`` for CHAOS, ``"cine"`` for ACDC, ...).
- ``intensity``: what the image's values are, so that consumers pick the intensity normalisation: ``"ct_hu"`` (CT in
  Hounsfield units: TotalSegmentator, the MSD spleen CT, BTCV's original files), ``"ct_windowed"`` (CT already
  display-windowed: BTCV as preprocessed for SSL-ALPNet, 8-bit 0..255), ``"mr"`` (any MRI, any scale) or
  ``"binary"`` (AdrenalMNIST3D shape masks). A Hounsfield window must only ever be applied to ``"ct_hu"`` images.
- ACDC items also hold ``phase`` (``"ED"``/``"ES"``), ``diagnosis`` (``"DCM"``, ``"HCM"``, ``"MINF"``, ``"NOR"``,
  ``"RV"``) and ``patient`` (``"patient001"``; ED and ES of one patient share one ``subject``), ``frame`` (upstream
  layout: the cine frame) and, in the shared layout, ``geometry: "nominal"`` (the voxel spacing is a placeholder).
- ``structures``: canonical structure name -> label id in this item's label map, listing only structures
  present in that map. The ids were read from the files once and are written here (checked by the tests),
  so building a datalist reads no image data. Upstream layouts are the exception: their present ids are not known
  in advance, so each label map is read once while the datalist is built (and CHAOS's PNG ground truth is converted
  once into a cached NIfTI label map).
- optional ``orientation``: the files' headers point a voxel axis the wrong way and these are the true orientation
  codes; :class:`~monai_metalearn.data.loading.LoadScand` mirrors the affine to match (BTCV's shared layout: the
  headers say LPS, but in every subject the kidneys lie anterior to the liver's centre in those coordinates, so the
  anterior-posterior axis is reversed; ``"LAS"`` puts them 30-80 mm behind it, as in CHAOS and in anatomy).
- optional ``label_threshold``: the label file is a soft mask; binarise it as ``label > label_threshold``
  (:class:`~monai_metalearn.data.loading.LoadScand` does so), after which the structure id is 1.

Example::

    from monai_metalearn.data.sources import load_datalist
    items = load_datalist("totalseg_ct2")
    items[0]["structures"]["liver"]  # 5
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import numpy as np

from monai.apps.utils import HashCheckError, download_url
from monai.config import PathLike

from monai_metalearn.data import upstream
from monai_metalearn.data.names import (
    ACDC_NAMES,
    BTCV_NAMES,
    CHAOS_NAMES,
    FREESURFER_NAMES,
    LPBA40_NAMES,
    TOTALSEG_NAMES,
)

__all__ = [
    "DATA_DIR_ENV",
    "data_dir",
    "Source",
    "UpstreamLayout",
    "LAYOUTS",
    "SOURCES",
    "get_source",
    "load_datalist",
    "registration_settings",
    "ADRENAL_CLASSES",
]

#: Environment variable naming the data directory (the MONAI convention).
DATA_DIR_ENV = "MONAI_DATA_DIRECTORY"

#: AdrenalMNIST3D class index -> class name (MedMNIST's INFO calls class 1 "hyperplasia"; its description and the
#: source dataset, ALAN, say "adrenal mass").
ADRENAL_CLASSES = ("normal", "adrenal_mass")

#: The values of ``layout`` in :meth:`Source.datalist`: detect, the shared (repackaged) layout, the original one.
LAYOUTS = ("auto", "shared", "upstream")

# The intensity kinds an item can declare (the same as monai_metalearn.transforms.intensity.INTENSITY_KINDS).
_INTENSITY_KINDS = ("ct_hu", "ct_windowed", "mr", "binary")


def data_dir(path: PathLike | None = None) -> Path:
    """
    Return the data directory: ``path`` if given, else the ``MONAI_DATA_DIRECTORY`` environment variable.

    Args:
        path: the folder holding one sub-folder per source (``totalsegmentator/``, ``synthseg/``, ...).

    Raises:
        FileNotFoundError: when ``path`` is ``None`` and the variable is unset, or the folder does not exist.
    """
    if path is None:
        env = os.environ.get(DATA_DIR_ENV, "")
        if not env:
            raise FileNotFoundError(
                f"{DATA_DIR_ENV} is not set: set it to the folder holding the data sources, or pass the path."
            )
        folder, origin = Path(env).expanduser(), DATA_DIR_ENV
    else:
        folder, origin = Path(path).expanduser(), "data directory"
    if not folder.is_dir():
        raise FileNotFoundError(f"{origin}={folder} does not exist or is not a folder.")
    return folder


@dataclass(frozen=True)
class UpstreamLayout:
    """
    The original layout of a data set, read from the same source folder as the shared (repackaged) one.

    Args:
        description: the layout in words, named in error messages (e.g. ``"img/img0001.nii.gz + ..."``).
        find: ``find(folder) -> Path | None``: where the layout lies inside the source folder, ``None`` when absent.
        builder: ``builder(source, root, **kwargs) -> list[dict]``, with ``root`` as returned by ``find``.
    """

    description: str
    find: Callable[[Path], Path | None] = field(repr=False, compare=False)
    builder: Callable[..., list[dict]] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Source:
    """
    One public data source: provenance, pinned files and how to turn them into a datalist.

    Args:
        name: the source's key in :data:`SOURCES`.
        description: what the data is, its labels and caveats.
        modality: ``"CT"`` or ``"MR"``.
        url: base URL of the pinned public copy; ``url + relative path`` fetches each file. ``""`` for data sets
            behind a data-use registration, which users obtain themselves (see ``obtain``).
        license: the data's license or terms of use.
        files: relative path inside the source folder -> sha256 of the file (the shared layout).
        synthetic_images: ``True`` when the source has label maps only and any image must be synthesised.
        folder: sub-folder of the data directory holding the files.
        builder: ``builder(source, folder, **kwargs) -> list[dict]`` building the datalist from the shared layout.
        intensity: what the items' image values are (the items' ``intensity``): ``"ct_hu"``, ``"ct_windowed"``,
            ``"mr"`` or ``"binary"``.
        obtain: where to obtain the data set when ``url`` is empty (named by :meth:`download` and missing-file errors).
        upstream: the data set's original layout, read when the shared one is absent; ``None`` when there is one only.
        registration: :class:`~monai_metalearn.registration.RegistrationConfig` settings the source's scans need
            beyond the defaults; the registration-based learners take them for protocols over the source
            (``prepare_protocol``) unless their user set the field. ACDC: a full circle of in-plane rotations in
            the initial search, as short-axis stacks are imaged in planes rotated differently per patient.
        orientation: the true orientation codes of the shared layout's files when their headers point an axis the
            wrong way (the items' ``orientation``, applied by :class:`~monai_metalearn.data.loading.LoadScand`);
            ``""`` when the headers are right. BTCV's shared layout: ``"LAS"`` (headers say LPS).

    Raises:
        ValueError: an unknown ``intensity`` kind, or an empty ``url`` without ``obtain``.
    """

    name: str
    description: str
    modality: str
    url: str
    license: str
    files: Mapping[str, str] = field(hash=False, repr=False)
    synthetic_images: bool
    folder: str
    builder: Callable[..., list[dict]] = field(repr=False, compare=False)
    intensity: str
    obtain: str = ""
    upstream: UpstreamLayout | None = field(default=None, repr=False, compare=False)
    registration: Mapping[str, Any] = field(default_factory=dict, hash=False, repr=False, compare=False)
    orientation: str = ""

    def __post_init__(self) -> None:
        if self.intensity not in _INTENSITY_KINDS:
            raise ValueError(
                f"source {self.name!r}: intensity must be one of {_INTENSITY_KINDS}, got {self.intensity!r}."
            )
        if not self.url and not self.obtain:
            raise ValueError(f"source {self.name!r}: a source without a url must say where to obtain it (obtain).")

    def path(self, root: PathLike | None = None) -> Path:
        """The source's folder inside the data directory ``root`` (default ``MONAI_DATA_DIRECTORY``)."""
        return data_dir(root) / self.folder

    def _layouts_text(self) -> str:
        shared = f"the shared layout ({len(self.files)} files such as {', '.join(list(self.files)[:2])})"
        if self.upstream is None:
            return shared
        return f"{shared} or the upstream layout ({self.upstream.description})"

    def datalist(self, root: PathLike | None = None, layout: str = "auto", **kwargs: Any) -> list[dict]:
        """
        Build the source's datalist from the files in ``root/<folder>``.

        Args:
            root: the data directory (default: ``MONAI_DATA_DIRECTORY``).
            layout: ``"auto"`` (the shared layout when all its files are there, else the upstream one when found),
                ``"shared"`` (the files of :attr:`files`, whose presence is checked) or ``"upstream"`` (the data set's
                original layout; only for sources that have one, see :attr:`upstream`).
            kwargs: source-specific options (``adrenalmnist3d``: ``split``, ``size``; ``acdc``: ``phases``;
                ``chaos_t2``: ``cache_dir``).

        Raises:
            ValueError: an unknown ``layout``, or ``"upstream"`` for a source without one.
            FileNotFoundError: when the data directory is missing, one of the shared layout's files is missing, or
                (``"auto"``) neither layout is there; the message names the folder and the layouts looked for.
        """
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
        if layout == "upstream" and self.upstream is None:
            raise ValueError(f"source {self.name!r} has one layout only; use layout='auto' or 'shared'.")
        folder = self.path(root)
        missing = [rel for rel in self.files if not (folder / rel).exists()]
        if layout == "shared" or self.upstream is None or (layout == "auto" and not missing):
            if missing:
                where = (
                    f"fetch them with get_source({self.name!r}).download(root)"
                    if self.url
                    else f"{self.obtain} Or point {DATA_DIR_ENV} at a folder whose {self.folder}/ holds "
                    f"{self._layouts_text()}"
                )
                raise FileNotFoundError(
                    f"source {self.name!r}: {len(missing)} file(s) missing under {folder}, e.g. {missing[0]}; "
                    f"{where}."
                )
            return self.builder(self, folder, **kwargs)
        found = self.upstream.find(folder) if folder.is_dir() else None
        if found is None:
            looked = self._layouts_text() if layout == "auto" else f"the upstream layout ({self.upstream.description})"
            raise FileNotFoundError(f"source {self.name!r}: no data in {folder}: looked for {looked}. {self.obtain}")
        return self.upstream.builder(self, found, **kwargs)

    def download(self, root: PathLike, progress: bool = True, base_url: str | None = None) -> Path:
        """
        Fetch every file from ``(base_url or url) + relative path`` into ``root/<folder>``, checking its sha256.

        A file already there with the right hash is not fetched again. Sources without a public URL (the multi-subject
        sets, behind data-use registration) can only be fetched from a ``base_url`` holding their shared layout.

        Args:
            root: the data directory to fill (created if needed).
            progress: show a progress bar per file.
            base_url: another base URL (a mirror, or ``file://`` for a local copy); defaults to :attr:`url`.

        Returns:
            The source's folder, ``root/<folder>``.

        Raises:
            HashCheckError: (a ``ValueError``) when a fetched or existing file does not match its sha256; the message
                names the file.
            RuntimeError: when a file cannot be fetched, or the source has no public URL and no ``base_url`` is given
                (the message says where to obtain the data set and which layouts ``root/<folder>`` may hold).
        """
        dest = Path(root).expanduser() / self.folder
        if not (base_url or self.url):
            raise RuntimeError(
                f"source {self.name!r} cannot be downloaded: it is available upstream after registration only and the "
                f"shared copy is repackaged. {self.obtain} Then place it in {DATA_DIR_ENV}/{self.folder} ({dest}), "
                f"which may hold {self._layouts_text()}."
            )
        base = base_url or self.url
        base = base if base.endswith("/") else base + "/"
        for rel, sha256 in self.files.items():
            target = dest / rel
            try:
                download_url(base + quote(rel), target, hash_val=sha256, hash_type="sha256", progress=progress)
            except HashCheckError as e:
                raise HashCheckError(
                    f"source {self.name!r}: file {rel} ({target}) does not match its sha256 {sha256}; "
                    "delete it and download again, or check the mirror."
                ) from e
        return dest


def _structures(ids: Iterable[int], table: Mapping[int, str]) -> dict[str, int]:
    return {table[i]: i for i in ids}


def _item(source: Source, subject: str, label: Path, structures: dict[str, int], image: str | None = None, **extra):
    item: dict[str, Any] = {} if image is None else {"image": image}
    item.update(
        label=str(label),
        subject=subject,
        modality=source.modality,
        source=source.name,
        synthetic=source.synthetic_images,
        structures=dict(structures),
        intensity=source.intensity,
    )
    item.update(extra)  # may override intensity (e.g. BTCV's original files are in HU)
    return item


# ----------------------------------------------------------------------------------------------------------------
# TotalSegmentator (CT). The label maps are TotalSegmentator outputs, not manual ground truth; ids: `total` task.

_TOTALSEG_URL = (
    "https://raw.githubusercontent.com/wasserth/TotalSegmentator/0e65a448d557382b1e925276212b3bec7f5aff83/"
    "tests/reference_files/"
)
_TOTALSEG_LICENSE = "Apache-2.0 (TotalSegmentator repository)"
_CT1_IDS = (
    (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 18, 19, 20, 21, 22, 25, 26, 27, 28, 29, 30, 31, 32, 33, 52, 63, 64, 65, 66)
    + (67, 68, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 98, 99, 100, 101, 102, 103, 110, 111, 112)
    + (113, 114, 115, 117)
)
_CT1_CROP_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 18, 19, 20, 30, 31, 32, 33, 52, 63, 64, 79, 86, 87, 88) + (
    89, 98, 99, 100, 101, 102, 103, 110, 111, 112, 113, 114, 115, 117
)
_CT2_IDS = (1, 5, 6, 7, 8, 20, 32, 33, 52, 63, 64, 69, 70, 79, 86, 87, 97, 98, 99, 100, 101, 102, 103, 109, 110) + (
    111, 112, 113, 114, 115, 117
)
_CT2_DICOM = {
    f"example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.300000221208081134280000165{n}": h
    for n, h in zip(
        range(73, 93),
        (
            "4c5633409fa4d3edf6871e5684e9e1b10325b4d0949997582f43b23a684d0dc4",
            "9148f91127145497f4d6c6f0780f9452504cd7fe5088ec8f2bf2b21800c731ff",
            "3edaccec892e0821440cbefe3d5465923bb5146c316cbaf58f578d962f120484",
            "9b68685f0c5f9bfcfc2c397f4fadf431da288d7422ca72e7d9031d4e039418cd",
            "c8d2c0dc05e414d47d3652c658d8fecc20c3cf7ce106c10d84ad033d39700bcc",
            "0ee2c1d58e06cedd91483ca35c04da3c26fea0dbe88aaf1eaa950b57f38357d6",
            "c76cf0818d4215b92883d109b8a0b62ae0a4d81637eed98738f9c62b6f49bb72",
            "106e20514fd3ca66895e14dbfba96c01c1195e4ed890c035d4368dd71f3ee116",
            "5804e6c4a50f4d5b20040ac82a1c6d79cba5f7267d71f10b0a1b49eda1bc13ff",
            "bef219a16b22949224de4581a2d288863b2585d29556ac24021f03307378cb39",
            "9de5a49e880417d5330fe299115fdb95831a98234216a31c5c0e9a0be9a6dcd3",
            "fa00c8d81ec8aa0d0cfc4e05343782c3a75a4c60df8cccf9ff5db42ac454e61d",
            "ebba0900b0f728db0c94c769db3e5ca38a0cd916386a727541eb3e56350770e5",
            "f084ec95cfba25efb7cbe86e8b4966b051904037e8385f58fe398c5475693b89",
            "20a9b88a30ea8a824ac65cb19c1ebf80964b41ff476497706ff2a286e5f27a25",
            "2a515d3b60f3ff733aac1fc5414206c331e3ed2ccef8c2e0c30b844c538e3ed8",
            "5880669f1bc36b09cad4bdf487992ec415da0afa014e927efc282e612f467574",
            "7af4dd5b5766a87368939116b91f90d989820e7b2237fb9bcd10d47db0960875",
            "671306f4462ae881976c18c6a2d8a1567279fb0166ef0e9e8a41271fac9c1cbb",
            "fdb76ad5272f074e07cc81509604fd163f2f8a9903d34b16ba6f078250373c51",
        ),
    )
}


def _totalseg_ct1(source: Source, folder: Path) -> list[dict]:
    return [
        _item(
            source,
            "totalseg_ct1",
            folder / "example_seg_fast_force_split.nii.gz",
            _structures(_CT1_IDS, TOTALSEG_NAMES),
            image=str(folder / "example_ct.nii.gz"),
        )
    ]


def _totalseg_ct1_crop(source: Source, folder: Path) -> list[dict]:
    return [
        _item(
            source,
            "totalseg_ct1",  # the same person as totalseg_ct1: a 30-slice crop of that scan
            folder / "example_seg.nii.gz",
            _structures(_CT1_CROP_IDS, TOTALSEG_NAMES),
            image=str(folder / "example_ct_sm.nii.gz"),
        )
    ]


def _totalseg_ct2(source: Source, folder: Path) -> list[dict]:
    return [
        _item(
            source,
            "totalseg_ct2",
            folder / "example_seg_dicom.nii.gz",
            _structures(_CT2_IDS, TOTALSEG_NAMES),
            image=str(folder / "example_ct_dicom"),
        )
    ]


# ----------------------------------------------------------------------------------------------------------------
# Brain MRI: voxelmorph (real T1 + aseg) and SynthSeg (label maps only). Ids: FreeSurfer (see names.py).

_VXM_IDS = (2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28, 30, 31, 41, 42, 43, 44, 46, 47) + (
    49, 50, 51, 52, 53, 54, 58, 60, 62, 63, 72, 77, 80, 85, 251, 252, 253, 254, 255
)
# Ids present in all 20 SynthSeg training maps; 72 (5th ventricle) is present in the maps listed below only.
_SYNTHSEG_IDS = (2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 25, 26, 28, 30, 41, 42, 43, 44, 46) + (
    47, 49, 50, 51, 52, 53, 54, 57, 58, 60, 62, 85, 136, 137, 163, 164, 502, 506, 507, 508, 509, 511, 512, 514, 515
) + (516, 530)
_SYNTHSEG_WITH_72 = frozenset({1, 5, 6, 8, 9, 11, 12, 15, 19})
_SYNTHSEG_FILES = {
    f"training_seg_{i:02d}.nii.gz": h
    for i, h in enumerate(
        (
            "edbf1229a0552f8ce37438d02f59e810583b71b0a1b4d31dc38e5e2b2517acb1",
            "65e64c6b9415f389dfda5182ec3a269836925b04166ea82f47b230e54980d0a4",
            "f746e2f90e4dccd7bbbdc18bdd6374e455ddb7fc044504a0a42edc8507cf1aa0",
            "fbcf9d5d3b946dc53cff2e9954abb8c8172960ac35b1bf80c3ca240b4feda140",
            "a53baa7b0faea832d45f8a5b9a234b2b6d4ca92bf5c98baeada4a935cc2f1183",
            "57d8c612469359da78b7c16647cc6979be461eb03b59805e7ebded51554f9ead",
            "feaa1e8f320e037709a51e30881fe8076a45fc06611a09bbd87e76f8f3f89826",
            "f4a9d39c5c64bc5457de84b10a4c4b47f3bb6257e9f396ffa61d290015f178d2",
            "6f41f2b755c97185167d887d95180ca4c754578f81cd30fe8119df1e20bb27d5",
            "4a0147bf1d52c6853176777554165d79a01656ddb8f8474da48b65d6218b664e",
            "02e468bbb652ff0da18eeb73932f09813150ef95155ba7669831849da8517196",
            "5d0a47dd3ff4d821cc758e388a49da5744bf86dee423ed93bf727472a8454d8d",
            "d11cf676fbd5b9316fe30acbca98c854cf88dbcee74a5fe22092ac91ccd8d3a1",
            "7b8d1783c1b5b71b454644169d848b28fa57a33ca4a9b49ff88ad897b8aea570",
            "a896e39351622c2e138195780ba267811d7d162df0da0091126550f5de3b74ff",
            "f48c442569883055440a930ad098b4e747d72deb6369f529e4486c36b0cbfe81",
            "b3497de68fe813494b619d71513bafc872b7e367ee442decd8fabc094f4402fc",
            "dbf3b2297907c88481594a2441a47aa13c75452cd7323fec0313b785b04c9671",
            "719d714096fdd3c0964ad9dae6115cef9de8d93a25105504879b0dfa844da0f8",
            "4c2ab7e6a7711a6e00b7e6c6b40d5fd8c318d0aea3c472248b97d9d4c8cea555",
        ),
        start=1,
    )
}


def _voxelmorph(source: Source, folder: Path) -> list[dict]:
    scan = folder / "test_scan.npz"
    return [
        _item(
            source,
            "voxelmorph_test_scan",
            Path(f"{scan}#seg"),
            _structures(_VXM_IDS, FREESURFER_NAMES),
            image=f"{scan}#vol",
            contrast="T1w",
        )
    ]


def _synthseg(source: Source, folder: Path) -> list[dict]:
    items = []
    for i in range(1, 21):
        ids = sorted(_SYNTHSEG_IDS + ((72,) if i in _SYNTHSEG_WITH_72 else ()))
        label = folder / f"training_seg_{i:02d}.nii.gz"
        items.append(_item(source, f"synthseg_{i:02d}", label, _structures(ids, FREESURFER_NAMES)))
    return items


# ----------------------------------------------------------------------------------------------------------------
# AdrenalMNIST3D (MedMNIST v2): classification of adrenal shapes; items carry in-memory arrays.


def _adrenalmnist3d(source: Source, folder: Path, split: str | None = None, size: int = 28) -> list[dict]:
    if split not in ("train", "val", "test", None):
        raise ValueError(f"split must be 'train', 'val', 'test' or None, got {split!r}.")
    if size not in (28, 64):
        raise ValueError(f"size must be 28 or 64, got {size!r}.")
    file = folder / ("adrenalmnist3d.npz" if size == 28 else "adrenalmnist3d_64.npz")
    items = []
    with np.load(file) as npz:
        for part in ("train", "val", "test") if split is None else (split,):
            # one float32 block per split, in [0, 1]; each item's image is a view of it
            images = (npz[f"{part}_images"].astype(np.float32) / np.float32(255.0))[:, None]
            labels = npz[f"{part}_labels"].reshape(-1).astype(int)
            for index, (image, label) in enumerate(zip(images, labels)):
                items.append(
                    {
                        "image": image,
                        "class": ADRENAL_CLASSES[label],
                        "class_index": int(label),
                        "subject": f"adrenal_{part}_{index}",
                        "split": part,
                        "modality": source.modality,
                        "source": source.name,
                        "synthetic": False,
                        "intensity": source.intensity,
                    }
                )
    return items


# ----------------------------------------------------------------------------------------------------------------
# ivadomed data-testing: MSD spleen CT crop; spinal cord MRI (sub-unf01) in three contrasts.

_IVADOMED_URL = "https://raw.githubusercontent.com/ivadomed/data-testing/794a3075175266758d1bb95d864672a045a7918c/"
_UNF01_CONTRASTS = {"T1w": "T1w", "T2w": "T2w", "T2star": "T2starw"}


def _ivadomed_spleen(source: Source, folder: Path) -> list[dict]:
    base = folder / "ct_scan"
    return [
        _item(
            source,
            "msd_spleen_2",
            base / "derivatives/labels/sub-spleen2/ct/sub-spleen2_ct_seg-manual.nii.gz",
            {"spleen": 1},
            image=str(base / "sub-spleen2/ct/sub-spleen2_ct.nii.gz"),
        )
    ]


def _ivadomed_spinal_cord(source: Source, folder: Path) -> list[dict]:
    return [
        _item(
            source,
            "ivadomed_sub-unf01",
            folder / f"derivatives/labels/sub-unf01/anat/sub-unf01_{suffix}_seg-manual.nii.gz",
            {"spinal_cord": 1},
            image=str(folder / f"sub-unf01/anat/sub-unf01_{suffix}.nii.gz"),
            contrast=contrast,
        )
        for suffix, contrast in _UNF01_CONTRASTS.items()
    ]


# ----------------------------------------------------------------------------------------------------------------
# SCT testing data: one subject (errsm_30) in four contrasts; cord masks, grey and white matter where available.

_SCT_URL = (
    "https://raw.githubusercontent.com/spinalcordtoolbox/sct_testing_data/af4c7e8783c9dcf8bcfc6c53b190af46260bb875/"
)
_SCT_ITEMS = (  # image, label, contrast, structure, label_threshold
    ("t1/t1w.nii.gz", "t1/t1w_seg-manual.nii.gz", "T1w", "spinal_cord", None),
    ("t2/t2.nii.gz", "t2/t2_seg-manual.nii.gz", "T2w", "spinal_cord", None),
    ("t2s/t2s.nii.gz", "t2s/t2s_seg.nii.gz", "T2starw", "spinal_cord", None),
    ("t2s/t2s.nii.gz", "t2s/t2s_gmseg_manual.nii.gz", "T2starw", "spinal_cord_gray_matter", None),
    ("mt/mt1.nii.gz", "mt/mt1_seg.nii.gz", "MT", "spinal_cord", None),
    ("mt/mt1.nii.gz", "mt/mt1_gmseg.nii.gz", "MT", "spinal_cord_gray_matter", 0.5),
    ("mt/mt1.nii.gz", "mt/mt1_wmseg.nii.gz", "MT", "spinal_cord_white_matter", 0.5),
)


def _sct_spinal_cord(source: Source, folder: Path) -> list[dict]:
    items = []
    for image, label, contrast, structure, threshold in _SCT_ITEMS:
        extra: dict[str, Any] = {"contrast": contrast}
        if threshold is not None:
            extra["label_threshold"] = threshold
        items.append(_item(source, "sct_errsm_30", folder / label, {structure: 1}, image=str(folder / image), **extra))
    return items


# ----------------------------------------------------------------------------------------------------------------
# pyradiomics test cases (.nrrd).

_PYRADIOMICS_URL = (
    "https://raw.githubusercontent.com/AIM-Harvard/pyradiomics/8ed579383b44806651c463d5e691f3b2b57522ab/"
)
_PYRADIOMICS_CASES = (  # image, label, subject, structures
    ("brain1_image.nrrd", "brain1_label.nrrd", "pyradiomics_brain1", {"brain_tumor": 1}),
    ("brain2_image.nrrd", "brain2_label.nrrd", "pyradiomics_brain2", {"brain_tumor": 1}),
    ("breast1_image.nrrd", "breast1_label.nrrd", "pyradiomics_breast1", {"breast_lesion": 1}),
    (
        "prostate_phantom_subvolume.nrrd",
        "prostate_phantom_subvolume-label.nrrd",
        "pyradiomics_prostate_phantom",
        {f"prostate_phantom_label_{i}": i for i in (1, 7, 8, 9)},
    ),
)


def _pyradiomics(source: Source, folder: Path) -> list[dict]:
    return [
        _item(source, subject, folder / "data" / label, structures, image=str(folder / "data" / image))
        for image, label, subject, structures in _PYRADIOMICS_CASES
    ]


# ----------------------------------------------------------------------------------------------------------------
# Multi-subject sets (BTCV, CHAOS, ACDC, LPBA40): research data behind data-use registration upstream. The shared
# layout is the repackaged copy this project tests with (files below, from the data folder's MANIFEST.sha256); the
# upstream layouts are read by monai_metalearn.data.upstream.

_MULTI_SUBJECT_SHA256 = """
e23ea3c7236f7363aa1f3199a02d184255b35bd540dbb6123ba4a87d2b526a62  btcv_sabs/image_0.nii.gz
3bbc6a2291233b9ce254f59fd6c2772f3a2d84b20a292713a35ff1a6a0538536  btcv_sabs/image_1.nii.gz
2a9bc1dddb4c01881a3d8f5cb6267d87f4edfd8a573e286fa93a99fe35648221  btcv_sabs/image_2.nii.gz
8eef8a17af31e618d037b1acd298179a8ff0cfc71071ccfffa515b077c26de5a  btcv_sabs/image_3.nii.gz
35448b5d67032d8f8c241a71a5accc1a83ec33e3dab3e4dbcd514ff99baf7507  btcv_sabs/image_4.nii.gz
1a8d956d4ad4df446b5dd62e18e1460c54a155f147381c8a698cd02fcb70d3dc  btcv_sabs/image_5.nii.gz
266b23c6104d6322f9de85466168e95cc2bd1022793d00bce837b53e70e2315e  btcv_sabs/image_6.nii.gz
3d0fa56ba1ff05e02bbab3667384f8278a9d6545bb6e9f0882042ac0455e8568  btcv_sabs/image_7.nii.gz
d483016ce47437fb8cd1ead5749d6c5d52c237809582148f48d8f9b0d04a4cc1  btcv_sabs/image_8.nii.gz
dca542e1710ca27e48acc776e8efb943bb32d95ff148c6f692c2da9374127633  btcv_sabs/image_9.nii.gz
45d5b7207d914e509439416c65afd0d0d30a466cb4708c00c32c361dfa107294  btcv_sabs/image_10.nii.gz
dc9f1980ede94dfc2d6f4a8d93b31f9473ff1df6e50ca16706743775c3c95adf  btcv_sabs/image_11.nii.gz
57f558e9feba43d6669000cb3e2dde17d167914316483f8f25ec8235e0e02d58  btcv_sabs/image_12.nii.gz
9482696d846a3e7312d01c91599e390c81d229490534028810f6d46752aa4d58  btcv_sabs/image_13.nii.gz
c29317c594d7fbd0be5c5b7c633cc2284168484aad5c1ddecd99286767793a56  btcv_sabs/image_14.nii.gz
00ce666e6e51bf4fff5780028d02691133ec316f3237a79beec59a0cbe5495c8  btcv_sabs/image_15.nii.gz
486559ef79c37f9b6c5c1ee0f209f1d05f8c185d543441d8af69b24c0f717d34  btcv_sabs/image_16.nii.gz
dd2df2e551bab6d819dc5f4d87542ca6c63180cdae359a057735519e5c049bc5  btcv_sabs/image_17.nii.gz
293408f798075efea1970e5e2edc966d889d23a4ece2c292ca41836a1183890d  btcv_sabs/image_18.nii.gz
1ac32c28d0d984885d207f84ffb770aadadfb5575f33bab36e9db96123b9631a  btcv_sabs/image_19.nii.gz
38d2cd30aa1836d0c653405d54d5f8cbaee86b7a8aeacffe44a09e7e89f120fe  btcv_sabs/label_0.nii.gz
ac7365969983a30280fd9a5020943bf3e26bd45e945e1fd18b0266d8cf0939be  btcv_sabs/label_1.nii.gz
e14d303054d52983f69baab3752b985870a3695100591fe385228017524bedb4  btcv_sabs/label_2.nii.gz
a8a75153f06641e65b82977f6661ea57a11d442156134cf665d09c82a57c0c1f  btcv_sabs/label_3.nii.gz
1cd5b24e8bd3167919fbe43f392728af854fd4379d8d10e524597cd4c8533738  btcv_sabs/label_4.nii.gz
788f0e2e848939f6df689bdd9d4742762fceed7d6f257a9a400192cfdbe45a36  btcv_sabs/label_5.nii.gz
cc421d1332880a3be9d18e3e90941109d1081061bf49d429025394d88dec3271  btcv_sabs/label_6.nii.gz
a3de8a6566cefb3640fc23fd5e6c003750a3d6eb573133b6432dd8d030526153  btcv_sabs/label_7.nii.gz
3ef32bf30e2bb153131217626b6c87845b8a8d09649a4703325994ac4e47e9ff  btcv_sabs/label_8.nii.gz
4317d24f86ba16018348cd6760228cf1fb2ad998b18654ed88eab0ab73b63ba9  btcv_sabs/label_9.nii.gz
b990929f39c20d8b3248c35c9f11d14df38a6523e817605879309b7d4ef07f29  btcv_sabs/label_10.nii.gz
672a3958be0d5aaf5b8de567f211e4cc03cdcab6aed3d57a20d25dc5f4fac55e  btcv_sabs/label_11.nii.gz
9406570d0c4f4e1aaaf7fe12d4bedc8ef977ee68aab17670655f1036a40abfd7  btcv_sabs/label_12.nii.gz
1a22ba9396e2759189f02695a06b5f066ae9184ce0b63dc078016ea5fc71b2d5  btcv_sabs/label_13.nii.gz
8dc5509d659aac577543954a08720f45e06bcdb9dcf1e7ea0d8759d581c25ae7  btcv_sabs/label_14.nii.gz
311eb1fc8c2d827d7464af4f944283fc9e12639849225a7150829b511294d2b6  btcv_sabs/label_15.nii.gz
ebbd8756a917182a4553b52fadb37c3860f88300180d416a7389f05b97bf7eee  btcv_sabs/label_16.nii.gz
3629c756e35d086348eef51c62da87a25792ff8c77b7be26fba681dc4d9a87f0  btcv_sabs/label_17.nii.gz
10cd8158899c5d4610f8cce0dfc0a0019fdf014165ebbb9e50460a222aea99ee  btcv_sabs/label_18.nii.gz
e3b246cdabfc2f9b9657595df23c8895589d0599a6b44818d84c76dcb4d1839a  btcv_sabs/label_19.nii.gz
8fac03aadebfcf858a88b7c68eba4242217339680700427c7b89bc9f74e20058  chaos_t2/image_1.nii.gz
db4a518c11cd13b5c0444ac7809d112377ea559ad4eb2186abed094f2517333e  chaos_t2/image_2.nii.gz
2251500b4826cae3980fd86ce622ad64e0422ddcb77a77f0a84ac9ffd30ad7b6  chaos_t2/image_3.nii.gz
e9dcef3792e93c4ca2b36c327f16b41359f5b520dd73253745da51396d322feb  chaos_t2/image_5.nii.gz
a06694b5b3d61e03eb9c0f88442099c0645e116b0973a5d525332bb51d97525a  chaos_t2/image_8.nii.gz
6cf9f3d51e7c7b6d7c34f8e14d3479c85b6254a300926f61bb40254c3fd26c91  chaos_t2/image_10.nii.gz
f4fc540cae9d47b3992dd5867f7690dd8e42969cbfb9368a01c572ca196dca62  chaos_t2/image_13.nii.gz
487b66e4d33948a22cde5b323c2f9b7586f88f49bbc4dd5a8c9d1f966271bd13  chaos_t2/image_15.nii.gz
d30d2db5b2a35fdfccc4b6761db01aac8b00f53ff6b6d84e01f7b4a17b8f854f  chaos_t2/image_19.nii.gz
f9f7f151e4131b0b589e9a209c5bceee3d0f21e5f1ea21bf2e8fbbe8697a31fb  chaos_t2/image_20.nii.gz
c0e9bb2c8823fa2fddf79802f008038ac5d4a0d41ed50c5a886475287c7db879  chaos_t2/label_1.nii.gz
a04bccab1e2f0c48b6f595ef88b134bdeac8ceaa34374a8395edf9357a6821ff  chaos_t2/label_2.nii.gz
655c9b56962fc1ddb902ffe1b44dd7792d760abd01b5ee436f4baab9e1a0af65  chaos_t2/label_3.nii.gz
c051d4eb80deb88233afc287a05a6847793f916bc7d0111caa6c76555ba94239  chaos_t2/label_5.nii.gz
8823734fcbf15aa1b8521d6b06e4036d966a14f2ad479e3a2042f11c1c59f49f  chaos_t2/label_8.nii.gz
992931218bb443c9ee35e50622435f3f70087f8633c8f69b2798150de0fa5ae6  chaos_t2/label_10.nii.gz
6ba6d033b47ae05bcc7136beb43c64224ca2141b9a910078ab42668b5f34d2e8  chaos_t2/label_13.nii.gz
d4a25309676a39587c2459157246ca00fac46f2d5931d6cb29d1175aa436ac0e  chaos_t2/label_15.nii.gz
f4fa06b72731b4ef058169cc8f9a68ec98b327a37a124ec19fe23160b8bb82b1  chaos_t2/label_19.nii.gz
f1281864b4918103a208f9646055d7cc737fe3039eb5e41938e8f588f912e135  chaos_t2/label_20.nii.gz
f85173442ffd4f1e8404e6f538befae33a2ccb3f3f8cfda68661ce477cc15e36  acdc/groups.json
7a53b5687614b71e2f41dca77430d2eb4295cb727f4cdce0e5f7e51e4544874e  acdc/patient001_ED.nii.gz
377b9f7d6a29958febf58fff43b00d14d3d2b17c855ff07e974d968682a1c047  acdc/patient001_ED_gt.nii.gz
8ba499c06e5e503f4d9277f548aecc02e62164885677a70183c055916058a308  acdc/patient001_ES.nii.gz
d76a63996bcd94069fdc40317c3b43c5a46c9b44bb3eccfb296084a787edd773  acdc/patient001_ES_gt.nii.gz
23fe673dc6ff6df5daea8747993665d2f595d6add4b723e66464648ef5728c3f  acdc/patient002_ED.nii.gz
c31685e535885737d941d545353c74f86ddb349bd789adfd275e4c865b1793c2  acdc/patient002_ED_gt.nii.gz
5c5bdf71f2bde446474951b8058dcd11150ad1ba3d159d6a6ba8d34d22bc5737  acdc/patient002_ES.nii.gz
e80ac7fb82d74156b80e8c882506012e685918c79bac8c0d24456a7956928028  acdc/patient002_ES_gt.nii.gz
4efde9570ba4b4f8320f69dfe76d54f2f2a06d2646a5f1758961923c11bab81e  acdc/patient003_ED.nii.gz
38acbfa3c3e6644ab6b4a1a2453a7eaa02bd09f7b59b6981f48b131e0e2720fd  acdc/patient003_ED_gt.nii.gz
12cf28b22d2678455d7f50beb312ff044a9447235419fd9d2a0c6dd39b2f0ccd  acdc/patient003_ES.nii.gz
28d963d7b9453bd1c5e31e1d095c3a58b1c4b46934ad41eee4737340813da0f1  acdc/patient003_ES_gt.nii.gz
f159263e4a5b73f6ef97dfc4a0bbfdb14ebb4324928914c25d5374cad097314e  acdc/patient004_ED.nii.gz
498c7e4418f520785b647b76ffd1afe92ee46ed5cbca02e9858117f68eee973c  acdc/patient004_ED_gt.nii.gz
b99a38c5d6ff0f5ba2c7148094168413f8d5aba8b12206b99674e71c9640cb11  acdc/patient004_ES.nii.gz
70e98c1a42866ac65e829b14ca2459d0d9cb2cf92d16ace238c3426ed05fbe19  acdc/patient004_ES_gt.nii.gz
dbc5cf562154a2b3839037564f7f45b4d9e7c0e6a9468fc84366a54852037c89  acdc/patient005_ED.nii.gz
968d26d1fd60d0390abb9477ec0f06447be48ae69d00da1b9e6be63f2b88a158  acdc/patient005_ED_gt.nii.gz
bfb2c690508eaaf1425ce4c9e5a172c1fe4f8b5d6324b718792a3f357bd9a78b  acdc/patient005_ES.nii.gz
0c9f7d92fefe4537e45c2f7b86982cf97d4c1b71851a3d768d05fe1adbb57025  acdc/patient005_ES_gt.nii.gz
4b9a4bfbac8cc8e13c1bc8321e66a5c5c575a864c3673ffd858ac66852af521d  acdc/patient006_ED.nii.gz
c39f7f940d519734ea1b62c131757fa4b06073923a2e0c07c51b263978ddad09  acdc/patient006_ED_gt.nii.gz
1f3b76a3daec5459cd9cdc1bbe22b83eb1c969d4e73468857a809c033cf8ae18  acdc/patient006_ES.nii.gz
f5bf5ac5bdc323eef7559efa63ed955b4585b7fad6756869c709bfbb88d29b62  acdc/patient006_ES_gt.nii.gz
48afeb630fc0f9852e7ab58e0846ac31c722fd9b811a2fe9e17c44eba8a9fcbc  acdc/patient021_ED.nii.gz
275528512d8cdfaa7f3d3c576d37219ac4ec03f03a26bc3c03b3ef0e9a39619d  acdc/patient021_ED_gt.nii.gz
7f2718a019f2ad635bec79568bec516c5efd2c5d9186eb8e131db0e70084599f  acdc/patient021_ES.nii.gz
633a86787a47adb6b0cb4413f3eed0c0310df94e8d979d584188a39ea1f951f1  acdc/patient021_ES_gt.nii.gz
f1fb4dfe374ec51815de06317ed0424fe5cdfd5c581f1c790659d675f3875f48  acdc/patient022_ED.nii.gz
ed615ff1b69b64c968a0b0e08f4e3259b53c4b940b3da2894a3b43c05ba52c36  acdc/patient022_ED_gt.nii.gz
8e6a16db95f0de60901cb8b6f5451941f326c187162bbefe2631418f65bc1f13  acdc/patient022_ES.nii.gz
49d216fe9fe01561a0d43a6066c2e2665316795dcd0ca58b5724f00448617ef4  acdc/patient022_ES_gt.nii.gz
ce829ddf49f80e8635c0b3caea4e67b5afc18c2428a86218829a5e73ba5d2d30  acdc/patient023_ED.nii.gz
5ad25a2b8beb802908d214df7361b6832bfcf2e53b2974da7d0f22450da1de95  acdc/patient023_ED_gt.nii.gz
b6c2794250f5ed7a0e7fbf7ed06d6c6715fdc4fdb057d89640dbeb6e3f62aa2e  acdc/patient023_ES.nii.gz
a7480210df440d96450135b11f08c6fd31e39ffa727368cbc6dbe95d39c9b3e2  acdc/patient023_ES_gt.nii.gz
bffed6e75b99864053b7de7712b66e9c816b96831b7f43c525f5f36fbccad1e6  acdc/patient024_ED.nii.gz
4904f8b35de5d91b35503be2fd954277c70191682624dbd270a287995412dd53  acdc/patient024_ED_gt.nii.gz
bcb3d9fa0e4d7fd75416d80676176f1b84f1464664a66d3142009be84e59b674  acdc/patient024_ES.nii.gz
d7e1420496ba28d69362e85ed26c5c6f0f2f7cc4dcb61fb1835e43ffaecf3993  acdc/patient024_ES_gt.nii.gz
56bb6082f9db7c3c6b8f9cd8f5f6302040a024b5a26f0305bd2c9f94ac0e2298  acdc/patient025_ED.nii.gz
cb8e198fa80db2e5b587db3ab2a8e1de1c3bbfefdb6ff54d41919d5e50d74542  acdc/patient025_ED_gt.nii.gz
b7c9852e0fe0c7a028eeb03b66714a1f0a7cea16b50ec37e180d563d2764df74  acdc/patient025_ES.nii.gz
586814c44ecc08060ae0bed59a0dbf3fe14e2f65fced9209e57728245dbf2c22  acdc/patient025_ES_gt.nii.gz
f2f1bc9d3ae9a55c96cd6c92368bdbae4a40f4384e79bef3b66a199d8e7916fb  acdc/patient026_ED.nii.gz
cd0d583afdb62627599436342adafcf48588ac8dce91da460ba55d62ce7291c1  acdc/patient026_ED_gt.nii.gz
4dcc72e1b9cc27ecf93eb6bc4cb84ff87dc6574a78883d4f0a3c4e1caa1d977a  acdc/patient026_ES.nii.gz
547045272a176746e14bb1da0f8039b541b1f01d8d9966688107d0e31e60bb6e  acdc/patient026_ES_gt.nii.gz
a77da5b5c8d821485e9c392182f4c2965677c7303ca70a06aa5898e68649e234  acdc/patient041_ED.nii.gz
73318218621ef84508d69334f974db0873471a9875496992ed0c798cf35941a8  acdc/patient041_ED_gt.nii.gz
99ed974bdbfc353a4e49cf30f394b761be39337ef5a5cca13e2389d2c4547855  acdc/patient041_ES.nii.gz
2efa4b1e02da01402862b76b91ae5076b599344892824589f94facba50e902a5  acdc/patient041_ES_gt.nii.gz
1036a67277d5becb3c8f81579eedcfebb0e1daca613ae684c827f2e8d37512e6  acdc/patient042_ED.nii.gz
3f81029fb5c0432fe42670a157cd5a9d52d5d3587448fcc6dd2627bef27a53e8  acdc/patient042_ED_gt.nii.gz
3193f2631efd2eccc7b77de3b731d905917ce51ad9fc4ebfa91eaea35b7385a2  acdc/patient042_ES.nii.gz
414fc34caadabf57c5ab3759a79cf33a1c79e9d531b3fcbe7fb3ef5775c354fd  acdc/patient042_ES_gt.nii.gz
6f87a6b9256d88f8a06b2c513993d624cdd280e416d95669cc42ed624cc23070  acdc/patient043_ED.nii.gz
35adb42d6cf59f59f0d3f42f88a53f8749ce0622b6f012b3847fc6bfd1d5ec6d  acdc/patient043_ED_gt.nii.gz
f6cc10cba570e1ab1601539fcf14cec36dd0d2b3127bf05a3141356c86ac0d70  acdc/patient043_ES.nii.gz
2562c67b48b31d1d49d1482953706e7a92079840516591f08903990ca117280c  acdc/patient043_ES_gt.nii.gz
1f55a9f46faeb0cd03ebe7cbcfc28a5474963225d303f7473f47c8559ccf5b51  acdc/patient044_ED.nii.gz
bfdfbee8a11644a6162e14283d852e0609ac61c83f82cc805ee211c4fe4d202b  acdc/patient044_ED_gt.nii.gz
d1338f34fde34ef76a18bdea2c9e43c465e852ba23f8e9e24722822e9cb36126  acdc/patient044_ES.nii.gz
292bce47af593cf5d0a9f4397d3dc8b80a4ad0def50763061df9768255bd3c66  acdc/patient044_ES_gt.nii.gz
983451a07638b8a1af044263837fc14fac605e9c4ba919d9107ddf9c13d9e665  acdc/patient045_ED.nii.gz
6be9b4c881956bd29cfc4959faae8815573e8317df9fb11fb1a7890effb47dd6  acdc/patient045_ED_gt.nii.gz
397b70554f4128c863baafb78016f9e3f685a64fcf136e453ce7c59138d76897  acdc/patient045_ES.nii.gz
1244ad13e36932206dd86810e0022f26a1cc896c041c3b05db9502c69449a03d  acdc/patient045_ES_gt.nii.gz
bbda9dd18dfb18bc75ddf8ec9ba858354a828c40696e8526a2b39ee441f01ae9  acdc/patient046_ED.nii.gz
8847b22a6ee567f3d8275e87683bfe49a98fab8d0000eccd432964aba6987369  acdc/patient046_ED_gt.nii.gz
8497f987a3d65ffb5b5bf60a48f06aecd6848d63982dfde634fd7e9a36fc0e78  acdc/patient046_ES.nii.gz
c416977ed3b605b7ee58cb02666784c12b9e094cdb61715e77178eb728f1b4b7  acdc/patient046_ES_gt.nii.gz
e05b0530053363caebf2452f876a96012a186e802f0ba142ee018985264cd5e3  acdc/patient061_ED.nii.gz
41f60f69a35b62dc50f4c637c03ce65780ecdecd62b4d94a0dae4b46300c74cb  acdc/patient061_ED_gt.nii.gz
abb416772d161b67f382677801b53d9a1c792fe4fc4515ed728ebf3a684a8cb5  acdc/patient061_ES.nii.gz
2b45ef5be6f87f3bcbaddb71faee175310396dd82187292c5e62bbf40e82231d  acdc/patient061_ES_gt.nii.gz
5adad3de1241c2fda1182a24c8fbf1d9d75503de1cba3deb84a0d6ea24882910  acdc/patient062_ED.nii.gz
b24ae074bb79c1a60f3554f637bf1d19767a2c132346b183d12b4db24a931d36  acdc/patient062_ED_gt.nii.gz
cba4f4b033d6809157d5e93dc000159e0cf211086539804c1819e957bf1b22ba  acdc/patient062_ES.nii.gz
745b8537b52a1cfc24302bb74ec60031cf7a93f81cef2ec051e342b5c141f3a9  acdc/patient062_ES_gt.nii.gz
c0aade6d9106d4b5e7e119e369d9b5c1be43de0cfdc700643a911b1bb314dea8  acdc/patient063_ED.nii.gz
6eb89daba14065535d317f021053f2478990ea6ed5cbe40f1f1f2a67bf6ca0f4  acdc/patient063_ED_gt.nii.gz
10b6e9cc95fb79feceb626ae9d6f35ee72df0d08ff09f5a7c0afebf57c3a1a9f  acdc/patient063_ES.nii.gz
846e04c5bf6a2efae00d13f2e3de73813d5e49cff695e5b91b66920f90cdb244  acdc/patient063_ES_gt.nii.gz
96a0778c0574684427dbab14d4a4b26eb2693d9de3d3ac96d8e8a645919ccb59  acdc/patient064_ED.nii.gz
bc217c5e198f19b75693ff7b3359e2410880fd3bccdf821658dc78c03a5bb918  acdc/patient064_ED_gt.nii.gz
ad8bb63c3eb49aa08b7e6d6747f7825b5d6c83a3ef1bdcf60590d30b98df7c82  acdc/patient064_ES.nii.gz
53ec51c17e376c50d4f5b39800370c04d47758c764130ee7747a92e24f33bbcf  acdc/patient064_ES_gt.nii.gz
8f10225ce64af3df71500c4f3188ea517b518e896534d5eb1062335c3bb297fc  acdc/patient065_ED.nii.gz
10cb9775402a0c381f22ea16514a4cf9f75ab4dddf236c147c69b21c8f2c7bb4  acdc/patient065_ED_gt.nii.gz
78a7314b92d159c262433242db33e73902a8449e25940bfa8089e172fbd502f2  acdc/patient065_ES.nii.gz
de335662d1ab7d2c81aea4c4030fbf8a8b5e1313dc180545900c1c03210bb949  acdc/patient065_ES_gt.nii.gz
c8fa046b6be0636adf0779b492d1cfe98b9a491b9fcfbbd41c8c570715001f5c  acdc/patient066_ED.nii.gz
1080496ec12356048d93f7c92139dae2395ea17c9e8d39c68c47486324c9917d  acdc/patient066_ED_gt.nii.gz
18c9ac58c1b13495fc4c7f3044a0d7fc4a66e9c3d7c14301ff2cf204162557d9  acdc/patient066_ES.nii.gz
badedadb15c90e41f27e0a91fe482c23333235285261d07eef7632d466620d57  acdc/patient066_ES_gt.nii.gz
169c510e0b3f0a196892b038e9e50b945a21609f43dd779edbb55680d24c5942  acdc/patient081_ED.nii.gz
09b4206139377bf3d7aac57388764c97dc1b30d700bf09705a05b30dcd34faaf  acdc/patient081_ED_gt.nii.gz
969e259539b1ef3934722e3368353089875336a66e79a87af9b94d6b78f40fcf  acdc/patient081_ES.nii.gz
3f9f7de1a84eaf08196372436cdbc628d77dc7f4d1b680e13f1aec972dced19c  acdc/patient081_ES_gt.nii.gz
8165252f93720c993d82c135b242009878ce0485f961b763987fd4b9c5e3bf72  acdc/patient082_ED.nii.gz
819844c09fb929f3c53591eb4ded777065effd48fc9430a6b5259ab189a8426d  acdc/patient082_ED_gt.nii.gz
f4681cbea2f5c6ada4049af4dbb191bf06b38d923ce2b3abff9ebc9c17d8235b  acdc/patient082_ES.nii.gz
cef5d4afcfa9271bf2b7470f543c45cf1d728fe17c571e4d9fed7c94d4faef84  acdc/patient082_ES_gt.nii.gz
7b989dee702b42a09daa866fc8abd0f1617efa0cc34218a117bb5ac27bbbb440  acdc/patient083_ED.nii.gz
5a9f81ef609a516ff06e148ff054ae561145006900de87683f80e1a360026d9e  acdc/patient083_ED_gt.nii.gz
aa64f1c91ec32172bb18f4e77f416f7e7a40ca17c93816375902c46b0ac2beb0  acdc/patient083_ES.nii.gz
8327dec51afba61297fc4360ed37ebb72c51b95ad8b6abe12219ba570a192d94  acdc/patient083_ES_gt.nii.gz
df9d2c0a18d9b3ba1232e68f0c1682384cf973f87826b6d5c90d8cc3c7faf29d  acdc/patient084_ED.nii.gz
5117fa89ee0c9f83267615caa9cc4c240d46fb7c4184dc2dca2e3b3f76562209  acdc/patient084_ED_gt.nii.gz
c833d9e82847b607c3d252fa8a73c36622ab69813ce17c64a2bca7a9fbc60084  acdc/patient084_ES.nii.gz
3ca343a61497b5ae2b2ef5bbc3cf84a929f2237bad3d7eb54c9942e9fda9f850  acdc/patient084_ES_gt.nii.gz
2a49b18d3e10edb1bb69793ac9da86d3685997269eb29044441ab134f2aa4643  acdc/patient085_ED.nii.gz
8c64b8d7a9e2603ad22ec831ba8d269f1ef21c576a40ae63d91de5c72bcb6189  acdc/patient085_ED_gt.nii.gz
b571c593617f3ab0b5db532a21c9ae12cb1f8cf4eb6a19cd34f05cf5a6a86574  acdc/patient085_ES.nii.gz
67e96e4a21e04552c3dcdd046f1c095c88845f903989a0a73c4b4d186faeecee  acdc/patient085_ES_gt.nii.gz
3a76489a431ef0608fee77f0b945c903d4b9867cc405e3269c989124ad1d1079  acdc/patient086_ED.nii.gz
9e77bfe2989bec809a2ae743a439b5dfd325b2b547cbfa9cfb87345e7859f6a7  acdc/patient086_ED_gt.nii.gz
0fd5ab60421faeed4e00611ce251e0704da570694674935ef3c1e75e878c6f37  acdc/patient086_ES.nii.gz
e131a76731a8620697bc10edaed7e3703ca1e8d5233d9d0c815d7a8f90b8f9e0  acdc/patient086_ES_gt.nii.gz
dcd6b3cd6702a06abf20cf93f3fa4e6cbe1b2e115c0f2c5aa6d52ef6379a0fa6  lpba40/S01.label.nii.gz
2450ca264e76287b3702193907260fb61fefce5bc32f07a51267df8e7155dc46  lpba40/S01.nii.gz
32af15ceb781a392cf5e792f4028e40a36f41fcdd1fda8e2f40382ffb1fb7ed3  lpba40/S02.label.nii.gz
c8247b181e2d5509f254938017e6ddf1288a924ac23e992c11bb4bab07f75505  lpba40/S02.nii.gz
6f0141aa41d1060c23108d16e3c80d1c99c6995d2ad0ddf6168eba4c95063df4  lpba40/S03.label.nii.gz
bae19b3ec21b9e2abade3731a07266b98ad69a1629676ca402b0fe0022173c57  lpba40/S03.nii.gz
2509d9872eb4a38fbdf49b5384dca7e237c0ce60fdac48434208d78636e51cd8  lpba40/S04.label.nii.gz
9b7428902952f05792e2f1e896b98063aab4c21436334c9be8de579d83d67854  lpba40/S04.nii.gz
019c9aed891ba75f1ede9656e22092f29f74ecf8f7c45454f726e81f63228bc5  lpba40/S05.label.nii.gz
765058c98b947cb9c50c25bb8e897922ea8539315bcd4c7fcd12d273916f18fc  lpba40/S05.nii.gz
5db45329f04bfa5ea9d6aa46f393e339083502fc5a9b97dcbd63807f67b8a7fd  lpba40/S06.label.nii.gz
f23f34e6624299cd423df007ec9dfbb2ad76c236a398f96c291c132bd68d9662  lpba40/S06.nii.gz
"""


def _manifest(folder: str) -> MappingProxyType[str, str]:
    rows = (line.split() for line in _MULTI_SUBJECT_SHA256.strip().splitlines())
    return MappingProxyType({path[len(folder) + 1 :]: sha for sha, path in rows if path.startswith(f"{folder}/")})


def _upstream_item(source: Source, subject: str, label: Path, table: Mapping[int, str], image: Path, **extra):
    """An item of an upstream layout, whose present ids are read from the label map."""
    ids = upstream.label_ids(label, table, source.name)
    return _item(source, subject, label, _structures(ids, table), image=str(image), **extra)


_BTCV_SABS_MISSING = {12: (4,)}  # SABS subject 12 has no gallbladder
# the SABS files' headers say LPS, but their anterior-posterior axis is reversed: in all 20 subjects the kidneys'
# centre lies 30-82 mm *anterior* to the liver's in header coordinates (CHAOS: 27-75 mm posterior, as in anatomy);
# left-right and superior-inferior agree with anatomy (liver right of the spleen, spleen above the kidneys):
# Source(orientation="LAS") below


def _btcv_sabs(source: Source, folder: Path) -> list[dict]:
    items = []
    for i in range(20):
        ids = [j for j in BTCV_NAMES if j not in _BTCV_SABS_MISSING.get(i, ())]
        items.append(
            _item(
                source,
                f"btcv_sabs_{i:02d}",
                folder / f"label_{i}.nii.gz",
                _structures(ids, BTCV_NAMES),
                image=str(folder / f"image_{i}.nii.gz"),
                orientation=source.orientation,
            )
        )
    return items


def _btcv_upstream(source: Source, root: Path) -> list[dict]:
    return [
        _upstream_item(source, f"btcv_{case}", label, BTCV_NAMES, image, intensity="ct_hu")
        for case, image, label in upstream.btcv_cases(root)
    ]


_CHAOS_IDS = (1, 2, 3, 5, 8, 10, 13, 15, 19, 20)


def _chaos_t2(source: Source, folder: Path, cache_dir: PathLike | None = None) -> list[dict]:
    # cache_dir only matters for the upstream layout; accepted here so that one call serves both layouts
    return [
        _item(
            source,
            f"chaos_{i:02d}",
            folder / f"label_{i}.nii.gz",
            _structures(CHAOS_NAMES, CHAOS_NAMES),
            image=str(folder / f"image_{i}.nii.gz"),
            contrast="T2SPIR",
        )
        for i in _CHAOS_IDS
    ]


def _chaos_upstream(source: Source, root: Path, cache_dir: PathLike | None = None) -> list[dict]:
    return [
        _upstream_item(
            source,
            f"chaos_{case:02d}",
            upstream.chaos_label(case, dicom, ground, cache_dir),
            CHAOS_NAMES,
            dicom,
            contrast="T2SPIR",
        )
        for case, dicom, ground in upstream.chaos_cases(root)
    ]


_ACDC_PHASES = ("ED", "ES")


def _acdc_phases(phases: str | Sequence[str]) -> tuple[str, ...]:
    chosen = (phases,) if isinstance(phases, str) else tuple(phases)
    if not chosen or any(p not in _ACDC_PHASES for p in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(f"phases must be a non-empty selection of {_ACDC_PHASES} without repeats, got {phases!r}.")
    return chosen


def _acdc(source: Source, folder: Path, phases: str | Sequence[str] = _ACDC_PHASES) -> list[dict]:
    chosen = _acdc_phases(phases)
    groups = json.loads((folder / "groups.json").read_text())
    return [
        _item(
            source,
            f"acdc_{patient}",
            folder / f"{patient}_{phase}_gt.nii.gz",
            _structures(ACDC_NAMES, ACDC_NAMES),
            image=str(folder / f"{patient}_{phase}.nii.gz"),
            contrast="cine",
            phase=phase,
            diagnosis=groups[patient],
            patient=patient,
            geometry="nominal",
        )
        for patient in sorted(groups)
        for phase in chosen
    ]


def _acdc_upstream(source: Source, root: Path, phases: str | Sequence[str] = _ACDC_PHASES) -> list[dict]:
    chosen = _acdc_phases(phases)
    items = []
    for case in upstream.acdc_patients(root):
        patient, info = case["patient"], case["info"]
        for phase in chosen:
            image, label, frame = case["frames"][phase]
            items.append(
                _upstream_item(
                    source,
                    f"acdc_{patient}",
                    label,
                    ACDC_NAMES,
                    image,
                    contrast="cine",
                    phase=phase,
                    diagnosis=info["Group"],
                    patient=patient,
                    frame=frame,
                )
            )
    return items


def _lpba40(source: Source, folder: Path) -> list[dict]:
    return [
        _item(
            source,
            f"lpba40_S{i:02d}",
            folder / f"S{i:02d}.label.nii.gz",
            _structures(LPBA40_NAMES, LPBA40_NAMES),
            image=str(folder / f"S{i:02d}.nii.gz"),
            contrast="T1w",
        )
        for i in range(1, 7)
    ]


def _lpba40_upstream(source: Source, root: Path) -> list[dict]:
    return [
        _upstream_item(source, f"lpba40_{subject}", label, LPBA40_NAMES, image, contrast="T1w")
        for subject, image, label in upstream.lpba40_cases(root)
    ]


# ----------------------------------------------------------------------------------------------------------------

_SOURCE_LIST = (
    Source(
        name="totalseg_ct1",
        description=(
            "CT-1: abdomen/pelvis CT, 122x101x112 at 3 mm, RAS, with TotalSegmentator's fast-model output "
            "(61 structures, `total` ids). Tool output, not manual ground truth. Same subject as totalseg_ct1_crop."
        ),
        modality="CT",
        url=_TOTALSEG_URL,
        license=_TOTALSEG_LICENSE,
        files=MappingProxyType(
            {
                "example_ct.nii.gz": "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
                "example_seg_fast_force_split.nii.gz": (
                    "e8097758e56e73099075b6caaebce23ef11bc6fad66a4ec3753b9406846558c7"
                ),
            }
        ),
        synthetic_images=False,
        folder="totalsegmentator",
        builder=_totalseg_ct1,
        intensity="ct_hu",
    ),
    Source(
        name="totalseg_ct1_crop",
        description=(
            "CT-1 crop: 30 slices (122x101x30, 3 mm, RAS) of the CT-1 scan with TotalSegmentator's output "
            "(41 structures). The SAME subject as totalseg_ct1 (subject 'totalseg_ct1'): never pair the two as "
            "different people."
        ),
        modality="CT",
        url=_TOTALSEG_URL,
        license=_TOTALSEG_LICENSE,
        files=MappingProxyType(
            {
                "example_ct_sm.nii.gz": "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb",
                "example_seg.nii.gz": "8be652475a4aaae83103a66bfb3345314b1fc06742807a06cf5005f7a7913a2d",
            }
        ),
        synthetic_images=False,
        folder="totalsegmentator",
        builder=_totalseg_ct1_crop,
        intensity="ct_hu",
    ),
    Source(
        name="totalseg_ct2",
        description=(
            "CT-2: upper-abdomen CT as a DICOM series (20 slices, JPEG 2000 lossless, 512x512, 0.98x0.98x2 mm) with "
            "TotalSegmentator's output on the same grid (31 structures, `total` ids) stored LAS while the series "
            "loads LPS: reorient both (e.g. Orientationd to RAS) before pairing voxels."
        ),
        modality="CT",
        url=_TOTALSEG_URL,
        license=_TOTALSEG_LICENSE,
        files=MappingProxyType(
            {
                **_CT2_DICOM,
                "example_seg_dicom.nii.gz": "98af7f6536c316ff9084054f20956cd3e28af376b81d582d269fbea2744878fc",
            }
        ),
        synthetic_images=False,
        folder="totalsegmentator",
        builder=_totalseg_ct2,
        intensity="ct_hu",
    ),
    Source(
        name="voxelmorph_t1",
        description=(
            "Real skull-stripped, affine-aligned T1 MRI with its FreeSurfer aseg label map (45 structures), "
            "160x192x224 at 1 mm, as bare arrays `vol`/`seg` of test_scan.npz in FreeSurfer's LIA orientation; "
            "read with NpzReader ('test_scan.npz#vol', '#seg')."
        ),
        modality="MR",
        url="https://raw.githubusercontent.com/voxelmorph/voxelmorph/ca28315d0ba24cd8946ac4f6ed081e049e5264fe/data/",
        license="Apache-2.0 (voxelmorph repository)",
        files=MappingProxyType(
            {"test_scan.npz": "32b14f2d7027518d9b3689ca0bdb908a1ed402db1a61ff2eb4c8184a475b12e0"}
        ),
        synthetic_images=False,
        folder="voxelmorph",
        builder=_voxelmorph,
        intensity="mr",
    ),
    Source(
        name="synthseg",
        description=(
            "Brain label maps of 20 real subjects (256^3, 1 mm, LIA), 52-53 structures: FreeSurfer aseg ids plus "
            "extra-cerebral CHARM ids (see names.py). NO images: items have 'label' only and synthetic=True; any "
            "image made from them is synthetic and must be reported as such. URL commit taken from a public index "
            "of the repository (the data README pins none)."
        ),
        modality="MR",
        url=(
            "https://raw.githubusercontent.com/BBillot/SynthSeg/3168fdf38ad220bd1927be43b67c5e9409a78ee7/"
            "data/training_label_maps/"
        ),
        license="Apache-2.0 (SynthSeg repository)",
        files=MappingProxyType(_SYNTHSEG_FILES),
        synthetic_images=True,
        folder="synthseg",
        builder=_synthseg,
        intensity="mr",
    ),
    Source(
        name="adrenalmnist3d",
        description=(
            "AdrenalMNIST3D (MedMNIST v2): 1,584 binary 3D shape masks of adrenal glands cropped from CT "
            "(28^3, or 64^3 with size=64), classes normal / adrenal_mass, official train/val/test splits "
            "(1188/98/298, split by patient). Left and right glands of one patient are separate items and the "
            "release does not say which items share a patient, so 'subject' identifies a volume, not a person. "
            "datalist(split=None|'train'|'val'|'test', size=28|64); images are float32 [1,s,s,s] in {0, 1}."
        ),
        modality="CT",
        url="https://zenodo.org/records/10519652/files/",
        license="CC BY 4.0 (MedMNIST)",
        files=MappingProxyType(
            {
                "adrenalmnist3d.npz": "8ffd78c0f000265deb7cf4ee0b454136fb3170f9839ecaa7bb01adf9f88aa7d1",
                "adrenalmnist3d_64.npz": "124a53ea2c66c8ac1985a4c98ea6f34d1ab35bdab1dc50947f80d4a87e54057d",
            }
        ),
        synthetic_images=False,
        folder="medmnist3d",
        builder=_adrenalmnist3d,
        intensity="binary",
    ),
    Source(
        name="ivadomed_spleen",
        description=(
            "Medical Segmentation Decathlon spleen case spleen_2: a CT crop (164x166x26, 0.8x0.8x5 mm, RAS) with "
            "its manual spleen mask, from ivadomed's test data."
        ),
        modality="CT",
        url=_IVADOMED_URL,
        license="CC BY-SA 4.0 (Medical Segmentation Decathlon)",
        files=MappingProxyType(
            {
                "ct_scan/sub-spleen2/ct/sub-spleen2_ct.nii.gz": (
                    "a63966cac6b6997dc339a8694a7b792a4807317784741cd8c36f98c88c0d33f9"
                ),
                "ct_scan/derivatives/labels/sub-spleen2/ct/sub-spleen2_ct_seg-manual.nii.gz": (
                    "1c3399068e678b817e035bea196439130f56aa0fc5fa3cca1391135f953be21b"
                ),
            }
        ),
        synthetic_images=False,
        folder="ivadomed",
        builder=_ivadomed_spleen,
        intensity="ct_hu",
    ),
    Source(
        name="ivadomed_spinal_cord",
        description=(
            "Spinal cord MRI of spine-generic subject sub-unf01 in T1w, T2w and T2*w (131x141x16, 1 mm, RAS) with "
            "manual cord masks. The data set's 'lesion' and 'labels-disc' files are dummies (not anatomy) and are "
            "deliberately left out."
        ),
        modality="MR",
        url=_IVADOMED_URL,
        license="not stated by the data README (ivadomed/data-testing, from the spine-generic example data)",
        files=MappingProxyType(
            {
                "sub-unf01/anat/sub-unf01_T1w.nii.gz": (
                    "bd009b24af3c541b37abb86ac9923584540750f4b67539f75c742a54f6ceca47"
                ),
                "sub-unf01/anat/sub-unf01_T2w.nii.gz": (
                    "f020b368fea15399fa112badd28b2df69e044dba5d23b3fe1646d12d7d3d39ac"
                ),
                "sub-unf01/anat/sub-unf01_T2star.nii.gz": (
                    "60d4d94bc4078aac201518ea400b8c8ff75ee6e30dc18255d0358664b482fde9"
                ),
                "derivatives/labels/sub-unf01/anat/sub-unf01_T1w_seg-manual.nii.gz": (
                    "fa89cc0e70509a357e5196a1019a169dfd2093dcbe47c37e2118f9ab8d4837d4"
                ),
                "derivatives/labels/sub-unf01/anat/sub-unf01_T2w_seg-manual.nii.gz": (
                    "d0830945773ef5bd9152faa901fb8616a0a6ca1e160687311814817c1278bce1"
                ),
                "derivatives/labels/sub-unf01/anat/sub-unf01_T2star_seg-manual.nii.gz": (
                    "c7f8a2b3b0e21134a1202390692cbb14ea8e46c8c51088d4c5d9b8d219355402"
                ),
            }
        ),
        synthetic_images=False,
        folder="ivadomed",
        builder=_ivadomed_spinal_cord,
        intensity="mr",
    ),
    Source(
        name="sct_spinal_cord",
        description=(
            "Spinal Cord Toolbox test subject errsm_30 in T1w, T2w, T2*w and MT: cord masks for each contrast, "
            "manual grey matter on T2*w, soft grey/white matter masks on MT (items carry label_threshold=0.5). "
            "One item per (image, label map); the vertebral-level map is not used."
        ),
        modality="MR",
        url=_SCT_URL,
        license="MIT (sct_testing_data)",
        files=MappingProxyType(
            {
                "t1/t1w.nii.gz": "b9c5f1d04a80ddea35443afc3c87a5ff4f8c6b1c02f85584e55b81be5c4656fd",
                "t1/t1w_seg-manual.nii.gz": "53124f1bd5cfe20d75e324d4397cb9d3026428902b3528f663f60b35abf548fb",
                "t2/t2.nii.gz": "15cde5cdc5e56ad4f7d5fef698b317864c9bd68c0f72d2b3022c9fae6d11d977",
                "t2/t2_seg-manual.nii.gz": "929a27bb3c3753c158ba98b6f24305e9be535a351232c950c3436a7284b62f67",
                "t2s/t2s.nii.gz": "7e267764a558b8595ce0642d827b71a8a7fba3e3311eb5a3ed7126a206b948fd",
                "t2s/t2s_seg.nii.gz": "6dbac3e7b5929c8a3b07fc6820d9fb41dee0ba6e8ece8bc3d6d4438c3fcbfad7",
                "t2s/t2s_gmseg_manual.nii.gz": "9b480692d9c9839ca8dd7e8bc74fe6d98d3e303345e1098449e030130a099a74",
                "mt/mt1.nii.gz": "9c460d26a7dbfe8ce7da1f496651f778e6ed9f3f68d154e0220842100ac35050",
                "mt/mt1_seg.nii.gz": "78763800a009c2127714dba54d31f0533953b7729cfc76fd11898e2239ff7c4a",
                "mt/mt1_gmseg.nii.gz": "36e73387e5e6ec300c555bf4252e1a625ee6f24cdbd8dc5e6615a0ce2169af67",
                "mt/mt1_wmseg.nii.gz": "70e3b3266052296dd6ecc0adfe273c0380b8dc6dc6af5ffa98e943ec6346baa6",
            }
        ),
        synthetic_images=False,
        folder="sct",
        builder=_sct_spinal_cord,
        intensity="mr",
    ),
    Source(
        name="pyradiomics",
        description=(
            "pyradiomics test cases (.nrrd): brain1, brain2 (MR, 0.78x0.78x6.5 mm) with a tumour mask (label 1, a "
            "bright enhancing region), breast1 (MR) with a lesion mask (label 1), and a prostate phantom MR "
            "sub-volume whose mask is not anatomy: 9 fills two bright regions, 8 is a one-voxel rim around them, 1 and "
            "7 are isolated edge voxels (named prostate_phantom_label_<id>). Whether brain1 and brain2 are "
            "different patients is not documented; they are treated as two subjects."
        ),
        modality="MR",
        url=_PYRADIOMICS_URL,
        license="BSD-3-Clause (pyradiomics repository)",
        files=MappingProxyType(
            {
                "data/brain1_image.nrrd": "fffdb111ee8b428ede7256707393c927a7d5be912f0604cf3c6f1bd5fc9644cf",
                "data/brain1_label.nrrd": "ae6d8e6b84f7e99d68c210ee2fa6aaaefa0b2df0a84f55efca4feebe2b216059",
                "data/brain2_image.nrrd": "d35a1c6a3e1eb72bae97c5515472fbe057fb38ee8e1e199215d1c3c6f292332e",
                "data/brain2_label.nrrd": "15189c024936ecc337649b9a10c475117c7c40df0d53c22163f9a2023ed741a5",
                "data/breast1_image.nrrd": "0e8b668f3ce9b9aacff20dc3c216866f43069ff96b269fb45b76f5e205a431e2",
                "data/breast1_label.nrrd": "07085bb0e36a956de5bd1c1c1b5f8bdf2ce80952125b13cbd352412c108c8950",
                "data/prostate_phantom_subvolume.nrrd": (
                    "4fb08fc0593a0e06d49bd8f7cb7cb6fc7ca68e9fc3cac0daa3ae26efa1516eba"
                ),
                "data/prostate_phantom_subvolume-label.nrrd": (
                    "6d6381cb6b227e996fed73b54239a177985681fd56a7c39a2e46e8d471727b22"
                ),
            }
        ),
        synthetic_images=False,
        folder="pyradiomics",
        builder=_pyradiomics,
        intensity="mr",
    ),
    Source(
        name="btcv_sabs",
        description=(
            "BTCV 'Multi-Atlas Labeling Beyond the Cranial Vault' abdominal CT (portal-venous) with 13 manually "
            "labelled organs (BTCV_NAMES ids: spleen, kidneys, gallbladder, esophagus, liver, stomach, aorta, IVC, "
            "portal/splenic vein, pancreas, adrenals). Shared layout: 20 subjects (image_<i>/label_<i>.nii.gz, "
            "subjects btcv_sabs_<i>) as preprocessed for SSL-ALPNet ('SABS'; label maps from github "
            "QYAOYang/VLAlignSeg- @ 3981d0690eb6537ff25364b9ec2a8a910b8f84f2, images restacked losslessly from its "
            "slice PNGs): 257x257x(85-199), 1.0-1.7 mm in-plane x 2.5-5 mm, headers LPS but anatomy LAS (the items' "
            "'orientation' corrects the anterior-posterior axis on loading), resampled and cropped by SSL-ALPNet. "
            "Its images are 8-bit DISPLAY-WINDOWED (0..255, air 0, bone saturated), not Hounsfield units: intensity "
            "'ct_windowed', never apply an HU window. Subject 12 has no gallbladder. The SABS index i is not BTCV's "
            "case number. Upstream layout (Synapse RawData/Training: img/img0001.nii.gz, label/label0001.nii.gz; 30 "
            "labelled subjects, subjects btcv_<case>) is in HU: intensity 'ct_hu'. Same subjects as SSL-ALPNet's "
            "SABS table (1-way 1-shot, Dice per 3D scan); this project's protocol is 3D: say which subjects were "
            "support, query and training."
        ),
        modality="CT",
        url="",
        license="BTCV (Synapse syn3193805): research use after registration; cite Landman et al. 2015",
        files=_manifest("btcv_sabs"),
        synthetic_images=False,
        folder="btcv_sabs",
        builder=_btcv_sabs,
        intensity="ct_windowed",
        obtain=(
            "Obtain BTCV from Synapse (syn3193805, 'Multi-Atlas Labeling Beyond the Cranial Vault', registration "
            "required); its RawData/Training/ folder holds img/ and label/."
        ),
        upstream=UpstreamLayout(upstream.BTCV_LAYOUT, upstream.find_btcv, _btcv_upstream),
        orientation="LAS",
    ),
    Source(
        name="chaos_t2",
        description=(
            "CHAOS T2-SPIR abdominal MR with manual liver, right kidney, left kidney and spleen (CHAOS_NAMES ids 1-4). "
            "Shared layout: 10 subjects (ids 1, 2, 3, 5, 8, 10, 13, 15, 19, 20; image_<id>/label_<id>.nii.gz, "
            "subjects chaos_<id>) in SSL-ALPNet's preprocessing (github shenqq377/Q-Net @ "
            "70a828d8cec11425785230a98ec965231b5fdd4d, data/CHAOST2/chaos_MR_T2_normalized/), 256x256x(31-46), "
            "1.25x1.25x7.7 mm, LAS, resampled by SSL-ALPNet; classmap_1.json there is SSL-ALPNet's slice index, not "
            "a scan, and is not used. Upstream layout (CHAOS_Train_Sets: Train_Sets/MR/<id>/T2SPIR/DICOM_anon + "
            "Ground PNGs; 20 subjects): the image is the DICOM series folder, and the PNG ground truth is converted "
            "once into a NIfTI label map on the series' grid (datalist(cache_dir=...), default "
            "~/.cache/monai_metalearn/chaos_labels)."
        ),
        modality="MR",
        url="",
        license="CC BY-SA 4.0 (CHAOS); cite Kavur et al. 2021",
        files=_manifest("chaos_t2"),
        synthetic_images=False,
        folder="chaos_t2",
        builder=_chaos_t2,
        intensity="mr",
        obtain=(
            "Obtain CHAOS from chaos.grand-challenge.org (Zenodo record 3431873); CHAOS_Train_Sets.zip holds "
            "Train_Sets/MR/<id>/T2SPIR/."
        ),
        upstream=UpstreamLayout(upstream.CHAOS_LAYOUT, upstream.find_chaos, _chaos_upstream),
    ),
    Source(
        name="acdc",
        description=(
            "ACDC cine cardiac MR with manual right ventricle, myocardium and left ventricle (ACDC_NAMES ids 1-3) at "
            "end-diastole (ED) and end-systole (ES): two items per patient sharing one subject (acdc_<patient>); "
            "datalist(phases=('ED',)) takes one phase. Items carry phase, diagnosis (DCM, HCM, MINF = previous "
            "infarction, NOR, RV = abnormal right ventricle) and patient. Shared layout: 30 patients, 6 per "
            "diagnosis (patient<NNN>_{ED,ES}[_gt].nii.gz, groups.json), repackaged from the SSL4MIS h5 files of "
            "github antares0811/3DCardiac @ 7dcd89c (images min-max normalised to [0, 1]; ED = frame01). Its "
            "GEOMETRY IS NOMINAL (items carry geometry='nominal'): a 1.5x1.5x8 mm diagonal affine written by the "
            "repackager, while ACDC's scans are 1.37-1.68 mm in-plane and 5-10 mm between slices; treat physical "
            "sizes as approximate and say so. Upstream layout (training/patient001/ with frames, _gt files and "
            "Info.cfg, whose ED/ES/Group lines give the frames and the diagnosis; 100 training patients, plus the "
            "testing patients where they have _gt files): real geometry."
        ),
        modality="MR",
        url="",
        license="ACDC (Creatis): non-commercial research use; cite Bernard et al. 2018",
        files=_manifest("acdc"),
        synthetic_images=False,
        folder="acdc",
        builder=_acdc,
        intensity="mr",
        obtain=(
            "Obtain ACDC from Creatis (humanheart-project.creatis.insa-lyon.fr, registration required); its "
            "database/training/ folder holds patient001/ ... with Info.cfg."
        ),
        upstream=UpstreamLayout(upstream.ACDC_LAYOUT, upstream.find_acdc, _acdc_upstream),
        registration={"initial_rotations": tuple(float(a) for a in range(0, 360, 30))},
    ),
    Source(
        name="lpba40",
        description=(
            "LPBA40 (LONI Probabilistic Brain Atlas) skull-stripped T1 brain MRI with 56 manually delineated "
            "structures (LPBA40_NAMES ids 21-182: cortical gyri left/right, insula, cingulate, caudate, putamen, "
            "hippocampus, cerebellum, brainstem; caudate, putamen, hippocampus and brainstem share FreeSurfer's "
            "names). Shared layout: 6 subjects S01-S06 (S<NN>.nii.gz, S<NN>.label.nii.gz, subjects lpba40_S<NN>) from "
            "github huangzyong/LGANet-Registration @ cf193e3a8c05fe2bfc4ec53098fe99d4ba886627, 160x192x160, 1 mm, "
            "stored LPS, intensities scaled to [0, 1]. Upstream layout (LONI delineation_space/S01/ Analyze .hdr "
            "with .img or .img.gz, or NIfTI; 40 subjects). LEFT/RIGHT CAVEAT: Analyze stores no orientation. The "
            "shared files carry a placeholder LPS affine (diagonal -1, -1, 1, origin 0), and in all six the "
            "structures LONI labels left (odd ids) lie where that affine puts the subject's right; upstream Analyze "
            "pairs load through ITK (LoadScan) with a default identity direction (LPS) too. Trust the label names, "
            "not world left/right, for this set."
        ),
        modality="MR",
        url="",
        license="LONI LPBA40: research use under LONI's terms; cite Shattuck et al. 2008",
        files=_manifest("lpba40"),
        synthetic_images=False,
        folder="lpba40",
        builder=_lpba40,
        intensity="mr",
        obtain="Obtain LPBA40 from LONI (loni.usc.edu, 'LPBA40' delineation-space download, registration required).",
        upstream=UpstreamLayout(upstream.LPBA40_LAYOUT, upstream.find_lpba40, _lpba40_upstream),
    ),
)

#: Every source, by name.
SOURCES: MappingProxyType[str, Source] = MappingProxyType({s.name: s for s in _SOURCE_LIST})


def get_source(name: str) -> Source:
    """
    Return the source called ``name``.

    Args:
        name: a key of :data:`SOURCES`.

    Raises:
        KeyError: when there is no such source; the message lists the valid names.
    """
    try:
        return SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown source {name!r}; valid names: {', '.join(SOURCES)}.") from None


def load_datalist(name: str, root: PathLike | None = None, **kwargs: Any) -> list[dict]:
    """
    Return the datalist of the source called ``name`` (see :meth:`Source.datalist`).

    Args:
        name: a key of :data:`SOURCES`.
        root: the data directory (default: ``MONAI_DATA_DIRECTORY``).
        kwargs: ``layout`` (``"auto"``, ``"shared"``, ``"upstream"``, see :meth:`Source.datalist`) and source-specific
            options: ``adrenalmnist3d``: ``split``, ``size``; ``acdc``: ``phases`` (default ``("ED", "ES")``);
            ``chaos_t2``: ``cache_dir`` (where the upstream PNG ground truth is converted to NIfTI, default
            ``~/.cache/monai_metalearn/chaos_labels``).

    Raises:
        KeyError: unknown source name.
        ValueError: an unknown layout or option value.
        FileNotFoundError: missing data directory or files, or neither layout of a multi-subject set.
        LabelIdError: (a ``ValueError``) an upstream label map holds an id outside the source's table.

    Example::

        items = load_datalist("synthseg")
        len(items), items[0]["synthetic"]  # (20, True)
        ed = load_datalist("acdc", phases=("ED",))  # one item per patient
    """
    return get_source(name).datalist(root, **kwargs)


def registration_settings(sources: Iterable[Any]) -> dict[str, Any]:
    """The :attr:`Source.registration` settings of the named sources, merged (the first name's value wins where two
    sources set one field). Names that are not in :data:`SOURCES` (a user's own data) and ``None`` add nothing.

    Example::

        registration_settings(["acdc"])  # {"initial_rotations": (0.0, 30.0, ..., 330.0)}
        registration_settings(["btcv_sabs", "my_scans"])  # {}
    """
    out: dict[str, Any] = {}
    for name in sources:
        src = SOURCES.get(str(name)) if name is not None else None
        for key, value in (src.registration.items() if src is not None else ()):
            out.setdefault(key, value)
    return out


def file_orientation(source: Any, path: PathLike | None) -> str | None:
    """The orientation correction (:attr:`Source.orientation`) for one file named by a task file or datalist: the
    named source's codes when ``path`` is one of its shared layout's files (matched by file name), else ``None``
    (other sources, a user's own data, the upstream layout of a data set).

    Example::

        file_orientation("btcv_sabs", ".../btcv_sabs/image_3.nii.gz")  # "LAS"
        file_orientation("btcv_sabs", ".../img/img0001.nii.gz")        # None: Synapse's files have right headers
    """
    src = SOURCES.get(str(source)) if source is not None else None
    if src is None or not src.orientation or path is None:
        return None
    names = {Path(rel).name for rel in src.files}
    return src.orientation if Path(str(path)).name in names else None
