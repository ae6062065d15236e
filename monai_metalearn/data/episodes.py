"""Episodic datasets over any MONAI ``Dataset`` / ``CacheDataset`` / ``PersistentDataset`` (or a plain datalist).

Each item of these datasets is a whole episode, a dict of stacked tensors:

- classification: ``support_image [N*K, C, D, H, W]``, ``support_label [N*K]`` (episode labels ``0..N-1``),
  ``query_image [N*Q, C, D, H, W]``, ``query_label [N*Q]``, ``classes`` (episode label -> class name),
  ``support_subject`` / ``query_subject`` and ``episode`` (its index);
- segmentation: for one structure, ``support_image [K, C, D, H, W]`` with binary ``support_label [K, 1, D, H, W]``
  and ``query_image`` / ``query_label`` likewise, from different subjects, plus ``structure``.

An episode is a pure function of ``(seed, epoch, index)``: the same tensors with ``num_workers=0``, with worker
processes (``persistent_workers=True`` included), with thread workers (``monai.data.ThreadDataLoader``) and in any
process. Three things make it so:

- the random transforms (the base dataset's ``transform``, the segmentation support / query transforms) are seeded
  from ``(seed, episode, position)`` before each example is read, and each thread of each process seeds and runs its
  OWN deep copy of them, made on its first read (the base dataset is copied shallowly: its items and caches stay
  shared), so two threads never draw from, or leave values in, the same ``RandomState`` (a transform that cannot be
  deep-copied stays shared, and is then seeded and run under a lock);
- the epoch set by :meth:`~ClassificationEpisodeDataset.set_epoch` lives in shared memory, so worker processes that
  outlive an epoch (``persistent_workers=True``) see it as well as the main process;
- :func:`episode_loader` hands the workers ``(epoch, index)`` pairs (:class:`EpochIndexSampler`) read when iteration
  starts, so an episode's epoch travels with its index instead of being read later by the worker.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

from monai_metalearn.data.sampler import Episode, EpisodeSampler
from monai_metalearn.errors import ConfigError, DataError
from monai_metalearn.transforms.intensity import IGNORE_LABEL

__all__ = [
    "ClassificationEpisodeDataset",
    "EpochIndexSampler",
    "SegmentationEpisodeDataset",
    "can_draw_episode",
    "episode_collate",
    "episode_loader",
]


def _raw_items(data: Any) -> Sequence[Mapping]:
    """The untransformed datalist behind a MONAI dataset (``.data``) or a plain list of dicts."""
    raw = getattr(data, "data", data)
    if not isinstance(raw, Sequence) or (len(raw) and not isinstance(raw[0], Mapping)):
        raise TypeError(
            "episodic datasets need a MONAI Dataset/CacheDataset/PersistentDataset over a list of dicts, "
            f"or a list of dicts; got {type(data).__name__}."
        )
    return raw


# Serialises seeding-and-reading for the rare base dataset or transform that cannot be deep-copied (it then stays
# shared between threads), and the deep copies themselves (the original may be re-seeded meanwhile by MONAI's
# ``worker_init_fn`` in a thread worker).
_SHARED_LOCK = threading.RLock()

# The epochs of all episodic datasets of a process: slots of shared-memory blocks (one file descriptor per block).
_EPOCH_BLOCK_SIZE = 1024
_EPOCH_LOCK = threading.Lock()
_epoch_block: torch.Tensor | None = None
_epoch_next = 0


def _after_fork_in_child() -> None:
    """A forked worker must not inherit a lock held by another thread, nor hand out slots of its parent's block."""
    global _SHARED_LOCK, _EPOCH_LOCK, _epoch_block
    _SHARED_LOCK, _EPOCH_LOCK, _epoch_block = threading.RLock(), threading.Lock(), None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_COPY_ERRORS = (TypeError, AttributeError, RuntimeError, copy.Error)


def _randomizable(obj: Any) -> bool:
    return hasattr(obj, "set_random_state")


