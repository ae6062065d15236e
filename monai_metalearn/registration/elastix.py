"""The reference engine: elastix through ITK (``pip install 'monai-metalearn[elastix]'``), on the same inputs and
outputs as :func:`~monai_metalearn.registration.register`, so that benchmarks compare the two on the same pairs.

:func:`elastix_register` runs elastix's *default* affine and B-spline parameter maps (``itk.ParameterObject``'s
``GetDefaultParameterMap``: 4 resolutions, 256 iterations each, Mattes mutual information, B-spline grid 10 mm with
a bending-energy penalty) from an initial translation that aligns the centres of gravity of the two images
(``AutomaticTransformInitialization``), and carries label maps with transformix (nearest neighbour).

Example::

    from monai_metalearn.registration.elastix import elastix_register

    result = elastix_register(atlas["image"], query["image"])        # MetaTensors [1, *S] with affines
    carried = result.warp_label(atlas["label"])                       # on the query's grid
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["ElastixResult", "elastix_available", "elastix_register"]


def elastix_available() -> bool:
    """Whether ``itk-elastix`` is installed (``itk.ElastixRegistrationMethod``)."""
    try:
        import itk

        return hasattr(itk, "ElastixRegistrationMethod")
    except ImportError:
        return False


def _require() -> Any:
    if not elastix_available():
        raise ImportError("the elastix reference needs itk-elastix: pip install 'monai-metalearn[elastix]'")
    import itk

    return itk


def _to_itk(image: Tensor) -> Any:
    from monai.data import MetaTensor
    from monai.data.itk_torch_bridge import metatensor_to_itk_image

    if not isinstance(image, MetaTensor):
        raise ValueError(f"elastix_register needs MetaTensors with affines, got {type(image).__name__}")
    return metatensor_to_itk_image(MetaTensor(image.as_tensor().float(), affine=image.affine), channel_dim=0,
                                   dtype="float32")


@dataclass
class ElastixResult:
    """elastix's transform of the moving image onto the fixed one, and its time."""

    transform_parameters: Any
    fixed: Tensor
    seconds: float
    parameter_maps: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def warp_label(self, label: Tensor) -> Tensor:
        """The moving label map ``[1, *S]`` (``MetaTensor``) on the fixed grid, by transformix with nearest-neighbour
        interpolation: a ``MetaTensor`` with the fixed affine and the input dtype."""
        from monai.data import MetaTensor

        itk = _require()
        params = itk.ParameterObject.New()
        for i in range(self.transform_parameters.GetNumberOfParameterMaps()):
            m = self.transform_parameters.GetParameterMap(i)
            m["FinalBSplineInterpolationOrder"] = ["0"]
            m["ResampleInterpolator"] = ["FinalNearestNeighborInterpolator"]
            params.AddParameterMap(m)
        from monai.data.itk_torch_bridge import itk_image_to_metatensor

        moved = itk_image_to_metatensor(itk.transformix_filter(_to_itk(label), params), channel_dim=None)
        data = moved.as_tensor().reshape(1, *self.fixed.shape[-3:])
        return MetaTensor(data.round().to(label.dtype), affine=self.fixed.affine)


def elastix_register(
    moving: Tensor,
    fixed: Tensor,
    parameter_maps: Sequence[str] = ("affine", "bspline"),
    initialization: str | None = "CenterOfGravity",
    threads: int | None = 1,
    seed: int = 0,
) -> ElastixResult:
    """Registers ``moving`` to ``fixed`` (``MetaTensor`` ``[1, *S]``) with elastix's default parameter maps.

    Args:
        moving, fixed: the atlas and the query images.
        parameter_maps: names of elastix default maps, run in sequence.
        initialization: ``AutomaticTransformInitializationMethod`` of the first map (``"CenterOfGravity"``,
            ``"GeometricalCenter"``), or None for the identity.
        threads: elastix threads (None: its default, all cores).
        seed: elastix ``RandomSeed`` (its sampler is random).

    Raises:
        ImportError: itk-elastix is not installed.
        ValueError: an input is not a ``MetaTensor``.
    """
    itk = _require()
    f_itk, m_itk = _to_itk(fixed), _to_itk(moving)
    params = itk.ParameterObject.New()
    for i, name in enumerate(parameter_maps):
        m = params.GetDefaultParameterMap(name)
        m["RandomSeed"] = [str(int(seed))]
        if i == 0 and initialization:
            m["AutomaticTransformInitialization"] = ["true"]
            m["AutomaticTransformInitializationMethod"] = [initialization]
        params.AddParameterMap(m)
    t0 = time.perf_counter()
    method = itk.ElastixRegistrationMethod.New(f_itk, m_itk)
    method.SetParameterObject(params)
    method.SetLogToConsole(False)
    if threads:
        method.SetNumberOfThreads(int(threads))
    method.UpdateLargestPossibleRegion()
    seconds = time.perf_counter() - t0
    return ElastixResult(method.GetTransformParameterObject(), fixed, seconds, tuple(parameter_maps))
