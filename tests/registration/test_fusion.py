"""Label fusion: identity on identical atlases, the tie rule, STAPLE's estimates, locally weighted voting."""

from __future__ import annotations

import pytest
import torch

from monai_metalearn.registration import dice_per_label, majority_vote, normalize_intensity, staple, weighted_vote


def test_identical_atlases_give_the_atlas(ct5):
    label, image = ct5["label"], ct5["image"]
    assert torch.equal(majority_vote([label] * 3).as_tensor(), label.as_tensor())
    fused = weighted_vote([label] * 3, [image] * 3, image)
    assert torch.equal(fused.as_tensor(), label.as_tensor())
    liver = (label == 6).to(torch.uint8)
    mask, prob, sens, spec = staple([liver] * 4)
    assert torch.equal(mask.as_tensor(), liver.as_tensor())
    assert torch.allclose(sens, torch.ones(4), atol=1e-4) and torch.allclose(spec, torch.ones(4), atol=1e-4)
    assert torch.allclose(majority_vote([label]).affine, label.affine)


def test_majority_vote_ties_go_to_the_lowest_label():
    a = torch.tensor([[1, 1, 2, 0, 3]])
    b = torch.tensor([[0, 2, 1, 0, 3]])
    c = torch.tensor([[1, 0, 2, 2, 0]])
    # voxel 0: 1,0,1 -> 1 (majority); 1: 1,2,0 -> three-way tie -> 0; 2: 2,1,2 -> 2; 3: 0,0,2 -> 0; 4: 3,3,0 -> 3
    assert majority_vote([a, b, c]).tolist() == [[1, 0, 2, 0, 3]]
    # two atlases that disagree: background wins against a structure, structure 1 against structure 2
    assert majority_vote([torch.tensor([1, 2]), torch.tensor([0, 1])]).tolist() == [0, 1]
    assert majority_vote(torch.stack([a, b, c])).dtype == a.dtype


def test_staple_on_a_hand_made_example():
    truth = torch.tensor([1] * 5 + [0] * 5)
    good = truth.clone()
    noisy = truth.clone()
    noisy[0], noisy[9] = 0, 1  # one miss, one false alarm
    mask, prob, sens, spec = staple([good, good, noisy])
    assert torch.equal(mask, truth)
    # the two good raters: sensitivity = specificity = 1; the noisy one: 4/5 and 4/5
    assert torch.allclose(sens, torch.tensor([1.0, 1.0, 0.8]), atol=1e-3)
    assert torch.allclose(spec, torch.tensor([1.0, 1.0, 0.8]), atol=1e-3)


def test_staple_trusts_the_reliable_raters_where_a_majority_is_wrong():
    gen = torch.Generator().manual_seed(0)
    truth = torch.tensor([1] * 50 + [0] * 50)
    raters = [truth.clone(), truth.clone()]
    for _ in range(3):
        flip = torch.rand(100, generator=gen) < 0.3
        raters.append(torch.where(flip, 1 - truth, truth))
    for r in raters[2:]:
        r[7] = 0  # the three noisy raters agree on a miss at voxel 7
    vote = majority_vote(raters)
    assert int(vote[7]) == 0  # the majority is wrong there
    mask, prob, sens, spec = staple(raters)
    assert torch.equal(mask, truth)
    assert float(sens[:2].min()) > 0.99 and float(sens[2:].max()) < 0.9


@pytest.mark.parametrize("method", ["ncc", "ssd"])
def test_weighted_vote_prefers_the_atlas_that_matches_the_target(ct5, method):
    image = normalize_intensity(ct5["image"])
    label = ct5["label"]
    # atlas 1: the target itself; atlas 2: image and labels three voxels off (a poor registration)
    off_image = torch.roll(image, shifts=3, dims=1)
    off_label = torch.roll(label.as_tensor(), shifts=3, dims=1)
    labels = [label.as_tensor(), off_label]
    fused, weights = weighted_vote(labels, [image, off_image], image, method=method, return_weights=True)
    body = image > 0.1
    assert float(weights[0][body].mean()) > float(weights[1][body].mean())
    ids = [1, 2, 3, 6]
    weighted = dice_per_label(fused, label, ids)
    voted = dice_per_label(majority_vote(labels), label, ids)
    for i in ids:
        assert weighted[i] > 0.95, (i, weighted[i])
        assert weighted[i] > voted[i] + 0.02, (i, weighted[i], voted[i])


def test_fusion_errors():
    with pytest.raises(ValueError, match="at least one"):
        majority_vote([])
    with pytest.raises(ValueError, match="one shape"):
        majority_vote([torch.zeros(3), torch.zeros(4)])