def _private_data(data: Any) -> tuple[Any, bool]:
    """``(dataset, shared)``: a shallow copy of ``data`` holding a deep copy of its random ``transform`` (items and
    caches stay shared, random state does not), or ``data`` itself with ``shared=True`` when it cannot be copied.
    Data without a random transform is returned as is (nothing to share)."""
    transform = getattr(data, "transform", None)
    if not _randomizable(transform):
        return data, False
    try:
        with _SHARED_LOCK:
            own = copy.copy(data)
            own.transform = copy.deepcopy(transform)
    except _COPY_ERRORS:
        return data, True
    return own, False


def _private_transforms(transforms: tuple) -> tuple[tuple, bool]:
    """``(copies, shared)``: one deep copy of ``transforms`` (identities between them kept), or the originals with
    ``shared=True`` when they cannot be copied."""
    if not any(_randomizable(t) for t in transforms):
        return transforms, False
    try:
        with _SHARED_LOCK:
            return copy.deepcopy(transforms), False
    except _COPY_ERRORS:
        return transforms, True


def _read(data: Any, index: int, seed: int | None, shared: bool = False) -> Mapping:
    """``data[index]`` with the dataset's random transforms seeded by ``seed`` (under a lock when ``shared``: the
    transform is also used by other threads)."""
    transform = getattr(data, "transform", None)
    seeded = seed is not None and _randomizable(transform)
    with _SHARED_LOCK if shared and seeded else nullcontext():
        if seeded:
            transform.set_random_state(seed=int(seed))
        item = data[index]
    if isinstance(item, list):  # a transform that returns several samples (e.g. RandCropByPosNegLabeld)
        item = item[0]
    return item


def _shared_epoch(epoch: int = 0) -> torch.Tensor:
    """A one-element view of a tensor in shared memory, set to ``epoch``: written by ``set_epoch`` in the main
    process, read by the worker processes that hold a copy of the dataset (forked, or spawned: ``ForkingPickler``
    sends the shared storage; persistent or not) and by threads. A plain pickle or deep copy holds a private copy."""
    global _epoch_block, _epoch_next
    with _EPOCH_LOCK:
        if _epoch_block is None or _epoch_next == _EPOCH_BLOCK_SIZE:
            _epoch_block, _epoch_next = torch.zeros(_EPOCH_BLOCK_SIZE, dtype=torch.int64).share_memory_(), 0
        slot = _epoch_block[_epoch_next : _epoch_next + 1]
        _epoch_next += 1
    slot[0] = int(epoch)
    return slot


class _EpisodicDataset(TorchDataset):
    """What both episodic datasets share: the epoch in shared memory, ``(epoch, index)`` item requests, and the
    per-thread private copies of everything that holds random state."""

    num_episodes: int

    def _init_state(self) -> None:
        self._epoch = _shared_epoch()
        self._local = threading.local()

    @property
    def epoch(self) -> int:
        """The current epoch (shared with the ``DataLoader`` worker processes); see :meth:`set_epoch`."""
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        if int(epoch) != epoch or epoch < 0:
            raise ConfigError(f"{type(self).__name__}: epoch must be a non-negative integer, got {epoch!r}.")
        self._epoch[0] = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Training: epoch ``e`` serves episodes ``e * num_episodes ... (e + 1) * num_episodes - 1`` of the sampler,
        so every epoch sees new episodes while staying reproducible (``MetaTrainer`` calls this at each epoch start,
        like ``DistributedSampler.set_epoch``). Evaluation datasets stay at epoch 0: a fixed list.

        The epoch is held in shared memory: worker processes started before the call (``persistent_workers=True``)
        read the new value too. Call it between epochs, before the loader's iterator is created.

        Raises:
            ConfigError: a negative or non-integer epoch.
        """
        self.epoch = epoch

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """Does nothing: episodes seed their own random transforms from ``(seed, epoch, index)``. Defining it stops
        MONAI's ``DataLoader`` (at construction and in its ``worker_init_fn``) from re-seeding the base dataset's
        transforms, which thread workers share when they cannot be copied."""
        return self

    def _locate(self, index: Any) -> tuple[int, int]:
        """``(epoch, index)`` of an item request: an episode number of the current epoch, or an ``(epoch, index)``
        pair (what :class:`EpochIndexSampler` yields)."""
        if isinstance(index, (tuple, list)):
            if len(index) != 2:
                raise IndexError(f"an episode is requested by its index or an (epoch, index) pair, got {index!r}.")
            epoch, index = int(index[0]), int(index[1])
            if epoch < 0:
                raise IndexError(f"episode request {(epoch, index)}: the epoch must be >= 0.")
        else:
            epoch, index = self.epoch, int(index)
        if not 0 <= index < self.num_episodes:
            raise IndexError(f"episode {index} out of range 0..{self.num_episodes - 1}")
        return epoch, index

    def _private(self, name: str, make: Callable[[], Any]) -> Any:
        """This thread's own ``make()`` result, made on first use in each thread of each process."""
        local = self._local
        value = getattr(local, name, None)
        if value is None:
            value = make()
            setattr(local, name, value)
        return value

    def _base(self) -> tuple[Any, bool]:
        """This thread's ``(base dataset, shared)``, see :func:`_private_data`."""
        return self._private("data", lambda: _private_data(self.data))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_local", None)  # private copies are per thread and per process: made again where needed
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        if not self._epoch.is_shared():  # a plain pickle or deep copy: a fresh shared value for its own workers
            self._epoch = _shared_epoch(int(self._epoch[0]))


