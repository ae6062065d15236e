"""MetaEvaluator: accuracy after training, CI, per-class scores, gradients during adaptation, untouched weights."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from ignite.engine import Events

from monai_metalearn.engines import MetaEvaluator, MetaTrainer
from monai_metalearn.metrics import EpisodeAccuracy, mean_ci95
from tests.engines.fakes import (
    EpisodeList,
    InPlaceFineTuner,
    OracleLearner,
    ThresholdSegLearner,
    TinyMAML,
    TinyProtoNet,
    make_episode,
)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    now = module.state_dict()
    assert saved.keys() == now.keys()
    for k in saved:
        assert torch.equal(saved[k], now[k]), k


def test_accuracy_above_chance_after_training():
    torch.manual_seed(0)
    learner = TinyProtoNet()
    evaluator = MetaEvaluator("cpu", EpisodeList(32, seed=99), learner)
    trainer = MetaTrainer("cpu", 2, EpisodeList(20, seed=1), learner, torch.optim.Adam(learner.parameters(), 1e-2))
    evaluator.run()
    before = evaluator.state.metrics["accuracy"]
    trainer.run()
    evaluator.run()
    m = evaluator.state.metrics
    assert m["n_episodes"] == 32
    assert m["accuracy"] > 0.55 > 1 / 3  # 3-way: chance is 1/3
    assert m["accuracy"] > before + 0.1
    # n >= 30: the CI is 1.96 * sample std / sqrt(n) of the per-episode accuracies
    values = evaluator.state.episode_values
    assert len(values) == 32 and statistics.mean(values) == pytest.approx(m["accuracy"])
    assert m["accuracy_ci95"] == pytest.approx(1.96 * statistics.stdev(values) / math.sqrt(32))
    assert evaluator.state.summary["accuracy"]["ci95"] == pytest.approx(m["accuracy_ci95"])
    assert evaluator.state.best_metric == pytest.approx(m["accuracy"])


def test_per_class_accuracy_on_handcrafted_episodes():
    predictions = torch.tensor([0, 1, 1, 1, 0, 2])
    ep0 = make_episode(0, n_way=3, k_shot=1, q_query=2)  # query labels [0, 0, 1, 1, 2, 2]
    ep0["classes"] = ["liver", "spleen", "kidney"]
    ep1 = make_episode(1, n_way=3, k_shot=1, q_query=2)
    ep1["classes"] = ["spleen", "liver", "pancreas"]
    assert ep0["query_label"].tolist() == [0, 0, 1, 1, 2, 2]
    evaluator = MetaEvaluator("cpu", [ep0, ep1], OracleLearner(predictions, n_way=3))
    evaluator.run()
    m = evaluator.state.metrics
    assert m["accuracy"] == pytest.approx(4 / 6) and m["n_episodes"] == 2
    assert m["accuracy_ci95"] == 0.0  # both episodes 4/6
    # ep0: liver 1/2, spleen 2/2, kidney 1/2; ep1: spleen 1/2, liver 2/2, pancreas 1/2
    assert evaluator.state.per_class == {"kidney": 0.5, "liver": 0.75, "pancreas": 0.5, "spleen": 0.75}
    assert evaluator.state.per_class_counts["liver"] == {"correct": 3, "total": 4}
    assert evaluator.state.per_class_counts["kidney"] == {"correct": 1, "total": 2}
    summary = evaluator.state.summary
    assert summary["per_class"]["liver"] == {"mean": 0.75, "ci95": pytest.approx(mean_ci95([0.5, 1.0])[1]), "n": 2}
    assert summary["per_class"]["kidney"]["ci95"] is None
    out = evaluator.state.output
    assert out[0]["accuracy"] == pytest.approx(4 / 6) and out[0]["episode"] == 1


def test_meta_batch_of_episodes_counts_every_episode():
    predictions = torch.tensor([0, 0, 1, 1, 2, 2])  # all right
    loader = EpisodeList(3, meta_batch_size=2, k_shot=1, q_query=2)
    evaluator = MetaEvaluator("cpu", loader, OracleLearner(predictions, n_way=3))
    evaluator.run()
    assert evaluator.state.metrics["n_episodes"] == 6 and evaluator.state.metrics["accuracy"] == 1.0
    assert len(evaluator.state.output) == 2


def test_segmentation_dice_per_structure():
    def seg_episode(images, masks, structure, index):
        x = torch.stack(images)[:, None]
        y = torch.stack(masks)[:, None]
        return {
            "support_image": x[:1],
            "support_label": y[:1],
            "query_image": x,
            "query_label": y,
            "structure": structure,
            "support_subject": ["a"],
            "query_subject": [f"q{i}" for i in range(len(x))],
            "episode": index,
        }

    z = torch.zeros(2, 2, 2)
    m0 = z.clone()
    m0[0] = 1  # 4 voxels; predicted exactly -> 1.0
    m1 = z.clone()
    m1[0, 0] = 1  # voxels (0,0,0), (0,0,1)
    img1 = z.clone()
    img1[0, 0, 0] = img1[1, 1, 1] = 1  # predicts (0,0,0), (1,1,1): 1 shared of 2 + 2 -> 0.5
    img_one = z.clone()
    img_one[1, 0, 0] = 1  # predicts one voxel where the mask is empty -> 0.0
    ep_liver = seg_episode([m0, img1], [m0, m1], "liver", 0)  # dice (1.0 + 0.5) / 2
    ep_kidney = seg_episode([z, img_one], [z, z], "kidney", 1)  # both empty -> 1.0; then 0.0 -> 0.5
    evaluator = MetaEvaluator("cpu", [ep_liver, ep_kidney], ThresholdSegLearner(0.5), task="segmentation")
    evaluator.run()
    m = evaluator.state.metrics
    assert m["dice"] == pytest.approx(0.625) and m["n_episodes"] == 2
    assert m["dice_ci95"] == pytest.approx(mean_ci95([0.75, 0.5])[1])
    assert evaluator.state.per_class == {"kidney": 0.5, "liver": 0.75}
    assert set(evaluator.state.summary) == {"dice", "per_structure"}
    assert evaluator.state.output[0]["dice"] == 0.5


def test_segmentation_mask_postprocess_is_scored_and_raw_dice_kept():
    """The prediction is the organ plus a stray voxel far from it: post-processing that removes the stray voxel
    scores 1.0, and the record keeps the Dice before it."""
    mask = torch.zeros(1, 1, 6, 6, 6)
    mask[0, 0, :2, :2, :2] = 1  # 8 voxels
    image = mask.clone()
    image[0, 0, 5, 5, 5] = 1  # stray voxel: raw Dice 16 / 17
    episode = {"support_image": mask, "support_label": mask, "query_image": image, "query_label": mask,
               "structure": "liver", "episode": 0}

    def drop_stray(pred):
        out = pred.clone()
        out[..., 5, 5, 5] = 0
        return out

    evaluator = MetaEvaluator("cpu", [episode], ThresholdSegLearner(0.5), task="segmentation",
                              mask_postprocess=drop_stray)
    evaluator.run()
    record = evaluator.state.episode_records[0]
    assert record["dice"] == pytest.approx(1.0) and record["dice_raw"] == pytest.approx(16 / 17)
    assert record["pred_voxels"] == 8
    plain = MetaEvaluator("cpu", [episode], ThresholdSegLearner(0.5), task="segmentation")
    plain.run()
    assert plain.state.episode_records[0]["dice"] == pytest.approx(16 / 17)
    assert "dice_raw" not in plain.state.episode_records[0]


def test_maml_adapts_with_gradients_and_leaves_weights_unchanged():
    torch.manual_seed(0)
    learner = TinyMAML()
    learner.train()
    saved = _state(learner)
    with torch.no_grad():  # as if called from a no_grad context: adaptation must still get gradients
        evaluator = MetaEvaluator("cpu", EpisodeList(4, seed=5), learner)
        evaluator.run()
    assert learner.grad_enabled_in_adapt == [True] * 4
    assert 0.0 <= evaluator.state.metrics["accuracy"] <= 1.0
    _assert_same_state(learner, saved)
    assert all(p.grad is None for p in learner.parameters())
    assert learner.training  # previous mode restored


def test_in_place_adaptation_is_undone_after_each_episode():
    torch.manual_seed(0)
    learner = InPlaceFineTuner()
    learner.eval()
    saved = _state(learner)
    seen: list[torch.Tensor] = []
    evaluator = MetaEvaluator("cpu", EpisodeList(3, seed=5), learner, key_val_metric={"acc": EpisodeAccuracy()})
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(learner.head.weight.clone()))
    evaluator.run()
    for w in seen:  # restored after every episode, so episodes do not leak into each other
        assert torch.equal(w, saved["head.weight"])
    _assert_same_state(learner, saved)
    assert all(p.grad is None for p in learner.parameters())
    assert not learner.training
    assert set(evaluator.state.metrics) == {"acc", "acc_ci95", "n_episodes"}


def test_no_key_metric_still_summarizes():
    evaluator = MetaEvaluator("cpu", EpisodeList(2), TinyProtoNet(), key_val_metric=None)
    evaluator.run()
    assert evaluator.state.metrics == {}
    assert evaluator.state.summary["accuracy"]["n_episodes"] == 2


def test_amp_cpu_evaluation():
    torch.manual_seed(0)
    learner = TinyProtoNet()
    saved = _state(learner)
    evaluator = MetaEvaluator("cpu", EpisodeList(3), learner, amp=True)
    evaluator.run()
    assert evaluator.amp_dtype == torch.bfloat16
    assert 0.0 <= evaluator.state.metrics["accuracy"] <= 1.0
    _assert_same_state(learner, saved)


def test_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        MetaEvaluator("cpu", [], TinyProtoNet(), task="detection")
    with pytest.raises(ValueError, match="mode"):
        MetaEvaluator("cpu", [], TinyProtoNet(), mode="infer")


class _JsonWriter:
    """A val handler writing ``state.summary`` at ``EPOCH_COMPLETED``, as a bundle's metrics.json writer would."""

    def __init__(self, path) -> None:
        self.path = path

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        self.path.write_text(json.dumps(engine.state.summary))


