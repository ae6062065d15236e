"""Training variants of the segmentation ablations (``bench_segmentation_ablations.py``), imported by the bundle run
through ``--imports``. Experiment code: none of it changed the CT Dice, so none of it is part of the package.

* :func:`intensity_augmented_patches`: the bundle's training patches after a random non-linear intensity remap of each
  subject (``RandHistogramShiftd`` then a random gamma, ``RandAdjustContrastd``), drawn separately for the support
  and the query subject, so that the encoder cannot rely on a structure's intensity (the two CTs differ in contrast
  phase).
* :func:`structure_shift_dataset`: the base dataset of meta-training with an independent random intensity offset on
  every META-TRAIN structure of each subject (contrast enhancement differs between structures). Only the meta-train
  structures' labels are used, so nothing of the held-out structures enters meta-training.
* :func:`supervoxel_dataset` / :func:`supervoxel_structures`: self-supervised episodes in the SSL-ALPNet style, in 3D:
  each CT is cut into SLIC supervoxels (scikit-image) inside the body, every supervoxel is a pseudo-structure, and
  support and query are two differently augmented views of the same scan (use with
  :func:`intensity_augmented_patches`). No label of any structure is used, unless ``include_labelled``.
* :func:`same_subject_dataset`: meta-train episodes also for the structures labelled in one CT only
  (:data:`CT1_ONLY_STRUCTURES`: kidneys, gallbladder, bowel, bladder, pelvic muscles and bones), support and query
  patches from that scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import Compose, MapTransform, RandAdjustContrastd, RandHistogramShiftd, Randomizable

import monai_metalearn.apps.segmentation as app
from monai_metalearn.transforms import resolve_structure, structure_mask

#: Scaled intensity above which a CT voxel is inside the body (the CT window's floor, -250 HU, is 0: -238 HU).
BODY_THRESHOLD = 0.02


def body_mask(image: torch.Tensor) -> torch.Tensor:
    """Voxels of a scaled CT ``image`` (any shape) above :data:`BODY_THRESHOLD`."""
    return image > BODY_THRESHOLD


def organ_mask(subject: dict, name: str) -> torch.Tensor:
    """Boolean mask of structure ``name`` in a subject of ``load_segmentation_subjects`` (shape of its label)."""
    return structure_mask(subject["label"], resolve_structure(name, subject["structures"])[1], repr(name))


def intensity_augmentation(prob: float = 0.8):
    """Random non-linear intensity remap (histogram control points) and gamma of ``image``."""
    return Compose([
        RandHistogramShiftd(keys="image", num_control_points=(5, 10), prob=prob),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=prob),
    ])


def intensity_augmented_patches(patch_size: Sequence[int], n_patches: int, prob: float = 0.8):
    """:func:`intensity_augmentation` of the whole subject, then the bundle's training patches."""
    return Compose([intensity_augmentation(prob), app.patch_transforms(patch_size, n_patches)])


class RandStructureShiftd(Randomizable, MapTransform):
    """Adds an independent uniform offset in ``[-max_shift, max_shift]`` to the intensity of each listed structure
    present in a subject (with probability ``prob`` per subject); the image stays in ``[0, 1]``."""

    def __init__(self, structures: Sequence[str], max_shift: float = 0.1, prob: float = 0.8) -> None:
        MapTransform.__init__(self, ["image"], allow_missing_keys=True)
        self.structures, self.max_shift, self.prob = set(structures), float(max_shift), float(prob)

    def randomize(self, data: Any = None) -> None:
        pass

    def __call__(self, data):
        d = dict(data)
        if d.get("image") is None or self.R.rand() > self.prob:
            return d
        image = torch.as_tensor(d["image"]).clone()
        for name in self.structures.intersection(d["structures"]):
            image[organ_mask(d, name)] += float(self.R.uniform(-self.max_shift, self.max_shift))
        d["image"] = image.clamp_(0.0, 1.0)
        return d


