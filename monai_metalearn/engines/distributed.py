"""Distributed meta-training over ``torch.distributed``, with the semantics of ``DistributedDataParallel``.

Every rank (one process per GPU, started by ``torchrun``) holds a replica of the learner and runs its own share of
each meta-batch: with a global meta-batch of ``meta_batch_size`` tasks and ``W`` ranks, rank ``r`` trains on episodes
``r, r + W, r + 2W, ...`` of it (:class:`DistributedEpisodeSampler`), so the union over the ranks is exactly the
meta-batch one process would train on. After the local backward passes the meta-gradients are averaged over the ranks
(:func:`all_reduce_gradients`), then every rank takes the same optimizer step, and the replicas stay identical: two
ranks of ``B`` tasks each give the update of one process with ``2B`` tasks (up to float rounding).

``DistributedDataParallel`` itself does not fit learners whose inner loops run the network functionally
(``torch.func.functional_call``) or several times per step, so the all-reduce is explicit and sits on the
meta-optimizer: :class:`MetaGradientSync` (what ``MetaTrainer(distributed=True)`` uses) registers a step pre-hook on
the optimizer that averages the gradients of its parameters, whichever learner calls ``optimizer.step()`` (MAML,
ProtoNet, fine-tuning pre-training, Reptile with ``outer_update="optimizer"``). A learner that updates its weights
without the optimizer (Reptile's default interpolation ``theta + epsilon * (mean(phi) - theta)``, linear in the tasks'
adapted weights) is synchronised by averaging the parameters after the step, which gives the same update. Buffers are
broadcast from rank 0 after each step (DDP's ``broadcast_buffers``), and the step statistics are averaged over all
tasks of all ranks, so every rank logs the metrics of the global meta-batch.

Mixed precision with float16: :class:`DistributedGradScaler` averages the scaled gradients before unscaling them, so
all ranks find the same overflow and skip (or take) the same step.

Requirements: every rank runs the same number of iterations with the same number of tasks each (what
:class:`DistributedEpisodeSampler` guarantees), and the same learner, so the collectives match. Checkpoint savers,
loggers and validation may live on rank 0 alone (the other ranks wait for it at the next meta-update, up to the
process group's timeout); :func:`init_distributed` sets up ignite's distributed context on every rank first.

Example (the bundles' ``configs/multi_gpu_train.json`` does this)::

    init_distributed()                                   # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    learner = create_learner(...).to(local_device())
    loader = distributed_episode_loader(episodes, meta_batch_size=8)  # 8 tasks per update over all ranks
    trainer = MetaTrainer(local_device(), epochs, loader, learner, optimizer, distributed=True,
                          train_handlers=handlers if is_main_process() else [])
    trainer.run()
    destroy_distributed()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

from monai_metalearn.errors import ConfigError, MetaLearnError

__all__ = [
    "DistributedEpisodeSampler",
    "DistributedGradScaler",
    "MetaGradientSync",
    "all_reduce_gradients",
    "average_parameters",
    "broadcast_module",
    "default_backend",
    "destroy_distributed",
    "distributed_episode_loader",
    "gather_results",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "local_device",
    "reduce_step_metrics",
    "shard_queries",
]

logger = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""The environment variables ``torchrun`` sets that :func:`init_distributed` needs."""

SUMMED_METRICS = ("tasks",)
"""Step statistics that are summed over the ranks (counts); every other one is averaged over the tasks."""


# ------------------------------------------------------------------------------------------------ process group
def is_distributed() -> bool:
    """Whether a default process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of ranks of the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only process): the one that writes checkpoints and logs."""
    return get_rank() == 0


