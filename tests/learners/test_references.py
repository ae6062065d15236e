"""The trivial references on a fixed real episode (BTCV subject 0 -> subject 5, liver), against values computed here by
hand with numpy / scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from monai_metalearn.data import load_datalist, scan_reader
from monai_metalearn.learners import BoxAlignedReference, WholeBodyReference
from monai_metalearn.metrics import binary_dice
from monai_metalearn.transforms import scale_intensity


@pytest.fixture(scope="module")
def pair(data_dir):
    items = {i["subject"]: i for i in load_datalist("btcv_sabs", data_dir)}
    out = []
    for sub in ("btcv_sabs_00", "btcv_sabs_05"):
        d = scan_reader(["image", "label"], (4.0, 4.0, 4.0))({k: items[sub][k] for k in ("image", "label")})
        out.append((scale_intensity(d["image"].as_tensor(), items[sub]["intensity"]),
                    (d["label"].as_tensor() == items[sub]["structures"]["liver"]).float()))
    return out


def _hand_body(image: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(image > 0.1)
    body = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    body = ndimage.binary_fill_holes(body)
    for k in range(body.shape[-1]):
        body[..., k] = ndimage.binary_fill_holes(body[..., k])
    return body


def _hand_dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_whole_body_reference_is_the_hand_made_body_mask(pair):
    (xs, ms), (xq, mq) = pair
    logits = WholeBodyReference().adapt(xs[None], ms[None])(xq[None])
    pred = logits.argmax(1)[0].numpy().astype(bool)
    body = _hand_body(xq[0].numpy())
    assert np.array_equal(pred, body)
    dice = float(binary_dice(torch.from_numpy(pred)[None], mq.bool()))
    assert dice == pytest.approx(_hand_dice(body, mq[0].numpy() > 0), abs=1e-6)
    assert 0.05 < dice < 0.5  # the body is much larger than the liver


def test_box_aligned_reference_is_the_hand_made_box_mapping(pair):
    (xs, ms), (xq, mq) = pair
    pred = BoxAlignedReference().adapt(xs[None], ms[None])(xq[None]).argmax(1)[0].numpy().astype(bool)
    bs, bq = _hand_body(xs[0].numpy()), _hand_body(xq[0].numpy())
    coords = []
    for a in range(3):
        other = tuple(i for i in range(3) if i != a)
        s_idx, q_idx = np.nonzero(bs.any(axis=other))[0], np.nonzero(bq.any(axis=other))[0]
        s_lo, s_hi, q_lo, q_hi = s_idx[0], s_idx[-1] + 1, q_idx[0], q_idx[-1] + 1
        q = np.arange(xq.shape[1 + a], dtype=np.float64)
        coords.append(s_lo + (q + 0.5 - q_lo) * (s_hi - s_lo) / (q_hi - q_lo) - 0.5)
    grid = np.meshgrid(*coords, indexing="ij")
    placed = ndimage.map_coordinates(ms[0].numpy().astype(np.float64), grid, order=1, mode="constant", cval=0.0)
    hand = placed > 0.5
    # the same mapping up to voxels within float error of the 0.5 threshold
    assert (pred != hand).sum() <= 0.001 * hand.sum()
    dice = _hand_dice(pred, mq[0].numpy() > 0)
    assert dice == pytest.approx(_hand_dice(hand, mq[0].numpy() > 0), abs=2e-3)
    # placing the liver by the boxes beats the whole body as a liver mask on this pair
    assert dice > _hand_dice(bq, mq[0].numpy() > 0) + 0.1


def test_box_aligned_reference_of_a_scan_to_itself_is_its_mask(pair):
    (xs, ms), _ = pair
    pred = BoxAlignedReference().adapt([xs], [ms])(xs[None]).argmax(1, keepdim=True)[0]
    assert torch.equal(pred.bool(), ms.bool())


def test_references_reject_empty_support_and_have_nothing_to_train(pair):
    (xs, ms), _ = pair
    ref = BoxAlignedReference()
    with pytest.raises(ValueError, match="support mask is empty"):
        ref.adapt(xs[None], torch.zeros_like(ms)[None])
    assert not ref.trainable and ref.whole_volume and list(ref.parameters()) == []
    assert np.isnan(ref.outer_step(xs[None], ms[None], xs[None], ms[None])["loss"])
