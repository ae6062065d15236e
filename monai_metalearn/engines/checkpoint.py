"""Checkpoints that survive a crash: written atomically, read with ``torch.load(weights_only=True)``, and a file
that cannot be read is a one-line :class:`~monai_metalearn.errors.CheckpointError` naming it.

MONAI's ``CheckpointSaver`` writes straight to the final file name (ignite's ``DiskSaver(atomic=False)``), and
ignite's ``Checkpoint`` deletes the previous file *before* it writes the next one: a process killed while saving
(``kill -9``, out of memory, a pre-empted job) leaves a truncated checkpoint, or none at all when ``n_saved=1``.
:class:`AtomicCheckpointSaver` is a drop-in ``CheckpointSaver`` whose files are serialised to a temporary file in
the same folder, flushed to disk and renamed over the final name, and whose old files are deleted only once the new
one is complete, so the folder always holds a whole checkpoint. :class:`SafeCheckpointLoader` is MONAI's
``CheckpointLoader`` that reads and checks the file when it is attached, before the engine runs: a missing,
truncated or foreign file, or one that does not fit the objects to restore, is a typed error naming the file and
what is wrong; ``load_path`` may also be a folder of checkpoints (the newest one is loaded, e.g.
``--resume_from outputs/resume``).

Both bundles' ``train.json`` use them for every checkpoint they write (``model.pt``, ``model_best_val.pt``,
``resume/checkpoint_epoch=N.pt``) and for ``--resume_from``.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ignite.distributed as idist
import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.networks.utils import copy_model_state

from monai_metalearn.errors import CheckpointError, ConfigError, MissingFileError

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "AtomicDiskSaver",
    "AtomicCheckpointSaver",
    "SafeCheckpointLoader",
]

PathLike = str | os.PathLike

_STEP = re.compile(r"=(\d+)\.pt$")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(obj: Any, path: PathLike, **save_kwargs: Any) -> Path:
    """``torch.save(obj, path)`` atomically: ``obj`` is serialised to a temporary file next to ``path``
    (``.<name>.<random>.tmp``), flushed to disk and renamed over ``path``. A process killed at any moment leaves
    either the previous file or the new one at ``path``, never a partial one (a killed save may leave its hidden
    ``.tmp`` file behind; it is never read).

    Args:
        obj: what to save, e.g. ``{"learner": learner.state_dict(), "optimizer": optimizer.state_dict()}``.
        path: the checkpoint file; its folder must exist.
        save_kwargs: further ``torch.save`` arguments.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f, **save_kwargs)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); checkpoints are shared like any other output
        os.chmod(tmp_name, os.stat(tmp_name).st_mode | stat.S_IRGRP | stat.S_IROTH)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


def latest_checkpoint(folder: PathLike) -> Path:
    """The newest ``*.pt`` checkpoint in ``folder``: the one with the largest step in its name
    (``checkpoint_epoch=3.pt``, ``checkpoint_iteration=400.pt``), else the most recently written one.

    Raises:
        MissingFileError: when ``folder`` holds no ``.pt`` file.
    """
    folder = Path(folder)
    files = [p for p in folder.glob("*.pt") if p.is_file()]
    if not files:
        raise MissingFileError(f"checkpoint folder {str(folder)!r} holds no .pt checkpoint")

    def order(p: Path) -> tuple[int, float]:
        step = _STEP.search(p.name)
        return (int(step.group(1)) if step else -1, p.stat().st_mtime)

    return max(files, key=order)


def load_checkpoint(path: PathLike, map_location: Any = None) -> Any:
    """``torch.load(path, map_location, weights_only=True)`` with errors that name the file.

    ``weights_only=True`` unpickles tensors, numbers, strings and containers only, so a checkpoint cannot run code
    when it is loaded.

    Args:
        path: a checkpoint file, or a folder of them (the newest one is loaded, see :func:`latest_checkpoint`).
        map_location: as in ``torch.load``, e.g. the device to load to.

    Raises:
        MissingFileError: when ``path`` does not exist (or is a folder without checkpoints).
        CheckpointError: when the file is truncated, empty, not a PyTorch checkpoint, or holds objects other than
            tensors and plain containers.
    """
    path = Path(path)
    if path.is_dir():
        path = latest_checkpoint(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {str(path)!r} not found")
    size = path.stat().st_size
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        text = str(err)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if refused:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds objects other than tensors and plain containers ({refused.group(1)}), "
                "which torch.load(weights_only=True) refuses: save state dicts only"
            ) from err
        operand = re.search(r"Unsupported operand \d+", text)
        first = (text.splitlines() or [""])[0].strip().split(". ")[0]
        reason = operand.group(0) if operand else first
        reason = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read ({size} bytes; truncated, e.g. by a run killed while "
            f"saving, or not a PyTorch checkpoint): {reason[:200]}"
        ) from err