def default_backend() -> str:
    """``"nccl"`` when CUDA is available, else ``"gloo"``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _local_rank() -> int:
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        rank = int(value)
    except ValueError:
        raise ConfigError(f"the environment variable LOCAL_RANK must be an integer, got {value!r}.") from None
    if rank < 0:
        raise ConfigError(f"the environment variable LOCAL_RANK must be >= 0, got {rank}.")
    return rank


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU (``LOCAL_RANK`` is set by
    ``torchrun``; 0 when it is not set).

    Raises:
        ConfigError: ``LOCAL_RANK`` is not a non-negative integer, or is not below the number of CUDA devices.
    """
    rank = _local_rank()
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if rank >= count:
        raise ConfigError(
            f"LOCAL_RANK={rank} but this machine has {count} CUDA device(s): start at most {count} processes per "
            "node (torchrun --nproc_per_node)."
        )
    return torch.device("cuda", rank)


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Initialise the default process group from the ``torchrun`` environment (nothing when one exists already).

    With the ``nccl`` backend the process's CUDA device is set to ``cuda:LOCAL_RANK`` first. Ignite's distributed
    context (``ignite.distributed``, which checkpoint savers and metrics query) is then set up on every rank, also
    when the process group existed already: ignite creates it with a collective call on its first use, which would
    wait forever for ranks that never make that call (e.g. the ranks that build no checkpoint saver).

    Args:
        backend: ``"nccl"`` (CUDA tensors), ``"gloo"`` (CPU) or another ``torch.distributed`` backend; default
            :func:`default_backend`.
        timeout_s: how long a collective waits for the other ranks, in seconds; default that of
            ``torch.distributed`` (also the time the other ranks may wait while rank 0 validates).

    Returns:
        True when this call created the process group, False when it existed already.

    Raises:
        ConfigError: the ``torchrun`` environment variables are missing, ``torch.distributed`` is not available,
            or ``nccl`` is asked for without CUDA.
    """
    if not dist.is_available():
        raise ConfigError("distributed training needs torch.distributed, which this PyTorch build lacks.")
    if dist.is_initialized():
        _sync_ignite()
        return False
    missing = [name for name in TORCHRUN_ENV if not os.environ.get(name)]
    if missing:
        raise ConfigError(
            f"distributed training (multi_gpu_train.json) needs the environment torchrun sets; missing {missing}. "
            "Start it with: torchrun --standalone --nproc_per_node N -m monai.bundle run --config_file "
            "\"['configs/train.json','configs/multi_gpu_train.json']\""
        )
    backend = default_backend() if backend is None else str(backend)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("dist_backend='nccl' needs CUDA, which is not available here: use dist_backend='gloo'.")
        torch.cuda.set_device(local_device())
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        from datetime import timedelta

        kwargs["timeout"] = timedelta(seconds=float(timeout_s))
    dist.init_process_group(backend=backend, **kwargs)
    _sync_ignite()
    logger.info("process group: rank %d of %d, backend %s", dist.get_rank(), dist.get_world_size(), backend)
    return True


def _sync_ignite() -> None:
    """``ignite.distributed.sync()``: ignite's view of the process group (collective: every rank calls it)."""
    import ignite.distributed as idist

    idist.sync()


def destroy_distributed() -> None:
    """Destroy the default process group, if there is one (and ignite's view of it)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _sync_ignite()


# ------------------------------------------------------------------------------------------------- collectives
def _coalesced(tensors: list[Tensor], apply: Any) -> None:
    """``apply(flat)`` on one flat copy of ``tensors`` per (device, dtype), written back into the tensors."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        apply(flat)
        offset = 0
        for t in group:
            n = t.numel()
            t.detach().copy_(flat[offset : offset + n].view_as(t))
            offset += n


def _mean_(flat: Tensor, world: int) -> None:
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world)


def _comm_device() -> torch.device:
    """Where small bookkeeping tensors go for the collectives: the current CUDA device for ``nccl``, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _optimizer_parameters(source: Any) -> list[Tensor]:
    """The parameters of a module, an optimizer (its param groups) or an iterable of tensors, without repeats."""
    if isinstance(source, nn.Module):
        params: Iterable[Tensor] = source.parameters()
    elif isinstance(source, torch.optim.Optimizer):
        params = (p for group in source.param_groups for p in group["params"])
    else:
        params = source
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def all_reduce_gradients(source: Any) -> int:
    """Average the ``.grad`` of parameters over the ranks of the default process group.

    A parameter whose gradient is ``None`` on some ranks counts as zero there; one whose gradient is ``None`` on
    every rank keeps ``None`` (so optimizers skip it as they would in one process). Nothing happens without a
    process group of several ranks.

    Args:
        source: an ``nn.Module``, an optimizer (the parameters of its param groups) or an iterable of parameters;
            every rank must pass the same parameters in the same order.

    Returns:
        the number of parameters that have a gradient after the call.

    Raises:
        MetaLearnError: a sparse gradient (not supported).
    """
    params = _optimizer_parameters(source)
    if not is_distributed() or not params:
        return sum(p.grad is not None for p in params)
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise MetaLearnError(
                f"all_reduce_gradients: sparse gradients are not supported (parameter of shape {tuple(p.shape)})"
            )
    world = dist.get_world_size()
    present = torch.tensor([float(p.grad is not None) for p in params], device=_comm_device())
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    with_grad = [p for p, flag in zip(params, present.tolist()) if flag > 0]
    for p in with_grad:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _coalesced([p.grad for p in with_grad], lambda flat: _mean_(flat, world))
    return len(with_grad)


def average_parameters(module: nn.Module) -> None:
    """Replace every parameter of ``module`` by its mean over the ranks (nothing without a process group)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    with torch.no_grad():
        _coalesced(list(module.parameters()), lambda flat: _mean_(flat, world))


