"""monai-metalearn: few-shot meta-learning for 3D CT and MRI, as a MONAI plugin.

Subpackages: :mod:`~monai_metalearn.data` (real sources, episodes), :mod:`~monai_metalearn.transforms`,
:mod:`~monai_metalearn.networks`, :mod:`~monai_metalearn.learners`, :mod:`~monai_metalearn.engines`,
:mod:`~monai_metalearn.metrics` and :mod:`~monai_metalearn.apps` (bundle / demo glue). They are imported on first
attribute access, so ``import monai_metalearn`` stays cheap and ``monai_metalearn.engines.MetaTrainer`` works in
bundle configs after a bare ``$import monai_metalearn``.
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("apps", "cli", "data", "engines", "errors", "learners", "metrics", "networks", "transforms")

__all__ = ["__version__", *_SUBPACKAGES]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
