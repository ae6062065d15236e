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