class EpochIndexSampler(Sampler):
    """Yields ``(epoch, index)`` for the episodes ``0..len(dataset)-1`` of an episodic dataset, the epoch read from
    ``dataset.epoch`` when iteration starts (in the process and thread that samples indices).

    The epoch then travels with every index to the worker that builds the episode, so an episode never depends on
    when a worker happens to read the dataset's epoch. :func:`episode_loader` uses it by default.

    Args:
        dataset: a :class:`ClassificationEpisodeDataset` or :class:`SegmentationEpisodeDataset` (anything with
            ``__len__`` and an ``epoch`` attribute).
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "epoch"):
            raise ConfigError(
                f"EpochIndexSampler needs an episodic dataset with an epoch; got {type(dataset).__name__}."
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(self.dataset.epoch)
        return iter([(epoch, i) for i in range(len(self.dataset))])


def _stack(values: list, what: str) -> torch.Tensor | list:
    tensors = [torch.as_tensor(v) for v in values]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(
            f"{what}: examples have different shapes {sorted(shapes)}; add a transform that gives every example "
            "the same size (e.g. RandCropStructured(spatial_size=...), Resized or RandSpatialCropd)."
        )
    return torch.stack([t.as_tensor() if hasattr(t, "as_tensor") else t for t in tensors])


def can_draw_episode(
    subjects: Collection[str],
    k_shot: int,
    q_query: int,
    support_subjects: Collection[str] | None = None,
    query_subjects: Collection[str] | None = None,
) -> bool:
    """Whether a structure present in ``subjects`` gives a segmentation episode: ``k_shot`` support and ``q_query``
    query subjects, all distinct, the support drawn from ``support_subjects`` and the query from ``query_subjects``
    (``None``: any subject)."""
    have = {str(s) for s in subjects}
    sup = have if support_subjects is None else have & {str(s) for s in support_subjects}
    qry = have if query_subjects is None else have & {str(s) for s in query_subjects}
    return len(sup) >= k_shot and len(qry) >= q_query and len(sup | qry) >= k_shot + q_query


def _item_seed(seed: int, episode: int, position: int) -> int:
    return int(np.random.default_rng([seed, episode, position, 7]).integers(0, 2**31 - 1))


class ClassificationEpisodeDataset(_EpisodicDataset):
    """N-way K-shot Q-query classification episodes over a MONAI dataset of labelled examples.

    Class and subject of each example are read from the base dataset's untransformed datalist (``data.data``
    for MONAI datasets), so sampling never loads an image; only the N*(K+Q) chosen examples are read.

    Args:
        data: a MONAI ``Dataset``/``CacheDataset``/``PersistentDataset`` whose items are dicts, or a list of dicts
            already holding tensors/arrays.
        n_way, k_shot, q_query: episode shape.
        num_episodes: length of the dataset (episodes ``0..num_episodes-1``: a fixed, reproducible list).
        classes: classes allowed in episodes (one meta-split); default all.
        class_key, subject_key, image_key: keys of class name, subject id and image in the items.
        cross_subject: support and query never share a subject.
        seed: episodes and the random transforms inside them are functions of ``(seed, epoch, episode index)``.
        support_subjects, query_subjects: with ``cross_subject``, the subjects allowed on each side (e.g. CT support,
            MR query); see :class:`~monai_metalearn.data.EpisodeSampler`.

    Raises:
        ValueError / KeyError: from :class:`EpisodeSampler` (too few examples, too many ways, ...) and when an
            item lacks ``class_key`` or ``subject_key`` (the message names the item index and key).

    Example::

        episodes = ClassificationEpisodeDataset(patches, n_way=5, k_shot=5, q_query=15, num_episodes=100, seed=0)
        ep = episodes[0]
        ep["support_image"].shape   # [25, 1, 32, 32, 32]
    """

    def __init__(
        self,
        data: Any,
        n_way: int,
        k_shot: int,
        q_query: int,
        num_episodes: int,
        classes: Sequence[Hashable] | None = None,
        class_key: str = "class",
        subject_key: str = "subject",
        image_key: str = "image",
        cross_subject: bool = False,
        seed: int = 0,
        support_subjects: Sequence[Hashable] | None = None,
        query_subjects: Sequence[Hashable] | None = None,
    ) -> None:
        self.data = data
        raw = _raw_items(data)
        for i, item in enumerate(raw):
            for key in (class_key,) + ((subject_key,) if cross_subject else ()):
                if key not in item:
                    raise KeyError(f"item {i} has no {key!r} key (keys: {sorted(item)}).")
        subjects = [item.get(subject_key, f"item{i}") for i, item in enumerate(raw)]
        self.sampler = EpisodeSampler(
            [item[class_key] for item in raw], n_way, k_shot, q_query, subjects=subjects, classes=classes,
            cross_subject=cross_subject, seed=seed, support_subjects=support_subjects, query_subjects=query_subjects,
        )
        self.subjects = subjects
        self.num_episodes = int(num_episodes)
        self.image_key, self.seed = image_key, int(seed)
        self._init_state()

    @property
    def classes(self) -> list[Hashable]:
        return list(self.sampler.classes)

    def __len__(self) -> int:
        return self.num_episodes

    def episode(self, index: int, epoch: int | None = None) -> Episode:
        """The indices of episode ``index`` of ``epoch`` (default: the current epoch); no image is read."""
        epoch = self.epoch if epoch is None else int(epoch)
        return self.sampler.episode(epoch * self.num_episodes + index)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        """Episode ``index`` of the current epoch, or of ``epoch`` for an ``(epoch, index)`` pair."""
        epoch, index = self._locate(index)
        ep = self.episode(index, epoch)
        data, shared = self._base()
        images = []
        for pos, j in enumerate(ep.support + ep.query):
            item = _read(data, j, _item_seed(self.seed, ep.index, pos), shared)
            if self.image_key not in item:
                raise KeyError(f"example {j} has no {self.image_key!r} after its transforms (keys: {sorted(item)}).")
            images.append(item[self.image_key])
        stacked = _stack(images, f"episode {index}")
        n_s = len(ep.support)
        return {
            "support_image": stacked[:n_s],
            "support_label": torch.tensor(ep.support_labels, dtype=torch.long),
            "query_image": stacked[n_s:],
            "query_label": torch.tensor(ep.query_labels, dtype=torch.long),
            "classes": [str(c) for c in ep.classes],
            "support_subject": [str(self.subjects[j]) for j in ep.support],
            "query_subject": [str(self.subjects[j]) for j in ep.query],
            "episode": ep.index,
        }


class SegmentationEpisodeDataset(_EpisodicDataset):
    """K-shot segmentation episodes: one structure, K support and Q query (image, binary mask) pairs from
    different subjects.

    The base dataset gives whole multi-label subjects (``image`` + ``label`` + a ``structures`` name -> id map per
    item); each episode picks a structure, draws K + Q distinct subjects that have it, turns their label maps into
    that structure's binary mask (:class:`~monai_metalearn.transforms.SelectStructured`), then applies the support
    or query transform (e.g. ``RandCropByPosNegLabeld`` to training patches, or nothing to keep whole volumes for
    sliding-window evaluation), seeded per example. A transform that returns several samples (``num_samples``)
    contributes all of them: ``support_image`` then holds ``K * num_samples`` patches.

    Args:
        data: MONAI dataset (or list of dicts) of subjects. Its own (random) transform runs before the structure is
            selected and sees the whole label map (e.g. image synthesis from a label map).
        structures: structure names to draw episodes from (one meta-split).
        k_shot, q_query: support and query subjects per episode.
        num_episodes: dataset length.
        episode_transform: callable on ``{"image", "label"}`` dicts after the structure is selected, for support and
            query alike; its random state is seeded per example when it has ``set_random_state``.
        structures_key, subject_key, image_key, label_key: keys in the items.
        seed: episodes are functions of ``(seed, epoch, index)``.
        stack: stack examples into ``[K, C, ...]`` tensors (needs equal shapes); if False, lists of tensors
            (whole volumes of different sizes, for sliding-window evaluation).
        support_transform, query_transform: per-side transforms replacing ``episode_transform`` (e.g. support
            patches for adaptation, whole query volumes for evaluation).
        support_subjects, query_subjects: subject ids allowed on each side (default: any); e.g. support from the
            label-map subjects and query from the real T1 only.
        balanced: structures are taken in turn (episode ``i`` uses ``structures[i % S]``) and the query subjects in
            turn within a structure, so that every (structure, query subject) pair is evaluated equally often (fixed
            evaluation episodes); otherwise both are drawn at random.
        ignore_structures: structures whose voxels are marked :data:`~monai_metalearn.transforms.IGNORE_LABEL`
            (-1) in every binary mask, before the support / query transforms: neither the episode's structure nor
            background, so that losses, prototypes and patch centres never use them (setting 2 of the abdominal
            protocol: the held-out test organs inside the training scans). Must not include ``structures``.

    Raises:
        ValueError: a structure present in fewer than ``k_shot + q_query`` distinct subjects (or in too few of the
            allowed support / query subjects; the message lists the subjects that have it: a
            :class:`~monai_metalearn.errors.DataError`), an unknown structure, or an empty structure list.
    """

    def __init__(
        self,
        data: Any,
        structures: Sequence[str],
        k_shot: int,
        q_query: int,
        num_episodes: int,
        episode_transform: Callable | None = None,
        structures_key: str = "structures",
        subject_key: str = "subject",
        image_key: str = "image",
        label_key: str = "label",
        seed: int = 0,
        stack: bool = True,
        support_transform: Callable | None = None,
        query_transform: Callable | None = None,
        support_subjects: Sequence[str] | None = None,
        query_subjects: Sequence[str] | None = None,
        balanced: bool = False,
        ignore_structures: Sequence[str] | None = None,
    ) -> None:
        from monai_metalearn.transforms import SelectStructured

        self._select = SelectStructured
        self.ignore_structures = [str(s) for s in (ignore_structures or ())]
        both = sorted(set(self.ignore_structures) & {str(s) for s in structures})
        if both:
            raise ValueError(f"structures {both} are both episode structures and ignore_structures.")
        self.data = data
        raw = _raw_items(data)
        if not structures:
            raise ValueError("structures is empty: name at least one structure to segment.")
        self.structures = list(structures)
        self.k_shot, self.q_query = int(k_shot), int(q_query)
        if self.k_shot < 1 or self.q_query < 1:
            raise ValueError(f"k_shot and q_query must be >= 1, got {k_shot}, {q_query}.")
        self.keys = (image_key, label_key)
        self.structures_key, self.subject_key = structures_key, subject_key
        self.episode_transform = episode_transform
        self.support_transform = support_transform if support_transform is not None else episode_transform
        self.query_transform = query_transform if query_transform is not None else episode_transform
        self.num_episodes, self.seed, self.stack = int(num_episodes), int(seed), bool(stack)
        self.balanced = bool(balanced)
        self._init_state()

        # one example per subject and structure: subject -> first item index holding the structure
        self.index: dict[str, dict[str, int]] = {}
        known: set[str] = set()
        subjects_seen: set[str] = set()
        for i, item in enumerate(raw):
            for key in (structures_key, subject_key, label_key):
                if key not in item:
                    raise KeyError(f"item {i} has no {key!r} key (keys: {sorted(item)}).")
            names = item[structures_key]
            known |= set(names)
            subjects_seen.add(str(item[subject_key]))
            for s in names:
                self.index.setdefault(s, {}).setdefault(str(item[subject_key]), i)
        unknown = [s for s in self.structures if s not in known]
        if unknown:
            raise ValueError(f"structures {unknown} are in no item's {structures_key!r} map; known: {sorted(known)}.")
        self.support_subjects = None if support_subjects is None else [str(s) for s in support_subjects]
        self.query_subjects = None if query_subjects is None else [str(s) for s in query_subjects]
        for side, pool in (("support_subjects", self.support_subjects), ("query_subjects", self.query_subjects)):
            missing = sorted(set(pool or ()) - subjects_seen)
            if missing:
                raise ValueError(f"{side} {missing} are not subjects of the dataset; known: {sorted(subjects_seen)}.")
        need = self.k_shot + self.q_query
        short = {
            s: sorted(self.index[s])
            for s in self.structures
            if not can_draw_episode(self.index[s], self.k_shot, self.q_query, self.support_subjects, self.query_subjects)
        }
        if short:
            where = "" if self.support_subjects is None and self.query_subjects is None else (
                f" (support from {self.support_subjects or 'any subject'}, "
                f"query from {self.query_subjects or 'any subject'})"
            )
            raise DataError(
                f"{len(short)} structure(s) are present in fewer than k_shot + q_query = {need} distinct subjects"
                f"{where}: " + "; ".join(f"{s!r} in {subs}" for s, subs in short.items())
            )

    def _pools(self, structure: str) -> tuple[list[str], list[str]]:
        have = sorted(self.index[structure])
        sup = [s for s in have if self.support_subjects is None or s in self.support_subjects]
        qry = [s for s in have if self.query_subjects is None or s in self.query_subjects]
        return sup, qry

    def __len__(self) -> int:
        return self.num_episodes

    def episode(self, index: int, epoch: int | None = None) -> tuple[str, list[int], list[int]]:
        """``(structure, support item indices, query item indices)`` of episode ``index`` of ``epoch`` (default: the
        current epoch)."""
        epoch = self.epoch if epoch is None else int(epoch)
        position = epoch * self.num_episodes + int(index)
        rng = np.random.default_rng([self.seed, position])
        if self.balanced:
            structure = self.structures[position % len(self.structures)]
            turn = position // len(self.structures)
        else:
            structure = self.structures[int(rng.integers(len(self.structures)))]
            turn = None
        sup_pool, qry_pool = self._pools(structure)
        if turn is not None:
            start = (turn * self.q_query) % len(qry_pool)
            rotated = qry_pool[start:] + qry_pool[:start]
            query = rotated[: self.q_query]
        else:
            # draw the query side first from the subjects that leave enough support subjects
            query = []
            for s in [qry_pool[i] for i in rng.permutation(len(qry_pool))]:
                if len(query) < self.q_query and len([x for x in sup_pool if x not in query and x != s]) >= self.k_shot:
                    query.append(s)
        rest = [s for s in sup_pool if s not in query]
        if len(query) < self.q_query or len(rest) < self.k_shot:
            raise ValueError(
                f"episode {index}: structure {structure!r} cannot give {self.q_query} query and {self.k_shot} "
                f"support subject(s) that differ (support pool {sup_pool}, query pool {qry_pool})."
            )
        support = [rest[i] for i in rng.choice(len(rest), size=self.k_shot, replace=False)]
        return (
            structure,
            [self.index[structure][s] for s in support],
            [self.index[structure][s] for s in query],
        )

    def _ignore_mask(self, item: Mapping) -> torch.Tensor | None:
        """The voxels of ``ignore_structures`` in the item's label map (``None`` when it has none of them)."""
        from monai_metalearn.transforms import resolve_structure, structure_mask

        names = item[self.structures_key]
        present = [s for s in self.ignore_structures if s in names]
        if not present:
            return None
        ids = [i for s in present for i in resolve_structure(s, names)[1]]
        return structure_mask(torch.as_tensor(item[self.keys[1]]), ids, "ignored structures").bool()

    def _transforms(self) -> tuple[tuple, bool]:
        """This thread's ``((support_transform, query_transform), shared)``, see :func:`_private_transforms`."""
        return self._private("transforms", lambda: _private_transforms((self.support_transform, self.query_transform)))

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        """Episode ``index`` of the current epoch, or of ``epoch`` for an ``(epoch, index)`` pair."""
        epoch, index = self._locate(index)
        position = epoch * self.num_episodes + index
        structure, support, query = self.episode(index, epoch)
        data, shared_data = self._base()
        (support_transform, query_transform), shared = self._transforms()
        select = self._select(keys=self.keys[1], structure=structure, label_names_key=self.structures_key)
        sides: dict[str, tuple[list, list]] = {"support": ([], []), "query": ([], [])}
        for pos, j in enumerate(support + query):
            side = "support" if pos < len(support) else "query"
            transform = support_transform if side == "support" else query_transform
            seed = _item_seed(self.seed, position, pos)
            item = dict(_read(data, j, seed, shared_data))
            ignore = self._ignore_mask(item)
            item = select(item)
            if ignore is not None:
                mask = item[self.keys[1]]
                item[self.keys[1]] = torch.where(ignore, torch.full_like(mask, IGNORE_LABEL), mask)
            if transform is not None:
                with _SHARED_LOCK if shared and _randomizable(transform) else nullcontext():
                    if _randomizable(transform):
                        transform.set_random_state(seed=seed)
                    item = transform(item)
            for sample in item if isinstance(item, list) else [item]:
                sides[side][0].append(sample[self.keys[0]])
                sides[side][1].append(sample[self.keys[1]])
        raw = _raw_items(self.data)
        out: dict[str, Any] = {}
        for side, (images, masks) in sides.items():
            if self.stack:
                images = _stack(images, f"episode {index} {side} images ({structure})")
                masks = _stack(masks, f"episode {index} {side} masks ({structure})")
            out[f"{side}_image"], out[f"{side}_label"] = images, masks
        out.update(
            structure=structure,
            support_subject=[str(raw[j][self.subject_key]) for j in support],
            query_subject=[str(raw[j][self.subject_key]) for j in query],
            episode=position,
        )
        return out


