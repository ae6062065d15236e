"""Body-frame coordinates and side-pooled cross-subject episodes: values computed by hand."""

import pytest
import torch
from monai.data import MetaTensor

from monai_metalearn.data import EpisodeSampler
from monai_metalearn.learners import BodyPositionReference
from monai_metalearn.transforms import BodyCoordinates, BodyFrameError, body_box, body_coordinates


def _scan():
    img = torch.zeros(1, 20, 30, 10)
    img[0, 5:15, 10:20, 2:8] = 1.0
    aff = torch.diag(torch.tensor([2.0, 1.0, 3.0, 1.0]))
    aff[:3, 3] = torch.tensor([10.0, -5.0, 0.0])
    return MetaTensor(img, affine=aff)


def test_body_box_is_the_world_box_of_the_body():
    # voxels 5..14, 10..19, 2..7 -> world x = 10 + 2 i, y = -5 + j, z = 3 k
    assert body_box(_scan()) == [20.0, 5.0, 6.0, 38.0, 14.0, 21.0]


def test_coordinates_map_the_box_to_minus_one_one():
    scan = _scan()
    c = body_coordinates(scan.shape[1:], scan.affine, body_box(scan))
    assert c.shape == (3, 20, 30, 10)
    assert c[0, 5, 0, 0] == pytest.approx(-1.0) and c[0, 14, 0, 0] == pytest.approx(1.0)
    assert c[2, 0, 0, 2] == pytest.approx(-1.0) and c[2, 0, 0, 7] == pytest.approx(1.0)
    out = BodyCoordinates()(scan, body_box(scan))
    assert out.shape[0] == 4 and torch.equal(out[0], scan[0])
    with pytest.raises(BodyFrameError, match="hi > lo"):
        body_coordinates((2, 2, 2), torch.eye(4), [0, 0, 0, 0, 1, 1])
    with pytest.raises(BodyFrameError, match="no affine"):
        BodyCoordinates()(torch.zeros(1, 2, 2, 2), [0, 0, 0, 1, 1, 1])


def test_position_reference_tells_left_from_right():
    def patch(x0):  # coordinate channels of a patch centred at x0 in the body frame
        p = torch.zeros(4, 4, 4, 4)
        p[1] = x0
        return p

    sx = torch.stack([patch(-0.5), patch(-0.6), patch(0.5), patch(0.6)])
    sy = torch.tensor([0, 0, 1, 1])
    pred = BodyPositionReference().adapt(sx, sy)(torch.stack([patch(0.55), patch(-0.4)])).argmax(1)
    assert pred.tolist() == [1, 0]


def test_side_pools_keep_ct_support_and_mr_query():
    labels = ["liver", "spleen"] * 6
    subjects = ["ct1", "ct1", "ct2", "ct2", "ct3", "ct3", "mr1", "mr1", "mr2", "mr2", "mr3", "mr3"]
    s = EpisodeSampler(labels, 2, 2, 1, subjects=subjects, cross_subject=True, seed=0,
                       support_subjects=["ct1", "ct2", "ct3"], query_subjects=["mr1", "mr2", "mr3"])
    for i in range(20):
        ep = s.episode(i)
        assert all(subjects[j].startswith("ct") for j in ep.support)
        assert all(subjects[j].startswith("mr") for j in ep.query)
    with pytest.raises(ValueError, match="cannot give"):
        EpisodeSampler(labels, 2, 4, 1, subjects=subjects, cross_subject=True,
                       support_subjects=["ct1", "ct2", "ct3"], query_subjects=["mr1", "mr2", "mr3"])
    with pytest.raises(ValueError, match="cross_subject=True"):
        EpisodeSampler(labels, 2, 1, 1, subjects=subjects, support_subjects=["ct1"])
