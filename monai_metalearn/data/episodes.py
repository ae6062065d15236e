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

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from monai_metalearn.data.sampler import Episode, EpisodeSampler

__all__ = [
    "ClassificationEpisodeDataset",
    "SegmentationEpisodeDataset",
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
            cross_subject=cross_subject, seed=seed,
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
    that structure's binary mask (:class:`~monai_metalearn.transforms.SelectStructured`), then applies
    ``episode_transform`` (e.g. ``RandCropByPosNegLabeld`` to training patches, or a resize) seeded per episode.

    Args:
        data: MONAI dataset (or list of dicts) of subjects.
        structures: structure names to draw episodes from (one meta-split).
        k_shot, q_query: support and query subjects per episode.
        num_episodes: dataset length.
        episode_transform: callable on ``{"image", "label"}`` dicts after the structure is selected; its random
            state is seeded per example when it has ``set_random_state``.
        structures_key, subject_key, image_key, label_key: keys in the items.
        seed: episodes are functions of ``(seed, index)``.
        stack: stack examples into ``[K, C, ...]`` tensors (needs equal shapes); if False, lists of tensors
            (whole volumes of different sizes, for sliding-window evaluation).

    Raises:
        ValueError: a structure present in fewer than ``k_shot + q_query`` distinct subjects (the message lists
            the subjects that have it), an unknown structure, or an empty structure list.
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
    ) -> None:
        from monai_metalearn.transforms import SelectStructured

        self._select = SelectStructured
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
        self.num_episodes, self.seed, self.stack = int(num_episodes), int(seed), bool(stack)
        self.epoch = 0

        # one example per subject and structure: subject -> first item index holding the structure
        self.index: dict[str, dict[str, int]] = {}
        known: set[str] = set()
        for i, item in enumerate(raw):
            for key in (structures_key, subject_key, label_key):
                if key not in item:
                    raise KeyError(f"item {i} has no {key!r} key (keys: {sorted(item)}).")
            names = item[structures_key]
            known |= set(names)
            for s in names:
                self.index.setdefault(s, {}).setdefault(str(item[subject_key]), i)
        unknown = [s for s in self.structures if s not in known]
        if unknown:
            raise ValueError(f"structures {unknown} are in no item's {structures_key!r} map; known: {sorted(known)}.")
        need = self.k_shot + self.q_query
        short = {s: sorted(self.index[s]) for s in self.structures if len(self.index[s]) < need}
        if short:
            raise ValueError(
                f"{len(short)} structure(s) are present in fewer than k_shot + q_query = {need} distinct subjects: "
                + "; ".join(f"{s!r} in {subs}" for s, subs in short.items())
            )

    def __len__(self) -> int:
        return self.num_episodes

    def set_epoch(self, epoch: int) -> None:
        """See :meth:`ClassificationEpisodeDataset.set_epoch`."""
        self.epoch = int(epoch)

    def episode(self, index: int) -> tuple[str, list[int], list[int]]:
        """``(structure, support item indices, query item indices)`` of episode ``index`` of the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch * self.num_episodes + int(index)])
        structure = self.structures[int(rng.integers(len(self.structures)))]
        subjects = sorted(self.index[structure])
        chosen = [subjects[i] for i in rng.choice(len(subjects), size=self.k_shot + self.q_query, replace=False)]
        items = [self.index[structure][s] for s in chosen]
        return structure, items[: self.k_shot], items[self.k_shot :]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_episodes:
            raise IndexError(f"episode {index} out of range 0..{self.num_episodes - 1}")
        structure, support, query = self.episode(index)
        select = self._select(keys=self.keys[1], structure=structure, label_names_key=self.structures_key)
        images, masks = [], []
        for pos, j in enumerate(support + query):
            seed = _item_seed(self.seed, self.epoch * self.num_episodes + index, pos)
            item = dict(_read(self.data, j, seed))
            item = select(item)
            if self.episode_transform is not None:
                if hasattr(self.episode_transform, "set_random_state"):
                    self.episode_transform.set_random_state(seed=seed)
                item = self.episode_transform(item)
                if isinstance(item, list):
                    item = item[0]
            images.append(item[self.keys[0]])
            masks.append(item[self.keys[1]])
        raw = _raw_items(self.data)
        k = len(support)
        if self.stack:
            images = _stack(images, f"episode {index} images ({structure})")
            masks = _stack(masks, f"episode {index} masks ({structure})")
        return {
            "support_image": images[:k],
            "support_label": masks[:k],
            "query_image": images[k:],
            "query_label": masks[k:],
            "structure": structure,
            "support_subject": [str(raw[j][self.subject_key]) for j in support],
            "query_subject": [str(raw[j][self.subject_key]) for j in query],
            "episode": self.epoch * self.num_episodes + index,
        }


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
