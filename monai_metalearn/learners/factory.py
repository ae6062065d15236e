"""Build any learner by name, for configs (MONAI bundles) and command lines.

Example::

    learner = create_learner("maml", encoder=ConvEncoder3D(), feature_dim=256, n_way=5, inner_lr=0.1)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from monai_metalearn.learners.base import Learner
from monai_metalearn.learners.finetune import FineTuneBaseline
from monai_metalearn.learners.maml import ANIL, FOMAML, MAML, MetaSGD
from monai_metalearn.learners.matching import MatchingNet
from monai_metalearn.learners.protonet import ProtoNet
from monai_metalearn.learners.reptile import Reptile

__all__ = ["LEARNERS", "create_learner", "learner_key"]

#: learner name -> (class, needs a classifier head on the encoder)
LEARNERS: dict[str, tuple[type[Learner], bool]] = {
    "maml": (MAML, True),
    "fomaml": (FOMAML, True),
    "anil": (ANIL, True),
    "metasgd": (MetaSGD, True),
    "reptile": (Reptile, True),
    "protonet": (ProtoNet, False),
    "matching": (MatchingNet, False),
    "finetune": (FineTuneBaseline, False),
}


#: other spellings of a :data:`LEARNERS` key (after case folding and removing ``-``/``_``)
_ALIASES = {"matchingnet": "matching", "matchingnetworks": "matching"}


def learner_key(name: str) -> str:
    """The :data:`LEARNERS` key of a learner name: case-insensitive, ``-``/``_`` ignored (``"Meta-SGD"`` ->
    ``"metasgd"``); aliases such as ``"matching_net"`` / ``"MatchingNetworks"`` -> ``"matching"``."""
    key = str(name).lower().replace("-", "").replace("_", "")
    return _ALIASES.get(key, key)


def create_learner(
    name: str,
    encoder: nn.Module,
    feature_dim: int,
    n_way: int,
    n_base_classes: int | None = None,
    **kwargs: Any,
) -> Learner:
    """A learner of the family ``name`` around ``encoder``.

    Args:
        name: one of :data:`LEARNERS` (case-insensitive; ``-``/``_`` ignored, so ``"Meta-SGD"`` works).
        encoder: feature extractor ``[B, C, D, H, W] -> [B, feature_dim]``.
        feature_dim: encoder output size.
        n_way: classes per episode (sizes the head of MAML-family learners).
        n_base_classes: meta-train classes, for the fine-tuning baseline's pre-training head.
        kwargs: the learner's own arguments (e.g. ``inner_lr``, ``inner_steps``, ``distance``, ``head``, ``fce``).
            ``matching`` gets ``feature_dim`` (for its full-context LSTMs) and, like ``protonet``, no fixed ``n_way``.

    Raises:
        ValueError: unknown name (the message lists the known ones), or ``finetune`` without ``n_base_classes``.
    """
    from monai_metalearn.networks import FewShotClassifier

    key = learner_key(name)
    if key not in LEARNERS:
        raise ValueError(f"unknown learner {name!r}; choose one of {sorted(LEARNERS)}.")
    cls, needs_head = LEARNERS[key]
    if needs_head:
        model = FewShotClassifier(encoder, feature_dim, n_way)
        return cls(model, n_way=n_way, **kwargs)
    if cls is FineTuneBaseline:
        if n_base_classes is None:
            raise ValueError("the 'finetune' baseline needs n_base_classes (the number of meta-train classes).")
        return cls(encoder, feature_dim, n_base_classes=n_base_classes, n_way=n_way, **kwargs)
    if cls is MatchingNet:
        return cls(encoder, **{"feature_dim": feature_dim, **kwargs})
    return cls(encoder, **kwargs)
