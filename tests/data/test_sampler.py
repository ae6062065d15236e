"""Episode sampler invariants: shapes, disjointness, seeds, splits, cross-subject, errors (incl. hypothesis)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monai_metalearn.data.sampler import EpisodeSampler, check_disjoint_splits, split_classes


def _labels(n_classes: int, per_class: int) -> list[str]:
    return [f"c{c}" for c in range(n_classes) for _ in range(per_class)]


def test_episode_shape_and_labels():
    labels = _labels(8, 20)
    ep = EpisodeSampler(labels, n_way=5, k_shot=5, q_query=15, seed=3).episode(0)
    assert len(ep.classes) == 5 and len(set(ep.classes)) == 5
    assert len(ep.support) == 25 and len(ep.query) == 75
    assert not set(ep.support) & set(ep.query)
    # class-major blocks, and every index really belongs to its episode class
    for pos, (j, y) in enumerate(zip(ep.support, ep.support_labels)):
        assert y == pos // 5 and labels[j] == ep.classes[y]
    for j, y in zip(ep.query, ep.query_labels):
        assert labels[j] == ep.classes[y]


def test_same_seed_same_episodes_other_seed_other():
    labels = _labels(10, 10)
    a = EpisodeSampler(labels, 3, 2, 3, seed=1).fixed_episodes(20)
    b = EpisodeSampler(labels, 3, 2, 3, seed=1).fixed_episodes(20)
    c = EpisodeSampler(labels, 3, 2, 3, seed=2).fixed_episodes(20)
    assert a == b
    assert a != c
    assert len({(e.classes, e.support) for e in a}) == 20  # episodes differ from each other


def test_cross_subject_never_shares_a_subject():
    # 4 classes, 6 subjects, each subject has 2 examples of every class
    labels, subjects = [], []
    for s in range(6):
        for c in range(4):
            labels += [f"c{c}"] * 2
            subjects += [f"s{s}"] * 2
    sampler = EpisodeSampler(labels, 3, 2, 2, subjects=subjects, cross_subject=True, seed=0)
    for ep in sampler.fixed_episodes(50):
        sup = {subjects[j] for j in ep.support}
        qry = {subjects[j] for j in ep.query}
        assert not sup & qry


def test_cross_subject_infeasible_class_is_named():
    labels = ["a"] * 4 + ["b"] * 4
    subjects = ["s1"] * 4 + ["s1", "s1", "s2", "s3"]
    with pytest.raises(ValueError, match=r"cross_subject=True: 1 class\(es\).*'a'"):
        EpisodeSampler(labels, 2, 1, 1, subjects=subjects, cross_subject=True)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"n_way=4 but only 3 classes"):
        EpisodeSampler(_labels(3, 10), 4, 1, 1)
    with pytest.raises(ValueError, match=r"fewer than k_shot \+ q_query = 20 examples: 'c1' \(5\)"):
        EpisodeSampler(_labels(1, 20) + ["c1"] * 5, 2, 5, 15)
    with pytest.raises(ValueError, match=r"classes \['nope'\] have no example"):
        EpisodeSampler(_labels(3, 10), 2, 1, 1, classes=["c0", "nope"])
    with pytest.raises(ValueError, match="k_shot must be a positive integer"):
        EpisodeSampler(_labels(3, 10), 2, 0, 1)
    with pytest.raises(ValueError, match="needs the subject"):
        EpisodeSampler(_labels(3, 10), 2, 1, 1, cross_subject=True)


def test_split_classes_disjoint_and_reproducible():
    classes = [f"c{i}" for i in range(20)]
    s1 = split_classes(classes, (0.6, 0.2, 0.2), seed=0)
    assert split_classes(classes, (0.6, 0.2, 0.2), seed=0) == s1
    assert split_classes(classes, (0.6, 0.2, 0.2), seed=1) != s1
    assert [len(s1[k]) for k in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(s1["train"] + s1["val"] + s1["test"]) == sorted(classes)
    check_disjoint_splits(s1)
    with pytest.raises(ValueError, match=r"'c3' in 'train' and 'test'"):
        check_disjoint_splits({"train": ["c3", "c4"], "test": ["c3"]})


def test_split_respects_classes_restriction():
    labels = _labels(6, 4)
    sampler = EpisodeSampler(labels, 2, 1, 1, classes=["c4", "c5"], seed=0)
    assert all(set(e.classes) == {"c4", "c5"} for e in sampler.fixed_episodes(10))


@settings(max_examples=60, deadline=None)
@given(
    n_classes=st.integers(2, 8),
    per_class=st.integers(2, 12),
    n_way=st.integers(1, 8),
    k=st.integers(1, 5),
    q=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    index=st.integers(0, 10_000),
)
def test_sampler_invariants_hold_for_any_valid_setting(n_classes, per_class, n_way, k, q, seed, index):
    labels = _labels(n_classes, per_class)
    if n_way > n_classes or k + q > per_class:
        with pytest.raises(ValueError):
            EpisodeSampler(labels, n_way, k, q, seed=seed)
        return
    sampler = EpisodeSampler(labels, n_way, k, q, seed=seed)
    ep = sampler.episode(index)
    assert ep == sampler.episode(index)
    assert len(set(ep.support) | set(ep.query)) == n_way * (k + q)  # no example used twice
    assert Counter(ep.support_labels) == {i: k for i in range(n_way)}
    assert Counter(ep.query_labels) == {i: q for i in range(n_way)}
    assert all(labels[j] == ep.classes[y] for j, y in zip(ep.support + ep.query, ep.support_labels + ep.query_labels))


@settings(max_examples=40, deadline=None)
@given(
    n_subjects=st.integers(2, 6),
    n_classes=st.integers(2, 5),
    k=st.integers(1, 3),
    q=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_cross_subject_invariant_hypothesis(n_subjects, n_classes, k, q, seed):
    per = max(k, q)  # each subject holds `per` examples of every class, so any 1-vs-rest split is feasible
    labels, subjects = [], []
    for s in range(n_subjects):
        for c in range(n_classes):
            labels += [f"c{c}"] * per
            subjects += [f"s{s}"] * per
    sampler = EpisodeSampler(labels, n_classes, k, q, subjects=subjects, cross_subject=True, seed=seed)
    for ep in sampler.fixed_episodes(3):
        assert not {subjects[j] for j in ep.support} & {subjects[j] for j in ep.query}
