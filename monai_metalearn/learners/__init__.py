"""Few-shot learners: MAML, FOMAML, ANIL, Meta-SGD, Reptile, ProtoNet, Matching Networks and the fine-tuning baselines; for few-shot
segmentation, prototype segmentation (PANet / SSL-ALPNet), the segmentation fine-tuning baselines and a factory.

Every learner follows :class:`~monai_metalearn.learners.base.Learner`: ``meta_loss``, ``adapt``, ``outer_step`` and
``meta_batch_step`` on episode tensors ``(support_x, support_y, query_x, query_y)``.
"""

from __future__ import annotations

from .base import (
    Episode,
    FunctionalPredictor,
    Learner,
    accuracy,
    average_metrics,
    check_episode,
    infer_n_way,
    is_classification_target,
)
from .factory import LEARNERS, create_learner, learner_key
from .finetune import FineTuneBaseline, FineTunedPredictor
from .maml import ANIL, FOMAML, MAML, MetaSGD
from .matching import MatchingNet, MatchingPredictor, matching_log_probs
from .protonet import ProtoNet, PrototypePredictor, compute_prototypes, prototype_logits
from .atlas import FUSIONS, AtlasIntensitySegmenter, AtlasSegmenter, MultiAtlasSegmenter, atlas_intensity_posterior
from .atlas_learned import AtlasSelfTrainingSegmenter, self_training_posterior
from .patch_references import BodyPositionReference, CentroidReference, PatchCentroidReference
from .references import BoxAlignedReference, VolumeLearner, WholeBodyReference, place_by_body_box
from .reptile import Reptile
from .segmentation import (
    SEGMENTATION_LEARNERS,
    VOLUME_LEARNERS,
    PrototypeSegmenter,
    PrototypeSegPredictor,
    SegmentationFineTune,
    SegmentationFineTunedPredictor,
    SegmentationGlobalLabels,
    SegmentationLoss,
    create_segmentation_learner,
    dice_from_logits,
    local_prototypes,
    masked_average_pooling,
    prototype_segmentation_logits,
    segmentation_loss,
)

__all__ = [
    "ANIL",
    "AtlasIntensitySegmenter",
    "AtlasSelfTrainingSegmenter",
    "self_training_posterior",
    "AtlasSegmenter",
    "atlas_intensity_posterior",
    "FUSIONS",
    "MultiAtlasSegmenter",
    "BoxAlignedReference",
    "BodyPositionReference",
    "CentroidReference",
    "PatchCentroidReference",
    "VOLUME_LEARNERS",
    "VolumeLearner",
    "WholeBodyReference",
    "place_by_body_box",
    "FOMAML",
    "MAML",
    "Episode",
    "FineTuneBaseline",
    "FineTunedPredictor",
    "FunctionalPredictor",
    "LEARNERS",
    "Learner",
    "MetaSGD",
    "MatchingNet",
    "MatchingPredictor",
    "matching_log_probs",
    "ProtoNet",
    "PrototypePredictor",
    "PrototypeSegPredictor",
    "PrototypeSegmenter",
    "Reptile",
    "SEGMENTATION_LEARNERS",
    "SegmentationFineTune",
    "SegmentationFineTunedPredictor",
    "SegmentationGlobalLabels",
    "SegmentationLoss",
    "accuracy",
    "average_metrics",
    "check_episode",
    "compute_prototypes",
    "create_learner",
    "create_segmentation_learner",
    "dice_from_logits",
    "infer_n_way",
    "is_classification_target",
    "learner_key",
    "local_prototypes",
    "masked_average_pooling",
    "prototype_logits",
    "prototype_segmentation_logits",
    "segmentation_loss",
]
