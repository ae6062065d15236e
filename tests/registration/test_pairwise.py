"""Registration on a real CT with known answers: a smooth displacement field, an affine offset, a slab far from
its place; determinism, and CPU / CUDA agreement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from monai_metalearn.registration import (
    body_mask,
    dice_per_label,
    grid_points,
    image_grid,
    normalize_intensity,
    register,
    sample,
)


def _warp_by(image: MetaTensor, transform, mode: str = "linear") -> MetaTensor:
    """``image`` pulled through ``transform`` (world points ``[N, 3]`` -> world points) on its own grid."""
    grid = image_grid(image)
    pts = grid_points(grid).reshape(-1, 3)
    out = sample(image.as_tensor().float(), grid.affine, transform(pts), mode=mode)[0]
    return MetaTensor(out.reshape(image.shape).to(image.dtype), affine=image.affine)


def _body(image: MetaTensor) -> torch.Tensor:
    return body_mask(normalize_intensity(image)[None]).reshape(image.shape[1:])


def _smooth_field(grid, amplitude: float, seed: int = 0) -> torch.Tensor:
    """A smooth random displacement (mm) ``[3, *S]``: 4^3 random control values, cubic upsampling, max norm
    ``amplitude``."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 4, 4, 4, generator=gen, dtype=torch.float32)
    field = F.interpolate(coarse, size=grid.shape, mode="trilinear", align_corners=True)[0]
    return field * (amplitude / float(field.norm(dim=0).max()))


def test_recovers_a_known_smooth_displacement_of_a_real_scan(ct5):
    """fixed(x) = moving(x + u(x)) with u smooth, up to 15 mm (3 voxels): the deformable stage alone must find u
    within one voxel (5 mm) on average inside the body, and much better than the identity."""
    moving = ct5["image"]
    grid = image_grid(moving)
    u_true = _smooth_field(grid, amplitude=15.0)

    def truth(pts):
        return pts + u_true.reshape(3, -1).T

    fixed = _warp_by(moving, truth)
    result = register(moving, fixed, stages=("deformable",), spacing=5.0, levels=(2, 1), iterations=(60, 60))
    pts = grid_points(grid).reshape(-1, 3)
    u_est = result.transform_points(pts) - pts
    body = _body(fixed).reshape(-1)
    epe = (u_est - u_true.reshape(3, -1).T).norm(dim=1)[body]
    identity = u_true.reshape(3, -1).T.norm(dim=1)[body]
    assert float(epe.mean()) < 5.0 * 0.5, float(epe.mean())  # half a voxel
    assert float(epe.mean()) < 0.3 * float(identity.mean()), (float(epe.mean()), float(identity.mean()))
    assert result.field is not None and result.losses["deformable"][-1][-1] < result.losses["deformable"][0][0]
    jac = result.jacobian_determinant()
    assert float((jac <= 0).float().mean()) < 0.001  # no folding to speak of


def _affine_truth(grid):
    th = math.radians(6.0)
    rot = torch.tensor([[math.cos(th), -math.sin(th), 0.0], [math.sin(th), math.cos(th), 0.0], [0.0, 0.0, 1.0]],
                       dtype=torch.float64) * 1.06
    c = grid.centre()
    t = torch.eye(4, dtype=torch.float64)
    t[:3, :3] = rot
    t[:3, 3] = c - rot @ c + torch.tensor([12.0, -9.0, 15.0], dtype=torch.float64)
    return t


