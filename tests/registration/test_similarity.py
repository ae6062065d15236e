"""Similarities on a real CT: MIND-SSC is invariant to monotone intensity remaps, NCC is not; masks restrict losses."""

from __future__ import annotations

import pytest
import torch

from monai_metalearn.registration import Similarity, mind_ssc, normalize_intensity


@pytest.fixture(scope="module")
def ct(ct5):
    return normalize_intensity(ct5["image"])[None]  # [1, 1, *S] in [0, 1]


def test_normalize_intensity_uses_percentiles_not_hounsfield(ct5):
    x = normalize_intensity(ct5["image"])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # an 8-bit display-windowed scan and the same scan in pseudo-HU (x * 4 - 1000) normalise alike
    assert torch.allclose(normalize_intensity(ct5["image"] * 4.0 - 1000.0), x, atol=1e-5)


def test_mind_is_invariant_to_monotone_remaps_and_ncc_is_not(ct):
    sim_mind, sim_ncc = Similarity("mind"), Similarity("ncc")
    shifted = torch.roll(ct, shifts=1, dims=2)  # the same anatomy one voxel off: a small real misalignment
    m, m_shift = sim_mind.features(ct), sim_mind.features(shifted)
    assert m.shape == (1, 12, *ct.shape[2:]) and float(m.min()) > 0 and float(m.max()) <= 1.0
    misaligned = float(sim_mind(m_shift, m))
    for remap in (1.0 - ct, ct**0.8, ct**1.25):  # mild monotone remaps: an order of magnitude below one voxel
        loss = float(sim_mind(sim_mind.features(remap), m))
        assert loss < 0.1 * misaligned, (loss, misaligned)
    for remap in (ct**0.5, torch.sigmoid(8 * (ct - 0.5))):  # strong ones: still below one voxel
        loss = float(sim_mind(sim_mind.features(remap), m))
        assert loss < 0.5 * misaligned, (loss, misaligned)
    # the negation is exactly invariant (MIND depends on squared differences only)
    assert torch.allclose(mind_ssc(1.0 - ct), m, atol=1e-5)
    # NCC: the negated image scores worst (+1), worse than the misaligned one, not like the identity (-1)
    assert float(sim_ncc(ct, ct)) == pytest.approx(-1.0, abs=1e-5)
    assert float(sim_ncc(1.0 - ct, ct)) == pytest.approx(1.0, abs=1e-5)
    assert float(sim_ncc(1.0 - ct, ct)) > float(sim_ncc(shifted, ct))


@pytest.mark.parametrize("name", ["ncc", "lncc", "mind", "mi"])
def test_masked_losses_ignore_voxels_outside_the_mask(ct, name):
    sim = Similarity(name)
    mask = torch.zeros_like(ct)
    mask[..., 4:-4, 4:-4, 10:30] = 1
    corrupted = ct.clone()
    corrupted[..., 40:] = 0.5
    f, g = sim.features(ct), sim.features(corrupted)
    # LNCC and MIND look at a neighbourhood: the corruption is kept well away from the mask
    inside = abs(float(sim(g, f, mask)) - float(sim(f, f, mask)))
    everywhere = float(sim(g, f)) - float(sim(f, f))
    assert everywhere > 1e-3  # unmasked, the corruption is seen
    # MIND's variance floor is relative to the image mean, so a corruption elsewhere moves it a little
    assert inside < (0.01 * everywhere if name == "mind" else 1e-5), (inside, everywhere)


def test_unknown_similarity_is_a_value_error():
    with pytest.raises(ValueError, match="similarity"):
        Similarity("ssd")
