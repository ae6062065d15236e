"""monai-metalearn: few-shot meta-learning for 3D CT and MRI, as a MONAI plugin."""

__version__ = "0.1.0"

__all__ = ["__version__"]