def test_undoes_an_affine_offset_of_a_real_scan(ct4):
    """Translation (12, -9, 15) mm, 6 degrees about the body axis, scale 1.06: the initial + affine stages bring
    body points back within a voxel (4 mm) and the carried liver, spleen and kidneys overlap the truth (Dice > 0.9)."""
    moving, label = ct4["image"], ct4["label"]
    grid = image_grid(moving)
    t_true = _affine_truth(grid)

    def truth(pts):
        m = t_true.float()
        return pts @ m[:3, :3].T + m[:3, 3]

    fixed, fixed_label = _warp_by(moving, truth), _warp_by(label, truth, mode="nearest")
    result = register(moving, fixed, stages=("initial", "affine"))
    pts = grid_points(grid).reshape(-1, 3)[_body(fixed).reshape(-1)]
    err = (result.transform_points(pts) - truth(pts)).norm(dim=1)
    before = (pts - truth(pts)).norm(dim=1)
    assert float(err.mean()) < 4.0 and float(before.mean()) > 15.0, (float(err.mean()), float(before.mean()))
    dice = dice_per_label(result.warp_label(label), fixed_label, [1, 2, 3, 6])
    assert min(dice.values()) > 0.9, dice
    assert set(result.timings) >= {"initial", "affine", "total"}


def test_initial_alignment_finds_a_slab_far_from_its_place(ct4):
    """A 40 mm slab through the kidneys, stored 180 mm higher and 25 mm to the side (a scan of another field of view
    and origin): the search along the body axis puts it back within one search step; the centres of gravity of
    the body masks (the usual toolkit default) do not."""
    image, label = ct4["image"], ct4["label"]
    z = torch.nonzero(label[0] == 3)[:, 2].float().mean().round().int().item()  # left kidney
    slab = image[..., z - 5:z + 5]  # 10 slices of 4 mm
    offset = torch.tensor([25.0, 0.0, 180.0], dtype=torch.float64)
    aff = image.affine.clone().double()
    aff[:3, 3] = aff[:3, :3] @ torch.tensor([0.0, 0.0, float(z - 5)], dtype=torch.float64) + aff[:3, 3] + offset
    moving = MetaTensor(slab.as_tensor().clone(), affine=aff)
    # moving point = fixed point + offset
    found = register(moving, image, stages=("initial",), initial_spacing=4.0)
    assert found.initial["method"] == "search"
    err = (found.affine[:3, 3] - offset).abs()
    assert float(err[2]) <= 4.0 and float(err[:2].max()) <= 8.0, found.affine
    assert torch.allclose(found.affine[:3, :3], torch.eye(3, dtype=torch.float64), atol=0.1)
    naive = register(moving, image, stages=("initial",), initial="centroid", initial_spacing=4.0)
    assert float((naive.affine[:3, 3] - offset).abs()[2]) > 40.0


def _small_run(image, device):
    aff = image.affine.clone().double()
    aff[2, 3] += 8.0
    shifted = MetaTensor(image.as_tensor().clone(), affine=aff)  # the same scan 8 mm off
    return register(image.to(device), shifted.to(device), stages=("initial", "affine", "deformable"), spacing=8.0,
                    levels=(2, 1), iterations=(10, 10), affine_levels=(2, 1), affine_iterations=(10, 10),
                    initial_spacing=16.0, seed=3)


def test_cpu_runs_are_deterministic(ct5):
    a, b = _small_run(ct5["image"], "cpu"), _small_run(ct5["image"], "cpu")
    assert torch.equal(a.affine, b.affine) and torch.equal(a.field, b.field)
    assert a.losses == b.losses
    assert not torch.allclose(a.affine, torch.eye(4, dtype=torch.float64))  # it did move


@pytest.mark.gpu
def test_cuda_agrees_with_cpu(ct5):
    cpu, gpu = _small_run(ct5["image"], "cpu"), _small_run(ct5["image"], "cuda")
    assert gpu.field.device.type == "cuda"
    pts = grid_points(image_grid(ct5["image"])).reshape(-1, 3)
    diff = (cpu.transform_points(pts) - gpu.transform_points(pts.cuda()).cpu()).norm(dim=1)
    assert float(diff.mean()) < 0.5 and float(diff.max()) < 3.0, (float(diff.mean()), float(diff.max()))
    label = ct5["label"]
    dice = dice_per_label(cpu.warp_label(label), gpu.warp_label(label.cuda()).cpu(), [1, 2, 3, 6])
    assert min(dice.values()) > 0.95, dice
