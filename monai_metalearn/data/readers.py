# Copyright (c) monai-metalearn contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""
A MONAI :class:`~monai.data.ImageReader` for volumes stored as bare arrays in ``.npz`` files.

The voxelmorph test scan holds a T1 volume and its aseg label map as two arrays (``vol``, ``seg``) of one
``.npz`` file, with no affine. :class:`NpzReader` reads ``"file.npz#key"`` paths and attaches the affine the
data's documentation states: FreeSurfer's conformed orientation, LIA at 1 mm (axis 0 towards the subject's
left, axis 1 towards inferior, axis 2 towards anterior).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from monai.config import PathLike
from monai.data.image_reader import ImageReader, _copy_compatible_dict, _stack_images
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

__all__ = ["NpzReader", "LIA_1MM", "split_npz_path"]

#: Direction and spacing of FreeSurfer's conformed space (no translation): voxel axis 0 -> Left (world x
#: decreases), axis 1 -> Inferior (z decreases), axis 2 -> Anterior (y increases), 1 mm voxels.
#: ``nibabel.aff2axcodes(LIA_1MM) == ("L", "I", "A")``.
LIA_1MM = np.array(
    [[-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=np.float64
)


def split_npz_path(path: PathLike) -> tuple[str, str | None]:
    """
    Split ``"file.npz#key"`` into ``("file.npz", "key")``; a path without ``#`` gives ``(path, None)``.

    Args:
        path: a path to an ``.npz`` file, optionally followed by ``#`` and the name of one array in it.
    """
    text = str(path)
    file, sep, key = text.rpartition("#")
    if not sep or not file.lower().endswith(".npz"):
        return text, None
    return file, key or None


class NpzReader(ImageReader):
    """
    Read one array of an ``.npz`` file as an image, addressed as ``"path/file.npz#key"``.

    The array is returned without a channel dimension (``original_channel_dim`` is ``"no_channel"``), so
    ``EnsureChannelFirst`` / ``LoadImage(ensure_channel_first=True)`` adds one. The affine is ``affine`` if given,
    else :data:`LIA_1MM` with the volume centred on the world origin, as in FreeSurfer's conformed space.

    Args:
        affine: 4x4 voxel-to-world (RAS) affine for every array read; ``None`` for the centred LIA 1 mm default.
        key: array name used for paths without ``#key``; ``None`` means "the only array in the file".
        dtype: if not ``None``, cast the array to this dtype (``LoadImage`` casts again to its own ``dtype``).

    Raises:
        ValueError: in ``read`` when the key is not in the file (the message lists the keys), or when no key is
            given and the file holds several arrays; ``affine`` is not 4x4.

    Example::

        from monai.transforms import LoadImaged
        load = LoadImaged(keys=["image", "label"], reader=NpzReader(), ensure_channel_first=True)
        data = load({"image": "voxelmorph/test_scan.npz#vol", "label": "voxelmorph/test_scan.npz#seg"})
        data["image"].shape  # (1, 160, 192, 224), nibabel.aff2axcodes(data["image"].affine) == ("L", "I", "A")
    """

    def __init__(self, affine: np.ndarray | None = None, key: str | None = None, dtype: Any = None) -> None:
        super().__init__()
        if affine is not None:
            affine = np.asarray(affine, dtype=np.float64)
            if affine.shape != (4, 4):
                raise ValueError(f"affine must be a 4x4 matrix, got shape {affine.shape}.")
        self.affine = affine
        self.key = key
        self.dtype = dtype

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """
        Whether every name is an ``.npz`` file, with or without a ``#key`` suffix.

        Args:
            filename: a file name or a sequence of file names.
        """
        names = ensure_tuple(filename)
        return bool(names) and all(split_npz_path(n)[0].lower().endswith(".npz") for n in names)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs) -> np.ndarray | list[np.ndarray]:
        """
        Read the addressed array of each file; several names give a list (stacked as channels by ``get_data``).

        Args:
            data: ``"file.npz#key"`` path(s).
            kwargs: unused, for API compatibility with the other readers.
        """
        arrays = []
        for name in ensure_tuple(data):
            file, key = split_npz_path(name)
            key = key or self.key
            with np.load(file, allow_pickle=False) as npz:
                keys = list(npz.files)
                if key is None:
                    if len(keys) != 1:
                        raise ValueError(f"{file} holds arrays {keys}: address one as '{file}#<key>'.")
                    key = keys[0]
                if key not in keys:
                    raise ValueError(f"{file} has no array {key!r}; it holds {keys}.")
                array = npz[key]
            arrays.append(array.astype(self.dtype, copy=False) if self.dtype is not None else array)
        return arrays if len(arrays) > 1 else arrays[0]

    def _affine_for(self, shape: Sequence[int]) -> np.ndarray:
        if self.affine is not None:
            return self.affine.copy()
        affine = LIA_1MM.copy()
        centre = (np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0  # the centre voxel maps to world (0, 0, 0)
        affine[:3, 3] = -affine[:3, :3] @ centre
        return affine

    def get_data(self, img: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, dict]:
        """
        Return the array (several arrays stacked on a new first axis) and its metadata.

        The metadata holds ``affine``, ``original_affine``, ``spatial_shape``, ``space`` (RAS) and
        ``original_channel_dim`` (``"no_channel"``, or 0 when several arrays were stacked).

        Args:
            img: the array(s) returned by :meth:`read`.
        """
        images = (img,) if isinstance(img, np.ndarray) else tuple(img)
        arrays, meta = [], {}
        for array in images:
            if array.ndim not in (2, 3):
                raise ValueError(f"expected a 2D or 3D array without channel, got shape {array.shape}.")
            header = {
                MetaKeys.AFFINE: self._affine_for(array.shape),
                MetaKeys.ORIGINAL_AFFINE: self._affine_for(array.shape),
                MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel",
            }
            arrays.append(array)
            _copy_compatible_dict(header, meta)
        return _stack_images(arrays, meta), meta

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(affine={'LIA 1 mm (centred)' if self.affine is None else 'custom'})"

