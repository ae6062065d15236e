"""Confidence intervals, Dice, summaries and the episode metrics, against hand computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from ignite.engine import Engine, Events

from monai_metalearn.metrics import EpisodeAccuracy, EpisodeDice, binary_dice, mean_ci95, summarize


def test_mean_ci95_t_for_small_samples():
    values = [0.5, 0.7, 0.9, 0.6, 0.8]
    mean, half = mean_ci95(values)
    # mean 0.7; squared deviations 0.04 + 0 + 0.04 + 0.01 + 0.01 = 0.1; sample variance 0.1 / 4 = 0.025
    # t(0.975, dof=4) = 2.7764451051977987
    assert mean == pytest.approx(0.7)
    assert half == pytest.approx(2.7764451051977987 * math.sqrt(0.025) / math.sqrt(5), rel=1e-9)
    assert mean_ci95(values, method="normal")[1] == pytest.approx(1.96 * math.sqrt(0.025) / math.sqrt(5))
    assert mean_ci95(torch.tensor(values))[1] == pytest.approx(half, rel=1e-6)


def test_mean_ci95_normal_from_30():
    values = [0.0, 1.0] * 20  # n = 40, mean 0.5, sample variance 40 * 0.25 / 39
    mean, half = mean_ci95(values)
    assert mean == 0.5
    assert half == pytest.approx(1.96 * math.sqrt(10 / 39) / math.sqrt(40), rel=1e-12)
    assert mean_ci95(values, method="t")[1] > half


def test_mean_ci95_degenerate():
    mean, half = mean_ci95([0.25])
    assert mean == 0.25 and math.isnan(half)
    assert all(math.isnan(v) for v in mean_ci95([]))
    assert mean_ci95([0.5, 0.5, 0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_ci95([1.0, 2.0], method="bootstrap")


def test_binary_dice():
    pred = torch.zeros(3, 1, 2, 2, 2)
    target = torch.zeros(3, 1, 2, 2, 2)
    pred[0, 0, 0, 0, :] = 1  # 2 voxels
    target[0, 0, 0, :, 0] = 1  # 2 voxels, 1 shared -> 2 * 1 / 4
    pred[1, 0, 1] = 1
    target[1, 0, 1] = 1  # identical -> 1
    # sample 2: both empty -> empty_score
    per_sample = binary_dice(pred, target, reduction="none")
    assert per_sample.tolist() == pytest.approx([0.5, 1.0, 1.0])
    assert float(binary_dice(pred, target)) == pytest.approx(2.5 / 3)
    assert binary_dice(pred, target, reduction="none", empty_score=0.0)[2] == 0.0
    with pytest.raises(ValueError):
        binary_dice(pred, target[:2])


def test_summarize_structure_is_json():
    out = summarize([0.5, 0.7, 0.9, 0.6, 0.8], per_class={"liver": [0.5, 1.0], "kidney": [0.25]})
    assert set(out) == {"accuracy", "per_class"}
    assert out["accuracy"]["mean"] == pytest.approx(0.7)
    assert out["accuracy"]["ci95"] == pytest.approx(mean_ci95([0.5, 0.7, 0.9, 0.6, 0.8])[1])
    assert out["accuracy"]["n_episodes"] == 5
    assert out["per_class"]["liver"] == {"mean": 0.75, "ci95": pytest.approx(12.706204736 * 0.5 / 2, rel=1e-6), "n": 2}
    assert out["per_class"]["kidney"] == {"mean": 0.25, "ci95": None, "n": 1}  # undefined CI -> null in JSON
    json.loads(json.dumps(out, allow_nan=False))
    seg = summarize([0.8], name="dice", group_key="per_structure", per_class={"liver": [0.8]})
    assert set(seg) == {"dice", "per_structure"}


def _run_metric(metric, outputs, name):
    engine = Engine(lambda e, b: b)
    metric.attach(engine, name)
    engine.run(outputs, max_epochs=1)
    return engine.state.metrics


def test_episode_accuracy_metric_forms():
    outputs = [
        [{"accuracy": 0.5, "loss": 1.0}, {"accuracy": 0.7, "loss": 1.0}],  # a list of per-episode dicts
        {"accuracy": 0.9},  # one dict
        0.6,  # a number
        (torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [1.0, 2.0], [0.0, 1.0]]), torch.tensor([0, 1, 0, 0, 0])),
    ]  # logits/labels pair: 3 of 5 right = 0.6 ... plus 0.8 below
    outputs.append((torch.tensor([1, 1, 0, 0, 1]), torch.tensor([1, 1, 0, 0, 0])))  # label pair: 0.8
    metrics = _run_metric(EpisodeAccuracy(), outputs, "acc")
    values = [0.5, 0.7, 0.9, 0.6, 0.6, 0.8]
    assert metrics["acc"] == pytest.approx(sum(values) / 6)
    assert metrics["acc_ci95"] == pytest.approx(mean_ci95(values)[1])
    assert metrics["n_episodes"] == 6


def test_episode_accuracy_resets_between_runs():
    metric = EpisodeAccuracy()
    engine = Engine(lambda e, b: b)
    metric.attach(engine, "accuracy")
    engine.run([{"accuracy": 1.0}], max_epochs=1)
    engine.run([{"accuracy": 0.0}, {"accuracy": 0.5}], max_epochs=1)
    assert engine.state.metrics["accuracy"] == 0.25
    assert engine.state.metrics["n_episodes"] == 2


def test_episode_dice_metric():
    pred = torch.zeros(2, 1, 2, 2, 2)
    target = torch.zeros(2, 1, 2, 2, 2)
    pred[0, 0, 0] = 1
    target[0, 0, 0] = 1  # 1.0
    pred[1, 0, 0, 0, 0] = 1
    target[1, 0, 1, 0, 0] = 1  # 0.0 -> episode 0.5
    metrics = _run_metric(EpisodeDice(), [(pred, target), [{"dice": 0.9}]], "dice")
    assert metrics["dice"] == pytest.approx(0.7)
    assert metrics["n_episodes"] == 2


def test_metric_on_event_values_property():
    metric = EpisodeAccuracy()
    engine = Engine(lambda e, b: b)
    metric.attach(engine, "accuracy")
    seen = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(metric.values))
    engine.run([0.25, 0.75], max_epochs=1)
    assert seen == [[0.25, 0.75]]


def test_slab_dice_scores_only_the_slices_holding_the_structure():
    from monai_metalearn.metrics import slab_dice

    target = torch.zeros(1, 1, 8, 8, 10)
    target[..., 2:6, 2:6, 4:6] = 1  # 32 voxels on slices 4-5
    far = target.clone()
    far[..., 0:2, 0:2, 8:10] = 1  # 8 false positives on slices 8-9: outside the slab
    assert float(binary_dice(far, target)) == pytest.approx(64 / 72)
    assert float(slab_dice(far, target)) == 1.0
    near = target.clone()
    near[..., 6:8, 6:8, 4:6] = 1  # 8 false positives on slices 4-5: inside the slab, counted
    assert float(slab_dice(near, target)) == pytest.approx(64 / 72)
    assert float(slab_dice(target[..., :3], target[..., :3])) == 1.0  # no reference voxel: empty vs empty
