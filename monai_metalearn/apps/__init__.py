"""Applications: the glue between the library and the bundles, demo and tutorials."""

from monai_metalearn.apps import classification, protocols

__all__ = ["classification", "protocols"]