def broadcast_module(module: nn.Module, src: int = 0, parameters: bool = True, buffers: bool = True) -> None:
    """Copy the parameters and/or buffers of rank ``src``'s ``module`` to every rank (nothing without a process
    group): what ``DistributedDataParallel`` does when it wraps a module (and, for buffers, before each forward)."""
    if not is_distributed():
        return
    tensors = (list(module.parameters()) if parameters else []) + (list(module.buffers()) if buffers else [])
    with torch.no_grad():
        _coalesced(tensors, lambda flat: dist.broadcast(flat, src=src))


def reduce_step_metrics(stats: Mapping[str, float], n_tasks: int) -> tuple[dict[str, float], int]:
    """The statistics of one meta-update over all ranks: each value averaged over all tasks (weighted by each
    rank's ``n_tasks``), the counts of :data:`SUMMED_METRICS` summed, and the total number of tasks.

    Without a process group of several ranks ``(dict(stats), n_tasks)`` is returned. Values that are not numbers
    are kept as this rank has them.

    Args:
        stats: this rank's step statistics (floats; the same keys on every rank).
        n_tasks: the number of tasks this rank trained on in the step.

    Raises:
        MetaLearnError: the ranks report different numbers of statistics or of tasks (their updates were not
            averaged over equal shares of the meta-batch).
    """
    stats = dict(stats)
    if not is_distributed():
        return stats, int(n_tasks)
    keys = sorted(k for k, v in stats.items() if isinstance(v, (int, float)))
    n = float(n_tasks)
    local = torch.tensor(
        [n, float(len(keys))] + [float(stats[k]) * (1.0 if k in SUMMED_METRICS else n) for k in keys],
        dtype=torch.float64,
        device=_comm_device(),
    )
    sizes = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.numel()], dtype=torch.int64, device=local.device))
    if len({int(s) for s in sizes}) != 1:
        raise MetaLearnError(
            f"rank {dist.get_rank()}: the ranks report different step statistics ({[int(s) - 2 for s in sizes]} "
            f"values; this rank: {keys}); every rank must train the same learner."
        )
    rows = [torch.zeros_like(local) for _ in sizes]
    dist.all_gather(rows, local)
    table = torch.stack(rows).cpu()
    counts = [int(c) for c in table[:, 0].tolist()]
    if len(set(counts)) != 1:
        raise MetaLearnError(
            f"the ranks trained on different numbers of tasks in one step ({counts}): the meta-gradient average "
            "needs equal shares; use DistributedEpisodeSampler / distributed_episode_loader."
        )
    total = sum(counts)
    sums = table[:, 2:].sum(0).tolist()
    stats.update({k: float(s if k in SUMMED_METRICS else s / total) for k, s in zip(keys, sums)})
    return stats, total