def test_val_handlers_see_the_summary(tmp_path):
    path = tmp_path / "metrics.json"
    evaluator = MetaEvaluator("cpu", EpisodeList(3), TinyProtoNet(), val_handlers=[_JsonWriter(path)])
    evaluator.run()
    written = json.loads(path.read_text())
    assert written["accuracy"]["n_episodes"] == 3
    assert written["accuracy"]["mean"] == pytest.approx(evaluator.state.metrics["accuracy"])
    assert set(written["per_class"]) == set(evaluator.state.per_class)


def test_accuracy_over_query_subjects_by_hand():
    """Each query subject's accuracy over all its queries first, then the mean over subjects: a subject seen in two
    episodes is pooled, not counted twice."""
    predictions = torch.tensor([0, 0, 0, 0, 0, 0])  # ep queries [0, 0, 1, 1, 2, 2]: right, right, wrong x 4
    ep0 = make_episode(0, n_way=3, k_shot=1, q_query=2)
    ep0["query_subject"] = ["a", "b", "a", "b", "a", "b"]  # a: 1/3, b: 1/3
    ep1 = make_episode(1, n_way=3, k_shot=1, q_query=2)
    ep1["query_subject"] = ["a", "a", "c", "c", "c", "c"]  # a: 2/2, c: 0/4
    evaluator = MetaEvaluator("cpu", [ep0, ep1], OracleLearner(predictions, n_way=3))
    evaluator.run()
    by_subject = evaluator.state.summary["accuracy_subjects"]
    assert by_subject["per_subject"] == {"a": pytest.approx(3 / 5), "b": pytest.approx(1 / 3), "c": 0.0}
    assert by_subject["n_subjects"] == 3
    assert by_subject["mean"] == pytest.approx((3 / 5 + 1 / 3) / 3)
    assert by_subject["ci95"] == pytest.approx(mean_ci95([3 / 5, 1 / 3, 0.0])[1])
    assert evaluator.state.metrics["accuracy"] == pytest.approx(2 / 6)  # over episodes: 2/6 and 2/6