def episode_collate(batch: Any) -> Any:
    """Collate for a ``DataLoader`` over episodic datasets: episodes are already batched, so one episode passes
    through unchanged and a list of episodes (``batch_size > 1``: a meta-batch) stays a list."""
    return batch


def episode_loader(dataset: TorchDataset, meta_batch_size: int | None = None, num_workers: int = 0, **kwargs):
    """A ``monai.data.DataLoader`` that yields one episode (or a list of ``meta_batch_size`` episodes) per step.

    Episodes are reproducible with any ``num_workers`` (``persistent_workers=True`` included): each is a function of
    the dataset seed, its epoch and its index. Unless ``sampler``, ``batch_sampler`` or ``shuffle=True`` is given,
    an episodic dataset is sampled by :class:`EpochIndexSampler`: the epoch current when an epoch's iteration starts
    goes with every index to the workers.

    Args:
        dataset: an episodic dataset (or any dataset of ready episodes).
        meta_batch_size: ``None``: one episode per step; an integer: lists of that many episodes.
        num_workers: ``DataLoader`` worker processes.
        kwargs: further ``monai.data.DataLoader`` arguments.
    """
    from monai.data import DataLoader

    kwargs.setdefault("shuffle", False)
    if (
        isinstance(dataset, _EpisodicDataset)
        and not kwargs["shuffle"]
        and kwargs.get("sampler") is None
        and kwargs.get("batch_sampler") is None
    ):
        kwargs["sampler"] = EpochIndexSampler(dataset)
    return DataLoader(
        dataset, batch_size=meta_batch_size, num_workers=num_workers, collate_fn=episode_collate, **kwargs
    )
