"""Pairwise 3D registration by instance optimisation (initial alignment, affine, deformable; mono- and cross-modal
similarities) on MONAI's ``Warp`` / ``DVF2DDF`` / losses, and label fusion for several atlases.

Example::

    from monai_metalearn.registration import register, register_many, majority_vote

    result = register(atlas_image, query_image)              # MetaTensors [1, *S] with affines
    carried = result.warp_label(atlas_label)                 # on the query's own grid
    results = register_many([atlas1, atlas2, atlas3], query_image)  # K atlases of one query in one problem
"""

from monai_metalearn.registration.fusion import majority_vote, local_weights, staple, weighted_vote
from monai_metalearn.registration.grid import Grid, downsample, grid_points, image_grid, resample, sample, working_grid
from monai_metalearn.registration.initial import INITIAL_METHODS, body_mask, initial_alignment
from monai_metalearn.registration.pairwise import (
    AFFINE_DOF,
    STAGES,
    RegistrationConfig,
    RegistrationResult,
    dice_per_label,
    register,
)
from monai_metalearn.registration.batched import register_many
from monai_metalearn.registration.similarity import (
    SIMILARITIES,
    Similarity,
    get_similarity,
    mind_ssc,
    normalize_intensity,
)

__all__ = [
    "AFFINE_DOF",
    "Grid",
    "INITIAL_METHODS",
    "RegistrationConfig",
    "RegistrationResult",
    "SIMILARITIES",
    "STAGES",
    "Similarity",
    "body_mask",
    "dice_per_label",
    "downsample",
    "get_similarity",
    "grid_points",
    "image_grid",
    "initial_alignment",
    "local_weights",
    "majority_vote",
    "mind_ssc",
    "normalize_intensity",
    "register",
    "register_many",
    "resample",
    "sample",
    "staple",
    "weighted_vote",
    "working_grid",
]
