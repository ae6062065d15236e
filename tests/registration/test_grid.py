"""Physical space: grids, world-space resampling, the identity, and typed errors on bad inputs."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from monai_metalearn.registration import RegistrationResult, image_grid, register, working_grid
from monai_metalearn.registration.grid import grid_points, resample


def test_working_grid_keeps_the_field_of_view(ct_native):
    grid = image_grid(ct_native["image"])
    coarse = working_grid(grid, 6.0)
    assert torch.allclose(coarse.spacing, torch.full((3,), 6.0, dtype=torch.float64))

    def box(g):  # world box of the voxel edges
        lo = g.affine[:3, :3] @ torch.full((3,), -0.5, dtype=torch.float64) + g.affine[:3, 3]
        hi = g.affine[:3, :3] @ (torch.tensor(g.shape, dtype=torch.float64) - 0.5) + g.affine[:3, 3]
        return torch.minimum(lo, hi), torch.maximum(lo, hi)

    (lo0, hi0), (lo1, hi1) = box(grid), box(coarse)
    # the box is kept to within half a coarse voxel (rounding of the voxel count)
    assert torch.all((lo0 - lo1).abs() <= 3.0 + 1e-6) and torch.all((hi0 - hi1).abs() <= 3.0 + 1e-6)
    assert torch.allclose((lo0 + hi0) / 2, (lo1 + hi1) / 2, atol=1e-6)


def test_identity_carries_a_mask_onto_itself_exactly(ct5):
    image, label = ct5["image"], ct5["label"]
    result = register(image, image, stages=())
    assert torch.equal(result.affine, torch.eye(4, dtype=torch.float64)) and result.field is None
    carried = result.warp_label(label)
    assert isinstance(carried, MetaTensor) and torch.allclose(carried.affine.double(), label.affine.double())
    assert carried.dtype == label.dtype and torch.equal(carried.as_tensor(), label.as_tensor())
    liver = (label == 6).float()
    assert torch.equal(result.warp_label(label, mode="linear").as_tensor(), label.as_tensor())
    soft = result.warp_soft(liver)
    assert float((soft - liver).abs().max()) < 1e-4
    assert torch.equal((soft > 0.5).as_tensor(), (liver > 0.5).as_tensor())


def test_identity_in_world_space_across_orientations(ct5):
    """The same scan stored LPS instead of RAS: the identity in world space must map label onto label exactly,
    although the voxel arrays are flipped (so an index-space warp would be wrong)."""
    from monai.transforms import Orientation

    label = ct5["label"]
    lps = Orientation(axcodes="LPS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(label)
    assert not torch.equal(lps.as_tensor(), label.as_tensor())
    result = RegistrationResult(fixed_grid=image_grid(lps), affine=torch.eye(4, dtype=torch.float64))
    assert torch.equal(result.warp_label(label).as_tensor(), lps.as_tensor())
    # and a translation by exactly one voxel along world S moves the liver by one slice
    shift = torch.eye(4, dtype=torch.float64)
    shift[2, 3] = 5.0  # the moving point is 5 mm superior of the fixed point
    moved = RegistrationResult(fixed_grid=image_grid(label), affine=shift).warp_label(label)
    assert torch.equal(moved[..., :-1].as_tensor(), label[..., 1:].as_tensor())


def test_resample_by_identity_is_exact_on_the_same_grid(ct5):
    image = ct5["image"]
    out = resample(image.as_tensor(), image.affine, image_grid(image), mode="nearest")
    assert torch.equal(out[0], image.as_tensor())
    pts = grid_points(image_grid(image))
    assert pts.shape == (*image.shape[1:], 3)


def test_typed_errors(ct5):
    image = ct5["image"]
    with pytest.raises(ValueError, match="3D"):
        register(image[:, :, :, 0], image)  # a 2D slice
    with pytest.raises(ValueError, match="affine"):
        register(image.as_tensor(), image)  # a plain tensor has no affine
    with pytest.raises(ValueError, match="moving_mask"):
        register(image, image, moving_mask=torch.ones(1, 4, 4, 4))
    with pytest.raises(ValueError, match="similarity"):
        register(image, image, similarity="cosine")
    with pytest.raises(ValueError, match="stages"):
        register(image, image, stages=("rigid",))
    with pytest.raises(TypeError, match="unknown settings"):
        register(image, image, iteration=3)
    with pytest.raises(ValueError, match="one channel"):
        register(torch.cat([image, image]), image)
