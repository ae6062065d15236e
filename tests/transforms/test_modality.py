"""Modality augmentation: the sign flip by seed, z-scored output, coordinate channels untouched, on a real CT patch."""

import torch

from monai_metalearn.data import build_structure_patches, load_datalist, patch_transforms
from monai_metalearn.transforms import RandInvertIntensity, RandInvertIntensityd, modality_augmentation


def test_invert_flips_with_its_probability_and_seed():
    x = torch.arange(8.0).reshape(1, 2, 2, 2)
    assert torch.equal(RandInvertIntensity(prob=1.0)(x), -x)
    assert torch.equal(RandInvertIntensity(prob=0.0)(x), x)
    flips = []
    t = RandInvertIntensityd(keys=["a", "b"], prob=0.5).set_random_state(3)
    for _ in range(200):
        out = t({"a": x, "b": 2 * x})
        assert torch.equal(out["b"], 2 * out["a"])  # one draw for every key
        flips.append(bool(out["a"][0, 1, 1, 1] < 0))
    assert 70 < sum(flips) < 130
    again = RandInvertIntensityd(keys="a", prob=0.5).set_random_state(3)
    assert [bool(again({"a": x})["a"][0, 1, 1, 1] < 0) for _ in range(200)] == flips


def test_augmented_patches_stay_z_scored_and_keep_their_coordinates(data_dir):
    item = load_datalist("btcv_sabs", str(data_dir))[0]
    patches = build_structure_patches([item], ["spleen"], pixdim=(4.0, 4.0, 4.0), progress=False)
    plain = patch_transforms((16, 16, 16), body_coordinates=True, augment=False)
    aug = patch_transforms((16, 16, 16), body_coordinates=True, augment=False, modality_augment=True)
    ref = plain(dict(patches[0]))["image"]
    corr = []
    for seed in range(12):
        aug.set_random_state(seed)
        out = aug(dict(patches[0]))["image"]
        assert out.shape == (4, 16, 16, 16)
        assert abs(float(out[0].mean())) < 1e-4 and abs(float(out[0].std()) - 1) < 0.02
        assert torch.allclose(out[1:], ref[1:])  # where the patch lies in the body is not augmented
        corr.append(float(torch.corrcoef(torch.stack([out[0].flatten(), ref[0].flatten()]))[0, 1]))
    assert min(corr) < -0.5 and max(corr) > 0.5  # some patches inverted, some not
    assert len({round(c, 3) for c in corr}) > 6  # a different remap per seed
    assert modality_augmentation(prob=0.0, invert_prob=0.0)({"image": ref[:1]})["image"].allclose(ref[:1], atol=1e-4)
