# Copyright (c) monai-metalearn contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""
The real public CT and MRI sources, each as a MONAI datalist (a list of dicts, one per image/label pair).

Every file is read in place from the data directory (``MONAI_DATA_DIRECTORY``, one sub-folder per source
folder) or fetched from its pinned public URL with :meth:`Source.download`, which checks its sha256.

An image/label item holds:

- ``image``: path of the image (a file, a DICOM series folder, or ``"file.npz#key"``); absent for label-only
  sources, whose images must be synthesised from the label map.
- ``label``: path of the label map.
- ``subject``: who was scanned, unique across sources and equal for the same person (so cross-subject sampling
  never pairs two crops of one person).
- ``modality`` (``"CT"``/``"MR"``), ``source`` (the source name), ``synthetic`` (``True`` when any image
  must be synthesised from the label map), optional ``contrast`` (MR weighting).
- ``structures``: canonical structure name -> label id in this item's label map, listing only structures
  present in that map. The ids were read from the files once and are written here (checked by the tests),
  so building a datalist reads no image data.
- optional ``label_threshold``: the label file is a soft mask; binarise it as ``label > label_threshold``
  (:class:`~monai_metalearn.data.loading.LoadScand` does so), after which the structure id is 1.

Example::

    from monai_metalearn.data.sources import load_datalist
    items = load_datalist("totalseg_ct2")
    items[0]["structures"]["liver"]  # 5
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import numpy as np

from monai.apps.utils import HashCheckError, download_url
from monai.config import PathLike

from monai_metalearn.data.names import FREESURFER_NAMES, TOTALSEG_NAMES

__all__ = [
    "DATA_DIR_ENV",
    "data_dir",
    "Source",
    "SOURCES",
    "get_source",
    "load_datalist",
    "ADRENAL_CLASSES",
]

#: Environment variable naming the data directory (the MONAI convention).
DATA_DIR_ENV = "MONAI_DATA_DIRECTORY"

#: AdrenalMNIST3D class index -> class name (MedMNIST's INFO calls class 1 "hyperplasia"; its description and the
#: source dataset, ALAN, say "adrenal mass").
ADRENAL_CLASSES = ("normal", "adrenal_mass")


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
class Source:
    """
    One public data source: provenance, pinned files and how to turn them into a datalist.

    Args:
        name: the source's key in :data:`SOURCES`.
        description: what the data is, its labels and caveats.
        modality: ``"CT"`` or ``"MR"``.
        url: base URL of the pinned public copy; ``url + relative path`` fetches each file.
        license: the data's license.
        files: relative path inside the source folder -> sha256 of the file.
        synthetic_images: ``True`` when the source has label maps only and any image must be synthesised.
        folder: sub-folder of the data directory holding the files.
        builder: ``builder(source, folder, **kwargs) -> list[dict]`` building the datalist.
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

    def path(self, root: PathLike | None = None) -> Path:
        """The source's folder inside the data directory ``root`` (default ``MONAI_DATA_DIRECTORY``)."""
        return data_dir(root) / self.folder

    def datalist(self, root: PathLike | None = None, **kwargs: Any) -> list[dict]:
        """
        Build the source's datalist from the files in ``root/<folder>``.

        Args:
            root: the data directory (default: ``MONAI_DATA_DIRECTORY``).
            kwargs: source-specific options (``adrenalmnist3d``: ``split``, ``size``).

        Raises:
            FileNotFoundError: when the data directory or one of the source's files is missing.
        """
        folder = self.path(root)
        missing = [rel for rel in self.files if not (folder / rel).exists()]
        if missing:
            raise FileNotFoundError(
                f"source {self.name!r}: {len(missing)} file(s) missing under {folder}, e.g. {missing[0]}; "
                f"fetch them with get_source({self.name!r}).download(root)."
            )
        return self.builder(self, folder, **kwargs)

    def download(self, root: PathLike, progress: bool = True, base_url: str | None = None) -> Path:
        """
        Fetch every file from ``(base_url or url) + relative path`` into ``root/<folder>``, checking its sha256.

        A file already there with the right hash is not fetched again.

        Args:
            root: the data directory to fill (created if needed).
            progress: show a progress bar per file.
            base_url: another base URL (a mirror, or ``file://`` for a local copy); defaults to :attr:`url`.

        Returns:
            The source's folder, ``root/<folder>``.

        Raises:
            HashCheckError: (a ``ValueError``) when a fetched or existing file does not match its sha256; the message
                names the file.
            RuntimeError: when a file cannot be fetched.
        """
        dest = Path(root).expanduser() / self.folder
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
    )
    item.update(extra)
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
        kwargs: source-specific options (``adrenalmnist3d``: ``split``, ``size``).

    Raises:
        KeyError: unknown source name.
        FileNotFoundError: missing data directory or files.

    Example::

        items = load_datalist("synthseg")
        len(items), items[0]["synthetic"]  # (20, True)
    """
    return get_source(name).datalist(root, **kwargs)
