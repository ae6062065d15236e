"""Helpers shared by the meta-learning engines: device choice, episode preparation, autocast settings."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor

__all__ = [
    "EPISODE_KEYS",
    "default_device",
    "default_prepare_episode",
    "is_meta_batch",
    "resolve_amp_dtype",
    "autocast_context",
]

EPISODE_KEYS = ("support_image", "support_label", "query_image", "query_label")
"""The tensor entries of an episode dict, in the order learners take them."""


def default_device() -> torch.device:
    """``cuda`` when a GPU is available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_meta_batch(batchdata: Any) -> bool:
    """Whether ``batchdata`` is a meta-batch (a list or tuple of episode dicts) rather than one episode."""
    return isinstance(batchdata, (list, tuple)) and len(batchdata) > 0 and isinstance(batchdata[0], Mapping)


def _to_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, MetaTensor):
        return value.as_tensor()
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Sequence) and len(value) > 0 and all(isinstance(v, torch.Tensor) for v in value):
        try:
            return torch.stack([_to_tensor(v, name) for v in value])
        except RuntimeError as e:
            raise ValueError(f"episode entry '{name}' is a list of tensors of different shapes: {e}") from e
    return torch.as_tensor(value)


def default_prepare_episode(
    episode: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(support_x, support_y, query_x, query_y)`` of an episode dict, as plain tensors on ``device``.

    ``MetaTensor`` entries become plain tensors, lists of same-shape tensors are stacked, and a leading batch
    dimension of 1 added by a default-collating ``DataLoader`` (images ``[1, N*K, C, D, H, W]``) is removed.

    Args:
        episode: an episode dict with ``support_image``, ``support_label``, ``query_image``, ``query_label``.
        device: target device.
        non_blocking: passed to ``Tensor.to``.
        kwargs: further ``Tensor.to`` arguments (``memory_format`` ...), applied to the images only.

    Raises:
        KeyError: when an entry is missing.
    """
    missing = [k for k in EPISODE_KEYS if k not in episode]
    if missing:
        raise KeyError(f"episode is missing {missing}; it has {sorted(episode)}.")
    sx, sy, qx, qy = (_to_tensor(episode[k], k) for k in EPISODE_KEYS)
    if sx.ndim == 6 and sx.shape[0] == 1 and qx.ndim == 6 and qx.shape[0] == 1:
        sx, sy, qx, qy = sx[0], sy[0], qx[0], qy[0]
    sx = sx.to(device=device, non_blocking=non_blocking, **kwargs)
    qx = qx.to(device=device, non_blocking=non_blocking, **kwargs)
    sy = sy.to(device=device, non_blocking=non_blocking)
    qy = qy.to(device=device, non_blocking=non_blocking)
    return sx, sy, qx, qy


def resolve_amp_dtype(device: torch.device, amp_dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The autocast dtype: ``amp_dtype`` if given, else bfloat16 on the CPU and on CUDA devices that support it, float16
    on older GPUs (:func:`~monai_metalearn.learners.precision.default_amp_dtype`)."""
    if amp_dtype is None:
        from monai_metalearn.learners.precision import default_amp_dtype

        return default_amp_dtype(device)
    if isinstance(amp_dtype, str):
        dtype = getattr(torch, amp_dtype.replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown amp_dtype {amp_dtype!r}.")
        return dtype
    return amp_dtype


def autocast_context(
    enabled: bool, device: torch.device, dtype: torch.dtype, **amp_kwargs: Any
) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, dtype=dtype)`` when ``enabled``, else a null context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, **amp_kwargs)
