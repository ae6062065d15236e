"""N-way K-shot Q-query episode sampling over labelled examples, with class splits and cross-subject mode.

The sampler knows indices, class names and subject ids, and nothing about images: an episode is a
reproducible function of ``(seed, episode index)``, so the same seed gives the same episodes in any process,
with any number of data-loader workers, and a fixed evaluation list is simply episodes ``0..n-1``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from monai_metalearn.errors import ConfigError, DataError

__all__ = ["Episode", "EpisodeSampler", "split_classes", "check_disjoint_splits"]

_MAX_PARTITION_TRIES = 256


@dataclass(frozen=True)
class Episode:
    """Indices of one N-way K-shot Q-query episode.

    Attributes:
        index: episode number within its sampler (``sampler.episode(index)`` gives it back).
        classes: the N class names; position ``i`` is episode label ``i``.
        support: dataset indices of the support set, class-major (K for class 0, then K for class 1, ...).
        query: dataset indices of the query set, class-major (Q per class).
        support_labels: episode labels of ``support`` (``0..N-1``).
        query_labels: episode labels of ``query``.
    """

    index: int
    classes: tuple[Hashable, ...]
    support: tuple[int, ...]
    query: tuple[int, ...]
    support_labels: tuple[int, ...]
    query_labels: tuple[int, ...]


class EpisodeSampler:
    """Samples N-way K-shot Q-query episodes from a list of per-example class labels.

    Args:
        labels: the class of every example (index ``i`` is example ``i`` of the dataset).
        n_way: classes per episode.
        k_shot: support examples per class.
        q_query: query examples per class.
        subjects: the subject of every example; needed for ``cross_subject``.
        classes: restrict episodes to these classes (e.g. one split); default: all classes in ``labels``.
        cross_subject: if True, no subject appears in both the support and the query set of an episode.
        seed: episodes are a function of ``(seed, index)`` only.
        support_subjects, query_subjects: cross-subject only: the subjects whose examples may be support (resp.
            query) examples, e.g. CT subjects as support and MR subjects as query; a subject in both pools takes a
            random side per episode, a subject in neither is never used. ``None``: every subject.

    Raises:
        ValueError: ``n_way``/``k_shot``/``q_query`` below 1, ``labels`` and ``subjects`` of different
            lengths, a requested class with no example, more ways than classes, a class with fewer than
            ``k_shot + q_query`` examples, or (cross-subject) a class whose subjects cannot give K support and
            Q query examples from disjoint subjects. Messages name the classes and their counts. More ways than
            classes is a :class:`~monai_metalearn.errors.ConfigError`, a class with no or too few examples a
            :class:`~monai_metalearn.errors.DataError` (both ``ValueError`` subclasses).

    Example::

        sampler = EpisodeSampler(["liver", "liver", "spleen", "spleen"], n_way=2, k_shot=1, q_query=1, seed=0)
        ep = sampler.episode(0)   # the same Episode every time, in every process
    """

    def __init__(
        self,
        labels: Sequence[Hashable],
        n_way: int,
        k_shot: int,
        q_query: int,
        subjects: Sequence[Hashable] | None = None,
        classes: Sequence[Hashable] | None = None,
        cross_subject: bool = False,
        seed: int = 0,
        support_subjects: Sequence[Hashable] | None = None,
        query_subjects: Sequence[Hashable] | None = None,
    ) -> None:
        for name, value in (("n_way", n_way), ("k_shot", k_shot), ("q_query", q_query)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self.n_way, self.k_shot, self.q_query = int(n_way), int(k_shot), int(q_query)
        self.labels = list(labels)
        if subjects is not None and len(subjects) != len(self.labels):
            raise ValueError(f"subjects has {len(subjects)} entries but labels has {len(self.labels)}.")
        if cross_subject and subjects is None:
            raise ValueError("cross_subject=True needs the subject of every example (subjects=...).")
        self.subjects = list(subjects) if subjects is not None else None
        self.cross_subject = bool(cross_subject)
        self.seed = int(seed)
        if (support_subjects is not None or query_subjects is not None) and not self.cross_subject:
            raise ValueError("support_subjects / query_subjects restrict the sides of a cross-subject episode: "
                             "set cross_subject=True.")
        known = set(self.subjects or ())
        for name, pool in (("support_subjects", support_subjects), ("query_subjects", query_subjects)):
            if pool is not None and not set(pool) & known:
                raise ValueError(f"{name} holds none of the examples' subjects: {sorted(map(str, pool))[:8]}")
        self.support_pool = None if support_subjects is None else set(support_subjects)
        self.query_pool = None if query_subjects is None else set(query_subjects)

        by_class: dict[Hashable, list[int]] = defaultdict(list)
        for i, c in enumerate(self.labels):
            if self.cross_subject and not self._usable(self.subjects[i]):  # type: ignore[index]
                continue
            by_class[c].append(i)
        if classes is None:
            classes = sorted(by_class, key=str)
        else:
            classes = list(classes)
            missing = [c for c in classes if c not in by_class]
            if missing:
                raise DataError(f"classes {missing} have no example; available classes: {sorted(by_class, key=str)}.")
            if len(set(classes)) != len(classes):
                raise ValueError(f"classes contains duplicates: {classes}.")
        self.classes: list[Hashable] = list(classes)
        self.index: dict[Hashable, list[int]] = {c: by_class[c] for c in self.classes}
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        if self.n_way > len(self.classes):
            raise ConfigError(
                f"n_way={self.n_way} but only {len(self.classes)} classes are available: {self.classes}."
            )
        need = self.k_shot + self.q_query
        short = {c: len(ix) for c, ix in self.index.items() if len(ix) < need}
        if short:
            raise DataError(
                f"{len(short)} class(es) have fewer than k_shot + q_query = {need} examples: "
                + ", ".join(f"{c!r} ({n})" for c, n in sorted(short.items(), key=lambda t: str(t[0])))
                + ". Lower k_shot/q_query or drop these classes."
            )
        if self.cross_subject:
            bad = {}
            for c, ix in self.index.items():
                per_subject = self._per_subject(ix)
                if not self._class_feasible(per_subject):
                    bad[c] = dict(sorted((str(s), len(v)) for s, v in per_subject.items()))
            if bad:
                raise DataError(
                    f"cross_subject=True: {len(bad)} class(es) cannot give {self.k_shot} support and {self.q_query} "
                    "query examples from disjoint subjects (examples per subject): "
                    + "; ".join(f"{c!r}: {v}" for c, v in sorted(bad.items(), key=lambda t: str(t[0])))
                )

    def _per_subject(self, indices: Sequence[int]) -> dict[Hashable, list[int]]:
        out: dict[Hashable, list[int]] = defaultdict(list)
        for i in indices:
            out[self.subjects[i]].append(i)  # type: ignore[index]
        return out

    def _usable(self, subject: Hashable) -> bool:
        return (self.support_pool is None or subject in self.support_pool) or (
            self.query_pool is None or subject in self.query_pool)

    def _forced_side(self, subject: Hashable) -> bool | None:
        """True: support only; False: query only; None: either (its side is drawn per episode)."""
        can_support = self.support_pool is None or subject in self.support_pool
        can_query = self.query_pool is None or subject in self.query_pool
        return None if can_support and can_query else can_support

    def _class_feasible(self, per_subject: Mapping[Hashable, list[int]]) -> bool:
        """Whether some split of the subjects gives >= K examples on the support side and >= Q on the query side
        (subjects restricted to one pool stay on their side)."""
        forced_s = sum(len(v) for s, v in per_subject.items() if self._forced_side(s) is True)
        forced_q = sum(len(v) for s, v in per_subject.items() if self._forced_side(s) is False)
        free = [len(v) for s, v in per_subject.items() if self._forced_side(s) is None]
        reachable = {0}
        for n in free:  # subset sums of per-subject counts (small numbers of subjects)
            reachable |= {r + n for r in reachable}
        total = sum(free)
        return any(r + forced_s >= self.k_shot and total - r + forced_q >= self.q_query for r in reachable)

    # ------------------------------------------------------------------ sampling
    def __len__(self) -> int:
        raise TypeError("an EpisodeSampler is unbounded; use episode(i), fixed_episodes(n) or iterate with islice.")

    def rng(self, index: int) -> np.random.Generator:
        """The random generator of episode ``index``: a function of ``(seed, index)`` only."""
        return np.random.default_rng([self.seed, int(index)])

    def episode(self, index: int) -> Episode:
        """Episode number ``index`` (deterministic in ``seed`` and ``index``)."""
        rng = self.rng(index)
        for _ in range(_MAX_PARTITION_TRIES):
            chosen = [self.classes[i] for i in rng.choice(len(self.classes), size=self.n_way, replace=False)]
            picked = self._pick(chosen, rng)
            if picked is not None:
                break
        else:  # only reachable in cross-subject mode with classes whose subjects conflict across classes
            raise RuntimeError(
                f"episode {index}: no split of subjects into support/query satisfied {self.n_way} classes at once "
                f"after {_MAX_PARTITION_TRIES} tries; use fewer ways or more subjects per class."
            )
        support, query = picked
        return Episode(
            index=int(index),
            classes=tuple(chosen),
            support=tuple(support),
            query=tuple(query),
            support_labels=tuple(i for i in range(self.n_way) for _ in range(self.k_shot)),
            query_labels=tuple(i for i in range(self.n_way) for _ in range(self.q_query)),
        )

    def _pick(self, chosen: list[Hashable], rng: np.random.Generator) -> tuple[list[int], list[int]] | None:
        if not self.cross_subject:
            support, query = [], []
            for c in chosen:
                ix = rng.permutation(self.index[c])
                support += ix[: self.k_shot].tolist()
                query += ix[self.k_shot : self.k_shot + self.q_query].tolist()
            return support, query
        # cross-subject: one random support/query side per subject, shared by all classes of the episode
        involved = sorted({self.subjects[i] for c in chosen for i in self.index[c]}, key=str)  # type: ignore[index]
        for _ in range(_MAX_PARTITION_TRIES):
            p = rng.uniform(0.2, 0.8)
            side = dict(zip(involved, rng.random(len(involved)) < p))
            for subject in involved:
                forced = self._forced_side(subject)
                if forced is not None:
                    side[subject] = forced
            support, query = [], []
            for c in chosen:
                s_ix = [i for i in self.index[c] if side[self.subjects[i]]]  # type: ignore[index]
                q_ix = [i for i in self.index[c] if not side[self.subjects[i]]]  # type: ignore[index]
                if len(s_ix) < self.k_shot or len(q_ix) < self.q_query:
                    break
                support += rng.choice(s_ix, size=self.k_shot, replace=False).tolist()
                query += rng.choice(q_ix, size=self.q_query, replace=False).tolist()
            else:
                return support, query
        return None

    def fixed_episodes(self, n: int) -> list[Episode]:
        """The fixed, reproducible evaluation list: episodes ``0..n-1``."""
        return [self.episode(i) for i in range(n)]

    def __iter__(self) -> Iterator[Episode]:
        i = 0
        while True:
            yield self.episode(i)
            i += 1


def split_classes(
    classes: Sequence[Hashable],
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    names: Sequence[str] = ("train", "val", "test"),
) -> dict[str, list[Hashable]]:
    """Splits classes into disjoint meta-train / meta-val / meta-test lists (reproducible in ``seed``).

    Args:
        classes: all class names.
        fractions: share of classes per split; normalised to sum to 1.
        seed: shuffling seed.
        names: split names, one per fraction.

    Raises:
        ValueError: duplicate classes, negative fractions, or a split that would be empty.
    """
    classes = sorted(classes, key=str)
    if len(set(classes)) != len(classes):
        raise ValueError("classes contains duplicates.")
    if len(fractions) != len(names) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions {list(fractions)} must be non-negative, one per split name {list(names)}.")
    order = [classes[i] for i in np.random.default_rng(seed).permutation(len(classes))]
    weights = np.asarray(fractions, dtype=float) / float(np.sum(fractions))
    bounds = np.round(np.cumsum(weights) * len(order)).astype(int)
    out, start = {}, 0
    for name, stop, frac in zip(names, bounds, fractions):
        out[name] = sorted(order[start:stop], key=str)
        if frac > 0 and not out[name]:
            raise ValueError(f"split {name!r} would be empty with {len(classes)} classes and fractions {fractions}.")
        start = stop
    return out


def check_disjoint_splits(splits: Mapping[str, Sequence[Hashable]]) -> None:
    """Raises ``ValueError`` naming the classes that appear in more than one split."""
    seen: dict[Hashable, str] = {}
    clashes = []
    for name, members in splits.items():
        for c in members:
            if c in seen and seen[c] != name:
                clashes.append(f"{c!r} in {seen[c]!r} and {name!r}")
            seen.setdefault(c, name)
    if clashes:
        raise ValueError("class splits overlap: " + "; ".join(clashes))
