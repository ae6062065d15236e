"""One labelled subject -> one new subject: the pieces shared by ``make demo``, tutorial 03 and the registration
benchmark to segment fixed (support, query) pairs of loaded subjects with any segmentation learner.

Subjects are those of :func:`~monai_metalearn.apps.segmentation.load_segmentation_subjects` (``image``, ``label``,
``structures``, ``subject``, ``modality``, ``pixdim``).

Example::

    from monai_metalearn.apps.pairs import next_subjects, segment_pair, subject_mask
    from monai_metalearn.learners import AtlasSegmenter

    atlas = AtlasSegmenter()
    support = by_id[next_subjects(query_id, pool, 1)[0]]
    mask = segment_pair(atlas, support, by_id[query_id], "liver")        # [1, *S] uint8 on the query's grid
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["next_subjects", "subject_mask", "segment_pair", "pair_dice"]


def next_subjects(query: str, pool: Sequence[str], k: int) -> list[str]:
    """The ``k`` subjects of ``pool`` that follow ``query`` in sorted order (cyclically), never ``query`` itself: a
    fixed rule for choosing atlases, blind to any result.

    Raises:
        ValueError: ``pool`` holds no subject but ``query``.
    """
    ordered = sorted(str(s) for s in pool)
    others = [s for s in ordered if s != str(query)]
    if not others:
        raise ValueError(f"no subject besides {query!r} in the pool {ordered}")
    start = sum(1 for s in ordered if s < str(query))
    return [others[(start + i) % len(others)] for i in range(min(int(k), len(others)))]


def subject_mask(subject: Mapping[str, Any], structure: str) -> torch.Tensor:
    """Float mask ``[1, *S]`` of ``structure`` in a loaded subject.

    Raises:
        KeyError: the subject does not have the structure (names the subject and the structure).
    """
    from monai_metalearn.transforms import resolve_structure, structure_mask

    if structure not in subject["structures"]:
        raise KeyError(f"subject {subject.get('subject')!r} has no structure {structure!r}; it has "
                       f"{sorted(subject['structures'])}")
    ids = resolve_structure(structure, subject["structures"])[1]
    return structure_mask(subject["label"], ids, repr(structure)).float()


def segment_pair(
    learner: torch.nn.Module,
    support: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    query: Mapping[str, Any],
    structure: str,
    patch_size: Sequence[int] = (32, 32, 32),
    n_patches: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    keep_largest_component: bool = True,
) -> torch.Tensor:
    """``learner`` adapted to ``structure`` in the support subject(s) and applied to the whole query: a uint8 mask
    ``[1, *S]`` on the query's grid (reduced to its largest connected component, as the bundle does).

    Whole-volume learners (``whole_volume = True``: references, atlases) get the support scans whole and are told the
    protocol's spacing and modalities (``prepare_protocol``); the others adapt on ``n_patches`` patches of each
    support around the structure and its background and segment the query with a sliding window.
    """
    from monai_metalearn.apps.segmentation import largest_component, patch_transforms, sliding_window_inferer

    supports = [support] if isinstance(support, Mapping) else list(support)
    masks = [subject_mask(s, structure) for s in supports]
    if hasattr(learner, "prepare_protocol"):
        from monai_metalearn.data import registration_settings

        learner.prepare_protocol(spacing=query.get("pixdim"),
                                 support_modalities=sorted({str(s.get("modality")) for s in supports}),
                                 query_modalities=[str(query.get("modality"))],
                                 registration=registration_settings(
                                     sorted({str(s.get("source")) for s in [query, *supports]})))
    x = query["image"][None].to(device)
    if getattr(learner, "whole_volume", False):
        predictor = learner.adapt([s["image"].to(device) for s in supports], [m.to(device) for m in masks])
        with torch.no_grad():
            logits = predictor(x)
    else:
        sampler = patch_transforms(patch_size, n_patches)
        xs, ys = [], []
        for i, (s, m) in enumerate(zip(supports, masks)):
            sampler.set_random_state(seed=seed + i)
            for p in sampler({"image": s["image"], "label": m}):
                xs.append(p["image"])
                ys.append(p["label"])
        with torch.enable_grad():
            predictor = learner.adapt(torch.stack(xs).to(device), torch.stack(ys).to(device))
        with torch.no_grad():
            logits = sliding_window_inferer(patch_size, 4, 0.25)(x, predictor)
    pred = logits.argmax(1, keepdim=True).to(torch.uint8).cpu()
    return (largest_component(pred) if keep_largest_component else pred)[0]


def pair_dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Dice of two binary masks of one grid (1.0 when both are empty)."""
    p, t = pred.bool(), truth.bool()
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def quick_meta_train(
    subjects: Sequence[Mapping[str, Any]],
    structures: Sequence[str],
    ignore_structures: Sequence[str] = (),
    learner_name: str = "protoseg",
    epochs: int = 4,
    episodes_per_epoch: int = 12,
    patch_size: Sequence[int] = (32, 32, 32),
    n_patches: int = 2,
    channels: Sequence[int] = (8, 16, 32, 64),
    feature_channels: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    learner_defaults: Mapping[str, Any] | None = None,
) -> tuple[torch.nn.Module, Any]:
    """A short meta-training of a segmentation learner on ``structures`` of ``subjects`` with the project's
    ``MetaTrainer`` (what the bundle's ``train.json`` runs, with a small UNet and few episodes): the demo's and the
    tutorial's meta-learner. ``ignore_structures`` are ignored in losses and patches (setting 2).

    Returns:
        ``(learner, trainer)``.
    """
    from monai.data import Dataset

    from monai_metalearn.apps.segmentation import (
        build_segmentation_learner,
        patch_transforms,
        prepare_segmentation_episode_for,
    )
    from monai_metalearn.data import SegmentationEpisodeDataset, episode_loader
    from monai_metalearn.engines import MetaTrainer
    from monai_metalearn.networks import unet_backbone

    episodes = SegmentationEpisodeDataset(
        Dataset(list(subjects)), list(structures), k_shot=1, q_query=1, num_episodes=int(episodes_per_epoch),
        episode_transform=patch_transforms(patch_size, n_patches), seed=seed,
        ignore_structures=list(ignore_structures) or None,
    )
    backbone = unet_backbone(feature_channels=feature_channels, channels=tuple(channels), strides=(2,) * (len(channels) - 1))
    learner = build_segmentation_learner(learner_name, backbone, feature_channels, list(structures),
                                         learner_defaults).to(device)
    trainer = MetaTrainer(
        device=device, max_epochs=int(epochs), train_data_loader=episode_loader(episodes), learner=learner,
        optimizer=torch.optim.Adam(learner.parameters(), lr=lr),
        prepare_episode=prepare_segmentation_episode_for(learner_name, list(structures)),
    )
    trainer.run()
    return learner.eval(), trainer