def structure_shift_dataset(subjects: list[dict], train_structures: Sequence[str], max_shift: float = 0.1):
    """The bundle's base dataset with :class:`RandStructureShiftd` over the meta-train structures."""
    return Dataset(subjects, transform=Compose([app.subject_transforms(), RandStructureShiftd(train_structures,
                                                                                             max_shift)]))


def supervoxels(image: torch.Tensor, n_segments: int = 200, compactness: float = 0.02, min_size: int = 200):
    """SLIC supervoxels of a ``[1, *S]`` image in ``[0, 1]`` inside the body; those under ``min_size`` voxels are
    dropped (0). Returns ``(label [1, *S] int16, ids)``."""
    from skimage.segmentation import slic

    x = image[0].numpy().astype(np.float64)
    sv = slic(x, n_segments=n_segments, compactness=compactness, channel_axis=None, mask=body_mask(x),
              start_label=1, enforce_connectivity=True)
    ids, counts = np.unique(sv[sv > 0], return_counts=True)
    keep = ids[counts >= min_size]
    sv[~np.isin(sv, keep)] = 0
    return torch.as_tensor(sv[None].astype(np.int16)), [int(i) for i in keep]


def supervoxel_dataset(subjects: list[dict], modality: str = "CT", include_labelled: bool = False, **slic_args):
    """Two views (``<subject>_a``, ``<subject>_b``) of every ``modality`` subject, labelled by its supervoxels, each
    supervoxel a pseudo-structure ``<subject>_sv<id>``; with ``include_labelled`` the real subjects too."""
    items = []
    for s in subjects:
        if s.get("modality") != modality or s.get("image") is None:
            continue
        label, ids = supervoxels(s["image"], **slic_args)
        names = {f"{s['subject']}_sv{i}": i for i in ids}
        items += [{"image": s["image"], "label": label, "structures": names, "subject": f"{s['subject']}_{view}",
                   "modality": modality, "pseudo": True} for view in ("a", "b")]
        print(f"{s['subject']}: {len(ids)} supervoxels", flush=True)
    if include_labelled:
        items += list(subjects)
    return Dataset(items, transform=app.subject_transforms())


def supervoxel_structures(dataset: Dataset, labelled: Sequence[str] = ()) -> list[str]:
    """The pseudo-structures of :func:`supervoxel_dataset`, then ``labelled``."""
    names = [n for item in dataset.data if item.get("pseudo") for n in item["structures"]]
    return list(dict.fromkeys(names)) + list(labelled)


#: Structures labelled in CT-1 only (TotalSegmentator's map of CT-1 covers the pelvis, CT-2's 20 slices do not):
#: organs, muscles and bones that no cross-subject episode can use. None is a validation or test structure.
CT1_ONLY_STRUCTURES = (
    "adrenal_gland_left", "duodenum", "femur_left", "femur_right", "gallbladder", "gluteus_maximus_left",
    "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right", "gluteus_minimus_left",
    "gluteus_minimus_right", "hip_left", "hip_right", "iliac_artery_left", "iliac_artery_right", "iliac_vena_left",
    "iliac_vena_right", "iliopsoas_left", "iliopsoas_right", "kidney_left", "kidney_right", "lung_lower_lobe_left",
    "lung_lower_lobe_right", "lung_upper_lobe_left", "prostate", "sacrum", "small_bowel", "urinary_bladder",
    "vertebrae_L1", "vertebrae_L2", "vertebrae_L3", "vertebrae_L4", "vertebrae_L5", "vertebrae_S1",
)


def same_subject_dataset(subjects: list[dict], structures: Sequence[str] = CT1_ONLY_STRUCTURES):
    """The bundle's base dataset plus a second view (``<subject>_view``) of every subject holding one of
    ``structures``, restricted to those: episodes of these structures take support and query patches from the same
    scan (different patches; different intensity remaps with :func:`intensity_augmented_patches`)."""
    wanted = set(structures)
    views = [{**s, "subject": f"{s['subject']}_view", "structures": {k: v for k, v in s["structures"].items()
                                                                    if k in wanted}}
             for s in subjects if wanted & set(s["structures"])]
    return Dataset(list(subjects) + views, transform=app.subject_transforms())
