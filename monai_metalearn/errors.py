"""The exceptions monai-metalearn raises for bad input: one small hierarchy, every message naming the file, key or
class and what is wrong.

Library functions raise them and never exit the interpreter; the command-line entry points (the bundles, through
:func:`monai_metalearn.cli.one_line_errors`, and ``python -m monai_metalearn.demo``) turn them into one line on
stderr and a non-zero exit status. Catch :class:`MetaLearnError` for all of them, or the built-in base that fits
(``ValueError``, ``FileNotFoundError``).
"""

from __future__ import annotations

__all__ = ["MetaLearnError", "ConfigError", "DataError", "TaskFileError", "CheckpointError", "MissingFileError"]


class MetaLearnError(Exception):
    """Base of every monai-metalearn input error."""


class ConfigError(MetaLearnError, ValueError):
    """A config entry or override, a learner name or argument, a class split or protocol that cannot be used."""


class DataError(MetaLearnError, ValueError):
    """Data that cannot be used as asked: an unknown source, a structure no scan has, an unreadable or empty scan."""


class TaskFileError(MetaLearnError, ValueError):
    """A task file (``--task_file``) that is not valid JSON, misses ``support`` / ``query``, or names bad items."""


class CheckpointError(MetaLearnError, ValueError):
    """A checkpoint that cannot be read, or that was written by another learner or network."""


class MissingFileError(MetaLearnError, FileNotFoundError):
    """A file or folder the run needs (data folder, checkpoint, task file, an image it names) does not exist."""