# ---------------------------------------------------------------------------------------- the meta-update sync
class MetaGradientSync:
    """Keeps the learner replicas of all ranks identical through the meta-updates (what
    ``MetaTrainer(distributed=True)`` uses).

    At construction the learner's parameters and buffers are broadcast from rank 0. A step pre-hook on
    ``optimizer`` averages the gradients of its parameters over the ranks just before every ``optimizer.step()``
    (:func:`all_reduce_gradients`), so the learner's own step method, whichever it is, steps with the meta-gradient
    of the whole meta-batch. Around each meta-update the engine calls :meth:`begin_step` and :meth:`end_step`; the
    latter averages the parameters when the optimizer did not step (a learner that updates its weights itself, e.g.
    Reptile's interpolation), broadcasts the buffers from rank 0 and reduces the statistics
    (:func:`reduce_step_metrics`).

    Args:
        learner: the learner (``nn.Module``), already on this rank's device.
        optimizer: the meta-optimizer (``None`` for a learner without one).
        broadcast_buffers: broadcast the learner's buffers from rank 0 after each step.

    Raises:
        ConfigError: no process group is initialised (see :func:`init_distributed`).
    """

    def __init__(
        self, learner: nn.Module, optimizer: torch.optim.Optimizer | None, broadcast_buffers: bool = True
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "distributed=True needs an initialised torch.distributed process group: call "
                "monai_metalearn.engines.init_distributed() first (multi_gpu_train.json does so in 'initialize')."
            )
        self.learner = learner
        self.optimizer = optimizer
        self.broadcast_buffers = bool(broadcast_buffers)
        self._reduced = False  # the gradients of this step were averaged already (by DistributedGradScaler)
        self._stepped = False
        broadcast_module(learner)
        self._handle = optimizer.register_step_pre_hook(self._before_optimizer_step) if optimizer is not None else None

    @property
    def world_size(self) -> int:
        """The number of ranks."""
        return get_world_size()

    def reduce_gradients(self) -> None:
        """Average the optimizer's gradients over the ranks now; the optimizer's next step does not average them
        again (what :meth:`DistributedGradScaler.unscale_` uses)."""
        if self.optimizer is not None:
            all_reduce_gradients(self.optimizer)
            self._reduced = True

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._reduced:
            all_reduce_gradients(optimizer)
        self._reduced = False
        self._stepped = True

    def begin_step(self) -> None:
        """Called by the engine before the learner's meta-update."""
        self._reduced = False
        self._stepped = False

    def end_step(self, stats: Mapping[str, float], n_tasks: int) -> tuple[dict[str, float], int]:
        """Called by the engine after the learner's meta-update: synchronise the replicas, reduce the statistics.

        Args:
            stats: this rank's step statistics.
            n_tasks: the number of tasks this rank trained on.

        Returns:
            ``(statistics over all ranks, number of tasks over all ranks)``, see :func:`reduce_step_metrics`.
        """
        if not self._stepped:
            average_parameters(self.learner)
        if self.broadcast_buffers:
            broadcast_module(self.learner, parameters=False, buffers=True)
        self._reduced = False
        return reduce_step_metrics(stats, n_tasks)

    def grad_scaler(self, device: str = "cuda", **kwargs: Any) -> DistributedGradScaler:
        """A :class:`DistributedGradScaler` that averages the gradients through this sync."""
        return DistributedGradScaler(device, sync=self, **kwargs)

    def close(self) -> None:
        """Remove the optimizer hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class DistributedGradScaler(torch.amp.GradScaler):
    """A ``torch.amp.GradScaler`` that averages the (scaled) gradients over the ranks before unscaling them.

    ``GradScaler.step`` checks the unscaled gradients for inf/NaN and skips the optimizer step if it finds any; were
    the gradients averaged afterwards (in the optimizer's step pre-hook), a rank that overflowed would skip the step
    (and the collective) while the others wait for it. Averaging first makes every rank see the same gradients, find
    the same overflow and update its scale alike.

    Args:
        device: as ``torch.amp.GradScaler``.
        sync: the :class:`MetaGradientSync` whose optimizer hook should not average a second time; without it the
            gradients of the optimizer passed to :meth:`unscale_` are averaged directly.
        kwargs: further ``torch.amp.GradScaler`` arguments.
    """

    def __init__(self, device: str = "cuda", sync: MetaGradientSync | None = None, **kwargs: Any) -> None:
        super().__init__(device, **kwargs)
        self.sync = sync

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Average ``optimizer``'s scaled gradients over the ranks, then ``GradScaler.unscale_``."""
        if self.is_enabled():
            if self.sync is not None and self.sync.optimizer is optimizer:
                self.sync.reduce_gradients()
            else:
                all_reduce_gradients(optimizer)
        super().unscale_(optimizer)

    def update(self, new_scale: Any = None) -> None:
        """``GradScaler.update``; a skipped step leaves no mark that the next step's gradients were averaged."""
        super().update(new_scale)
        if self.sync is not None:
            self.sync._reduced = False


# ----------------------------------------------------------------------------------------------- episode shares
class DistributedEpisodeSampler(Sampler):
    """This rank's share of every meta-batch: rank ``r`` of ``W`` gets episodes ``r, r + W, r + 2W, ...`` of each
    global meta-batch of ``meta_batch_size`` episodes (``b * meta_batch_size ... (b + 1) * meta_batch_size - 1``).

    The union of the ranks' shares is the meta-batch a single process trains on, so averaging the ranks'
    meta-gradients reproduces the single-process update. Episodic datasets are sampled as ``(epoch, index)`` pairs,
    the epoch read from ``dataset.epoch`` when iteration starts (as :class:`~monai_metalearn.data.EpochIndexSampler`);
    other datasets by index. Episodes past the last complete meta-batch are left out (every rank must take the same
    number of steps).

    Args:
        dataset: an episodic dataset (or any sized dataset of episodes).
        meta_batch_size: the tasks of one meta-update over ALL ranks, a multiple of the number of ranks; ``None``: one
            episode per rank and step (a global meta-batch of ``W`` episodes).
        num_replicas: the number of ranks; default the world size of the process group.
        rank: this rank; default the process group's rank.

    Raises:
        ConfigError: ``meta_batch_size`` is not a positive multiple of the number of ranks, the dataset holds fewer
            episodes than one meta-batch, or ``rank`` is not in ``0..num_replicas-1``.
    """

    def __init__(
        self,
        dataset: Any,
        meta_batch_size: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        world = get_world_size() if num_replicas is None else int(num_replicas)
        rank = get_rank() if rank is None else int(rank)
        if world < 1:
            raise ConfigError(f"DistributedEpisodeSampler: num_replicas must be >= 1, got {world}.")
        if not 0 <= rank < world:
            raise ConfigError(f"DistributedEpisodeSampler: rank must be in 0..{world - 1}, got {rank}.")
        if meta_batch_size is None:
            per_rank, global_batch = None, world
        else:
            global_batch = int(meta_batch_size)
            if global_batch != meta_batch_size or global_batch < 1 or global_batch % world:
                raise ConfigError(
                    f"meta_batch_size={meta_batch_size} must be a positive multiple of the number of processes "
                    f"({world}): each process trains on meta_batch_size / {world} tasks of every meta-batch."
                )
            per_rank = global_batch // world
        n = len(dataset)
        if n < global_batch:
            raise ConfigError(
                f"{type(dataset).__name__} has {n} episode(s), fewer than one meta-batch of {global_batch} "
                f"({world} process(es)); raise num_episodes."
            )
        if n % global_batch:
            logger.warning(
                "%s: %d episode(s) are not a whole number of meta-batches of %d; the last %d are left out",
                type(dataset).__name__, n, global_batch, n % global_batch,
            )
        self.dataset = dataset
        self.num_replicas, self.rank = world, rank
        self.meta_batch_size, self.per_rank = global_batch, per_rank
        self.num_meta_batches = n // global_batch

    def indices(self) -> list[int]:
        """The episode indices of this rank, in order."""
        w, g, steps = self.num_replicas, self.meta_batch_size, (self.per_rank or 1)
        return [b * g + self.rank + j * w for b in range(self.num_meta_batches) for j in range(steps)]

    def __len__(self) -> int:
        return self.num_meta_batches * (self.per_rank or 1)

    def __iter__(self) -> Iterator[Any]:
        indices = self.indices()
        if not hasattr(self.dataset, "epoch"):
            return iter(indices)
        epoch = int(self.dataset.epoch)
        return iter([(epoch, i) for i in indices])


def distributed_episode_loader(
    dataset: Any,
    meta_batch_size: int | None = None,
    num_workers: int = 0,
    num_replicas: int | None = None,
    rank: int | None = None,
    **kwargs: Any,
):
    """:func:`~monai_metalearn.data.episode_loader` over this rank's share (:class:`DistributedEpisodeSampler`):
    lists of ``meta_batch_size / W`` episodes per step (single episodes for ``meta_batch_size=None``).

    ``meta_batch_size`` is the GLOBAL number of tasks per meta-update, the same value a single-process run uses, so
    a config gives the same meta-updates on any number of processes.

    Args:
        dataset: an episodic dataset.
        meta_batch_size: tasks per meta-update over all ranks (a multiple of the number of ranks), or ``None``.
        num_workers: ``DataLoader`` worker processes of this rank.
        num_replicas: the number of ranks; default the process group's world size.
        rank: this rank; default the process group's rank.
        kwargs: further ``monai.data.DataLoader`` arguments (not ``sampler``, ``batch_sampler`` or ``shuffle``).

    Raises:
        ConfigError: see :class:`DistributedEpisodeSampler`, or a ``sampler`` / ``batch_sampler`` / ``shuffle``
            argument.
    """
    from monai_metalearn.data import episode_loader

    for key in ("sampler", "batch_sampler", "shuffle"):
        if kwargs.get(key):
            raise ConfigError(f"distributed_episode_loader chooses the episodes of each rank itself; drop {key!r}.")
        kwargs.pop(key, None)
    sampler = DistributedEpisodeSampler(dataset, meta_batch_size, num_replicas=num_replicas, rank=rank)
    return episode_loader(dataset, meta_batch_size=sampler.per_rank, num_workers=num_workers, sampler=sampler, **kwargs)


# ------------------------------------------------------------------------------------------ sharded inference
def shard_queries(items: Sequence[Any], rank: int | None = None, world_size: int | None = None) -> list[
        tuple[int, Any]]:
    """This rank's share of ``items`` (e.g. the queries of a task: registration-based learners segment each on its
    own): ``[(i, items[i]) for i in range(rank, len(items), world_size)]``, so the shares are interleaved, differ in
    length by at most one, and their union is every item once. Without a process group: every item.

    Args:
        items: all items, the same list on every rank.
        rank: this rank; default the process group's (0 without one).
        world_size: the number of ranks; default the process group's (1 without one).

    Raises:
        ConfigError: ``world_size`` below 1 or ``rank`` outside ``0 .. world_size - 1``.
    """
    world = get_world_size() if world_size is None else int(world_size)
    rank = get_rank() if rank is None else int(rank)
    if world < 1:
        raise ConfigError(f"shard_queries: world_size must be >= 1, got {world}.")
    if not 0 <= rank < world:
        raise ConfigError(f"shard_queries: rank must be in 0..{world - 1}, got {rank}.")
    return [(i, items[i]) for i in range(rank, len(items), world)]


def _portable(error: BaseException) -> BaseException:
    """``error`` itself when it pickles (to travel to the other ranks), else a :class:`MetaLearnError` naming it."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure
        return MetaLearnError(f"{type(error).__name__}: {error}")


def gather_results(shard: Sequence[tuple[int, Any]], total: int, error: BaseException | None = None) -> list[Any]:
    """Every rank's ``(index, result)`` pairs (from :func:`shard_queries`) as one list in item order, on every rank
    (``torch.distributed.all_gather_object``; without a process group of several ranks, this process's pairs).

    A rank that failed on its share passes its exception as ``error`` instead of stopping: the errors travel with
    the results, so no rank waits for a rank that has stopped, and every rank raises the error of the lowest failing
    rank (the same typed error on all of them). Results must pickle (move tensors to the CPU first).

    Args:
        shard: this rank's ``(index, result)`` pairs.
        total: the number of items over all shares (``len(items)``).
        error: what this rank raised while computing its share, or None.

    Returns:
        ``[result_0, ..., result_{total - 1}]``.

    Raises:
        BaseException: the lowest failing rank's ``error``.
        MetaLearnError: an index is missing from every share or is in several (the ranks sharded different lists).
    """
    local = (list(shard), None if error is None else _portable(error))
    if is_distributed():
        gathered: list[Any] = [None] * get_world_size()
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    for _, err in gathered:
        if err is not None:
            raise err
    out: dict[int, Any] = {}
    for pairs, _ in gathered:
        for index, result in pairs:
            if int(index) in out:
                raise MetaLearnError(f"gather_results: item {index} was computed by several ranks.")
            out[int(index)] = result
    missing = sorted(set(range(int(total))) - set(out))
    extra = sorted(set(out) - set(range(int(total))))
    if missing or extra:
        raise MetaLearnError(f"gather_results: items {missing} are missing and {extra} are out of range "
                             f"0..{int(total) - 1} over {len(gathered)} rank(s).")
    return [out[i] for i in range(int(total))]
