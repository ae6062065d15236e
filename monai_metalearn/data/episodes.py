"""Episodic datasets over any MONAI ``Dataset`` / ``CacheDataset`` / ``PersistentDataset`` (or a plain datalist).

Each item of these datasets is a whole episode, a dict of stacked tensors:

- classification: ``support_image [N*K, C, D, H, W]``, ``support_label [N*K]`` (episode labels ``0..N-1``),
  ``query_image [N*Q, C, D, H, W]``, ``query_label [N*Q]``, ``classes`` (episode label -> class name),
  ``support_subject`` / ``query_subject`` and ``episode`` (its index);
- segmentation: for one structure, ``support_image [K, C, D, H, W]`` with binary ``support_label [K, 1, D, H, W]``
  and ``query_image`` / ``query_label`` likewise, from different subjects, plus ``structure``.

The base dataset's random transforms are re-seeded from ``(seed, episode, position)`` before each example is
read, so an episode is the same tensor in any process and with any number of ``DataLoader`` workers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from monai_metalearn.data.sampler import Episode, EpisodeSampler
from monai_metalearn.transforms.intensity import IGNORE_LABEL

__all__ = [
    "ClassificationEpisodeDataset",
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


def _read(data: Any, index: int, seed: int | None) -> Mapping:
    """``data[index]`` with the dataset's random transforms seeded by ``seed``."""
    transform = getattr(data, "transform", None)
    if seed is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=int(seed))
    item = data[index]
    if isinstance(item, list):  # a transform that returns several samples (e.g. RandCropByPosNegLabeld)
        item = item[0]
    return item


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


class ClassificationEpisodeDataset(TorchDataset):
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
        seed: episodes and the random transforms inside them are functions of ``(seed, episode index)``.
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
        self.epoch = 0

    @property
    def classes(self) -> list[Hashable]:
        return list(self.sampler.classes)

    def __len__(self) -> int:
        return self.num_episodes

    def set_epoch(self, epoch: int) -> None:
        """Training: epoch ``e`` serves episodes ``e * num_episodes ... (e + 1) * num_episodes - 1`` of the sampler,
        so every epoch sees new episodes while staying reproducible (``MetaTrainer`` calls this at each epoch start,
        like ``DistributedSampler.set_epoch``). Evaluation datasets stay at epoch 0: a fixed list."""
        self.epoch = int(epoch)

    def episode(self, index: int) -> Episode:
        """The indices of episode ``index`` of the current epoch (no image is read)."""
        return self.sampler.episode(self.epoch * self.num_episodes + index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_episodes:
            raise IndexError(f"episode {index} out of range 0..{self.num_episodes - 1}")
        ep = self.episode(index)
        images = []
        for pos, j in enumerate(ep.support + ep.query):
            item = _read(self.data, j, _item_seed(self.seed, ep.index, pos))
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


class SegmentationEpisodeDataset(TorchDataset):
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
        seed: episodes are functions of ``(seed, index)``.
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
            allowed support / query subjects; the message lists the subjects that have it), an unknown structure,
            or an empty structure list.
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
        self.epoch = 0

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
            raise ValueError(
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

    def set_epoch(self, epoch: int) -> None:
        """See :meth:`ClassificationEpisodeDataset.set_epoch`."""
        self.epoch = int(epoch)

    def episode(self, index: int) -> tuple[str, list[int], list[int]]:
        """``(structure, support item indices, query item indices)`` of episode ``index`` of the current epoch."""
        position = self.epoch * self.num_episodes + int(index)
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

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_episodes:
            raise IndexError(f"episode {index} out of range 0..{self.num_episodes - 1}")
        structure, support, query = self.episode(index)
        select = self._select(keys=self.keys[1], structure=structure, label_names_key=self.structures_key)
        sides: dict[str, tuple[list, list]] = {"support": ([], []), "query": ([], [])}
        for pos, j in enumerate(support + query):
            side = "support" if pos < len(support) else "query"
            transform = self.support_transform if side == "support" else self.query_transform
            seed = _item_seed(self.seed, self.epoch * self.num_episodes + index, pos)
            item = dict(_read(self.data, j, seed))
            ignore = self._ignore_mask(item)
            item = select(item)
            if ignore is not None:
                mask = item[self.keys[1]]
                item[self.keys[1]] = torch.where(ignore, torch.full_like(mask, IGNORE_LABEL), mask)
            if transform is not None:
                if hasattr(transform, "set_random_state"):
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
            episode=self.epoch * self.num_episodes + index,
        )
        return out


def episode_collate(batch: Any) -> Any:
    """Collate for a ``DataLoader`` over episodic datasets: episodes are already batched, so one episode passes
    through unchanged and a list of episodes (``batch_size > 1``: a meta-batch) stays a list."""
    return batch


def episode_loader(dataset: TorchDataset, meta_batch_size: int | None = None, num_workers: int = 0, **kwargs):
    """A ``monai.data.DataLoader`` that yields one episode (or a list of ``meta_batch_size`` episodes) per step.

    Episodes are reproducible with any ``num_workers``: each is a function of its index and the dataset seed.
    """
    from monai.data import DataLoader

    kwargs.setdefault("shuffle", False)
    return DataLoader(
        dataset, batch_size=meta_batch_size, num_workers=num_workers, collate_fn=episode_collate, **kwargs
    )
