"""Transforms for few-shot meta-learning on 3D CT/MRI: structure selection and cropping, label remapping and
SynthSeg-style image synthesis (array and dictionary versions, MONAI style)."""

from monai_metalearn.transforms.array import (
    CropStructure,
    RandCropStructure,
    RandSynthesizeImage,
    RemapLabels,
    SelectStructure,
    StructureSpec,
    resolve_structure,
    structure_bounding_box,
    structure_mask,
)
from monai_metalearn.transforms.intensity import (
    CT_WINDOW,
    IGNORE_LABEL,
    INTENSITY_KINDS,
    BodyMask,
    BodyMaskd,
    ScaleIntensityByKind,
    ScaleIntensityByKindd,
    body_mask,
    check_intensity_kind,
    infer_intensity,
    scale_intensity,
)
from monai_metalearn.transforms.modality import RandInvertIntensity, RandInvertIntensityd, modality_augmentation
from monai_metalearn.transforms.coordinates import (
    BodyCoordinates,
    BodyCoordinatesd,
    BodyFrameError,
    body_box,
    body_coordinates,
)
from monai_metalearn.transforms.dictionary import (
    CropStructured,
    CropStructureD,
    CropStructureDict,
    RandCropStructured,
    RandCropStructureD,
    RandCropStructureDict,
    RandSynthesizeImaged,
    RandSynthesizeImageD,
    RandSynthesizeImageDict,
    RemapLabelsd,
    RemapLabelsD,
    RemapLabelsDict,
    SelectStructured,
    SelectStructureD,
    SelectStructureDict,
)

__all__ = [
    # modality augmentation
    "RandInvertIntensity",
    "RandInvertIntensityd",
    "modality_augmentation",
    # body-frame coordinates
    "BodyCoordinates",
    "BodyCoordinatesd",
    "BodyFrameError",
    "body_box",
    "body_coordinates",
    # array
    "StructureSpec",
    "resolve_structure",
    "structure_mask",
    "structure_bounding_box",
    "SelectStructure",
    "CropStructure",
    "RandCropStructure",
    "RemapLabels",
    "RandSynthesizeImage",
    # intensity kinds, body masks, the ignore label
    "CT_WINDOW",
    "IGNORE_LABEL",
    "INTENSITY_KINDS",
    "BodyMask",
    "BodyMaskd",
    "ScaleIntensityByKind",
    "ScaleIntensityByKindd",
    "body_mask",
    "check_intensity_kind",
    "infer_intensity",
    "scale_intensity",
    # dictionary
    "SelectStructured",
    "SelectStructureD",
    "SelectStructureDict",
    "CropStructured",
    "CropStructureD",
    "CropStructureDict",
    "RandCropStructured",
    "RandCropStructureD",
    "RandCropStructureDict",
    "RemapLabelsd",
    "RemapLabelsD",
    "RemapLabelsDict",
    "RandSynthesizeImaged",
    "RandSynthesizeImageD",
    "RandSynthesizeImageDict",
]