class AtomicDiskSaver(DiskSaver):
    """Ignite ``DiskSaver`` that writes with :func:`save_checkpoint` (temporary file, fsync, rename) and deletes the
    files ignite asks it to ``remove`` only after the next checkpoint is complete.

    ``Checkpoint`` removes the oldest file before it saves the new one; with ``n_saved=1`` a crash in between would
    leave no checkpoint at all. Here the removal waits for the new file (and a file about to be replaced under the
    same name is simply overwritten by the rename).

    Args:
        dirname: the folder of the checkpoints (created when missing).
        filename: a fixed file name for every save (MONAI's ``final_filename`` / ``key_metric_filename``), or None
            for ignite's names.
        save_on_rank: the rank that writes, in distributed runs.
        save_kwargs: further ``torch.save`` arguments.
    """

    def __init__(self, dirname: PathLike, filename: str | None = None, save_on_rank: int = 0, **save_kwargs: Any):
        super().__init__(dirname, atomic=True, create_dir=True, require_empty=False, save_on_rank=save_on_rank,
                         **save_kwargs)
        self.filename = filename
        self._pending_removal: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        if idist.get_rank() != self.save_on_rank:
            return
        save_checkpoint(checkpoint, self.dirname / filename, **self.kwargs)
        pending, self._pending_removal = self._pending_removal, []
        for old in pending:
            if old != filename:
                (self.dirname / old).unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        """Marks ``filename`` for deletion once the next checkpoint is written."""
        if idist.get_rank() == self.save_on_rank:
            self._pending_removal.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments and files) writing every checkpoint through
    :class:`AtomicDiskSaver`: a run killed at any moment leaves the previous complete checkpoint or the new one,
    never a truncated file and never an empty ``resume`` folder.

    Example (``configs/train.json``)::

        "resume_saver": {
            "_target_": "monai_metalearn.engines.AtomicCheckpointSaver",
            "save_dir": "$os.path.join(@output_dir, 'resume')",
            "save_dict": {"learner": "@learner", "optimizer": "@train#optimizer", "trainer": "@train#trainer"},
            "save_interval": 1, "epoch_level": true, "n_saved": 1
        }
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                filename = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, filename=filename)


def _saved_epoch(state: Mapping) -> int | None:
    """The completed epochs in an ignite ``Engine.state_dict()`` (it holds ``epoch`` or ``iteration``)."""
    if isinstance(state.get("epoch"), int):
        return state["epoch"]
    iteration, length = state.get("iteration"), state.get("epoch_length")
    if isinstance(iteration, int) and isinstance(length, int) and length > 0:
        return iteration // length
    return None


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return obj.module
    return obj


class SafeCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` (same arguments; restores at ``Events.STARTED``) that reads and checks the file
    when it is attached, so a bad checkpoint stops the run before the engine starts, with a typed one-line error:

    - :class:`~monai_metalearn.errors.MissingFileError` for a ``load_path`` that does not exist,
    - :class:`~monai_metalearn.errors.CheckpointError` for a truncated, empty or foreign file (it is read with
      ``torch.load(weights_only=True)``, see :func:`load_checkpoint`), one that lacks an object of ``load_dict``,
      or whose state does not fit it (another learner, network or optimizer),
    - :class:`~monai_metalearn.errors.ConfigError` when the checkpoint's epoch is beyond the engine's
      ``max_epochs``.

    ``load_path`` may be a folder: its newest checkpoint is loaded (:func:`latest_checkpoint`), so
    ``--resume_from outputs/resume`` resumes from the last epoch saved there. Restoring ``{"trainer": trainer}``
    brings back the epoch, iteration and episode count; ``{"optimizer": optimizer}`` the optimizer state (Adam's
    step counts and moments).

    Args:
        load_path: a checkpoint file or a folder of checkpoints.
        load_dict: the objects to restore, keyed as in the saver's ``save_dict``.
        name: logger name, default the engine's logger.
        map_location: as in ``torch.load``.
        strict: keys and shapes of every state dict must match.
        strict_shape: False skips network layers whose shape differs (and every object that is not a network).
    """

    _checked: tuple[Path, dict] | None = None

    def attach(self, engine: Engine) -> None:
        """Reads and checks the checkpoint now (raising the errors above), and restores it at ``Events.STARTED``
        of ``engine`` (a trainer, validator or evaluator)."""
        if self._name is None:
            self.logger = engine.logger
        self._checked = self.read(engine)
        engine.add_event_handler(Events.STARTED, self)

    def read(self, engine: Engine | None = None) -> tuple[Path, dict]:
        """The checkpoint file and its content, checked against ``load_dict`` (and ``engine``'s ``max_epochs``).

        Raises:
            MissingFileError, CheckpointError, ConfigError: see the class documentation.
        """
        path = Path(self.load_path)
        if path.is_dir():
            path = latest_checkpoint(path)
        checkpoint = load_checkpoint(path, map_location=self.map_location)
        if not isinstance(checkpoint, Mapping):
            raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a dict of "
                                  f"state dicts for {sorted(self.load_dict)}")
        checkpoint = dict(checkpoint)
        first_key = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and first_key not in checkpoint:  # a bare state dict, as MONAI allows
            checkpoint = {first_key: checkpoint}
        missing = [k for k in self.load_dict if k not in checkpoint]
        if missing:
            raise CheckpointError(f"checkpoint {str(path)!r} has no {missing} (it holds {sorted(checkpoint)}): "
                                  "was it written by another config's CheckpointSaver?")
        for key, obj in self.load_dict.items():
            self._check_fits(path, key, _unwrap(obj), checkpoint[key])
            if engine is not None and obj is engine:
                epoch, max_epochs = _saved_epoch(checkpoint[key]), engine.state.max_epochs
                if epoch is not None and max_epochs is not None and epoch > max_epochs:
                    raise ConfigError(f"checkpoint {str(path)!r} is at epoch {epoch}, beyond the trainer's max_epochs "
                                      f"{max_epochs}: pass --epochs {epoch + 1} or more to train on from it")
        return path, checkpoint

    def _check_fits(self, path: Path, key: str, obj: Any, state: Any) -> None:
        where = f"checkpoint {str(path)!r}: {key!r}"
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{where} holds a {type(state).__name__}, not a state dict")
        if isinstance(obj, torch.nn.Module):
            if not self.strict_shape:
                return  # layers that differ are skipped
            own = obj.state_dict()
            wrong = [n for n, v in own.items() if n in state and isinstance(state[n], torch.Tensor)
                     and isinstance(v, torch.Tensor) and state[n].shape != v.shape]
            absent = sorted(set(own) - set(state)) if self.strict else []
            extra = sorted(set(state) - set(own)) if self.strict else []
            if wrong or absent or extra:
                found = "; ".join(f"{label} {names[:5]}{' ...' if len(names) > 5 else ''}" for label, names in
                                  (("missing", absent), ("unexpected", extra), ("other shape", wrong)) if names)
                raise CheckpointError(f"{where} does not fit {type(obj).__name__} (was it written with another "
                                      f"learner_name, network or features?): {found}")
        elif isinstance(obj, torch.optim.Optimizer):
            groups = state.get("param_groups")
            sizes = [len(g.get("params", [])) for g in groups] if isinstance(groups, list) else None
            own_sizes = [len(g["params"]) for g in obj.param_groups]
            if sizes != own_sizes:
                raise CheckpointError(f"{where} is the state of an optimizer of {sizes} parameters per group, this "
                                      f"{type(obj).__name__} has {own_sizes} (another learner or network?)")

    def __call__(self, engine: Engine) -> None:
        """Restores ``load_dict`` from the checkpoint (read at ``attach``, else now)."""
        checked, self._checked = self._checked, None
        path, checkpoint = checked if checked is not None else self.read(engine)
        load_dict = dict(self.load_dict)
        if not self.strict_shape:
            for key, obj in list(load_dict.items()):
                if isinstance(obj, torch.nn.Module):
                    checkpoint[key] = copy_model_state(_unwrap(obj), checkpoint[key], inplace=False)[0]
                else:
                    load_dict.pop(key)

        prior_max_epochs = engine.state.max_epochs
        try:
            Checkpoint.load_objects(to_load=load_dict, checkpoint=checkpoint, strict=self.strict)
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            first = " ".join(str(err).split())[:300]
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit {sorted(load_dict)} (was it written with "
                                  f"another learner_name, network or optimizer?): {first}") from err
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ConfigError(f"checkpoint {str(path)!r} is at epoch {engine.state.epoch}, beyond the trainer's "
                              f"max_epochs {prior_max_epochs}: pass --epochs {engine.state.epoch + 1} or more to "
                              "train on from it")
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored all variables from {path} (epoch {engine.state.epoch}, "
                         f"iteration {engine.state.iteration})")
