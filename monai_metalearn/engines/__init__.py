"""MONAI workflows for episodic meta-training and few-shot evaluation."""

from __future__ import annotations

from monai_metalearn.engines.checkpoint import (
    AtomicCheckpointSaver,
    AtomicDiskSaver,
    SafeCheckpointLoader,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from monai_metalearn.engines.distributed import (
    DistributedEpisodeSampler,
    DistributedGradScaler,
    MetaGradientSync,
    all_reduce_gradients,
    destroy_distributed,
    distributed_episode_loader,
    gather_results,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
    local_device,
    shard_queries,
)
from monai_metalearn.engines.evaluator import MetaEvaluator
from monai_metalearn.engines.trainer import MetaTrainer, first_loss
from monai_metalearn.engines.utils import (
    EPISODE_KEYS,
    autocast_context,
    default_device,
    default_prepare_episode,
    is_meta_batch,
    resolve_amp_dtype,
)

__all__ = [
    "MetaTrainer",
    "MetaEvaluator",
    "first_loss",
    "EPISODE_KEYS",
    "default_device",
    "default_prepare_episode",
    "is_meta_batch",
    "resolve_amp_dtype",
    "autocast_context",
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "SafeCheckpointLoader",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "DistributedEpisodeSampler",
    "DistributedGradScaler",
    "MetaGradientSync",
    "all_reduce_gradients",
    "destroy_distributed",
    "distributed_episode_loader",
    "gather_results",
    "shard_queries",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "local_device",
]
