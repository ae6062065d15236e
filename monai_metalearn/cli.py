"""Command-line entry points' error handling: a :class:`~monai_metalearn.errors.MetaLearnError` becomes one line on
stderr and exit status 1, without a traceback. Only entry points use this; library functions raise."""

from __future__ import annotations

import sys
from types import TracebackType

from monai_metalearn.errors import MetaLearnError

__all__ = ["one_line_errors", "typed_error", "PREFIX"]

PREFIX = "monai-metalearn: error: "


def typed_error(err: BaseException | None) -> MetaLearnError | None:
    """The first :class:`MetaLearnError` in ``err``'s chain (``err`` itself, then its ``__cause__`` /
    ``__context__``): MONAI's config parser wraps what an expression raises in ``RuntimeError("Failed to
    evaluate ...")``."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MetaLearnError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def one_line_errors() -> None:
    """Installs a ``sys.excepthook`` that prints an uncaught :class:`MetaLearnError` (also when wrapped) as
    ``monai-metalearn: error: <message>`` and lets Python exit with status 1; other exceptions keep their traceback.

    The bundles' configs call it first in ``initialize``, so ``python -m monai.bundle run ...`` reports bad input in
    one line. Calling it twice installs it once.
    """
    previous = sys.excepthook
    if getattr(previous, "_monai_metalearn", False):
        return

    def hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
        found = typed_error(err)
        if found is None:
            previous(kind, err, tb)
            return
        print(PREFIX + str(found).splitlines()[0] if str(found) else PREFIX + type(found).__name__, file=sys.stderr,
              flush=True)

    hook._monai_metalearn = True  # type: ignore[attr-defined]
    sys.excepthook = hook
