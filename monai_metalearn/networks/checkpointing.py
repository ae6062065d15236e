"""Memory for deep 3D networks: activation checkpointing that is exact under fast weights, and ``channels_last_3d``.

**Blocks** (:func:`enable_activation_checkpointing`): the chosen submodules (the down/up blocks of MONAI's UNet, the
conv blocks of :class:`~monai_metalearn.networks.ConvEncoder3D`, MONAI ResNet/DenseNet blocks) keep only their inputs
during the forward pass and run again during the backward pass (:func:`torch.utils.checkpoint.checkpoint`,
non-reentrant). The MAML-family learners run the network through :func:`torch.func.functional_call`, which puts the
fast weights into the module only while the forward call lasts; a plain checkpoint of the block would recompute it
during the backward pass with the module's *stored* parameters and silently give wrong (meta-)gradients. The wrapped
block therefore captures the parameter and buffer tensors it holds at call time (the fast weights inside
``functional_call``) and passes them to the checkpoint as inputs; the recomputation puts exactly those tensors back.
The gradients, second order included (``torch.autograd.grad(create_graph=True)`` through the recomputed region and a
later backward through that graph), are those of the plain network up to float rounding (``tests/learners/
test_activation_checkpointing.py`` checks them against the un-checkpointed network, and that a naive checkpoint is
wrong).

The wrapped block keeps its class and its parameters' names (the checkpointing lives in an instance attribute
``forward``), so state dicts load either way, ``inner_params`` prefixes and Meta-SGD's per-parameter learning rates
are unchanged, and :func:`copy.deepcopy` / :func:`torch.save` of the whole network work.

**Inner steps** (second-order MAML, ANIL and Meta-SGD; ``learner.checkpoint_inner_steps = True``, see
:func:`checkpoint_function`): each inner step (support forward, ``autograd.grad(create_graph=True)``, SGD update) is one
checkpointed function of the fast weights; only the weights between steps are kept and each step is recomputed in
turn during the outer backward. Block checkpointing alone saves little for second order: the graph of a
differentiable inner gradient holds the recomputed activations of its forward pass until the outer backward, so the
memory still grows with every inner step. Checkpointing the steps makes it independent of their number
(``benchmarks/bench_memory.py`` measures both).

Limits: a checkpointed block's forward runs twice, so a BatchNorm layer in training mode that updates running
statistics would update them twice (the learners' ``"transductive"`` and ``"frozen"`` modes never update them);
``torch.func.grad``/``vjp`` cannot run a checkpoint (PyTorch has no saved-tensor hooks under these transforms), so a
``task_batching="vmap"`` meta-batch falls back to the loop (a ``RuntimeError`` on its first call, see
:mod:`monai_metalearn.learners.task_batching`).

**channels_last_3d** (:func:`enable_channels_last_3d`): 5-D parameters stored in ``torch.channels_last_3d`` and a
forward pre-hook converting 5-D inputs, which lets cuDNN pick NDHWC convolution kernels (tensor cores under AMP). On
the CPU it does not pay: a MAML meta-step through the segmentation UNet was 1.26x slower with one thread
(``benchmarks/bench_memory.py``; a Conv-4 forward/backward about 1.07x), so it is off by default. Outputs equal the
contiguous network's up to float rounding.

Example::

    backbone = enable_activation_checkpointing(unet_backbone(feature_channels=16))  # blocks, by hand
    learner = create_segmentation_learner("maml", unet_backbone(16), 16, activation_checkpointing="all")
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call uses
from torch.utils.checkpoint import checkpoint

from monai_metalearn.errors import ConfigError

__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "activation_checkpointing_mode",
    "checkpoint_function",
    "checkpointed_modules",
    "default_checkpoint_targets",
    "disable_activation_checkpointing",
    "enable_activation_checkpointing",
    "enable_channels_last_3d",
    "is_channels_last_3d",
    "to_channels_last_3d",
]

ACTIVATION_CHECKPOINTING = ("none", "blocks", "steps", "all")
"""Values of the factories' ``activation_checkpointing`` option (``False`` = ``"none"``, ``True`` = ``"all"``):
``"blocks"`` checkpoints the network's blocks (:func:`enable_activation_checkpointing`), ``"steps"`` the second-order
inner steps of the MAML family (``learner.checkpoint_inner_steps``), ``"all"`` both (steps where the learner has
them)."""

Target = type | str


def _saved_tensor_hooks_error(error: RuntimeError) -> RuntimeError:
    return RuntimeError(
        "activation checkpointing cannot run under torch.func.grad / vjp (no saved-tensor hooks there; "
        f"task_batching='vmap' falls back to the loop): {error}"
    )


def checkpoint_function(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)``: ``fn``'s saved tensors are
    dropped after the forward pass and recomputed during the backward pass.

    Non-reentrant checkpointing supports ``torch.autograd.grad`` inside ``fn`` and higher-order gradients through it
    (second-order inner steps). ``fn`` must compute the same thing when run again: every tensor it reads that can
    change before the backward pass (fast weights) has to be one of ``args``.

    Args:
        fn: the function to checkpoint.
        args: its positional arguments (tensors that require grad are differentiated through).
        kwargs: its keyword arguments.

    Returns:
        ``fn(*args, **kwargs)``.

    Raises:
        RuntimeError: under ``torch.func.grad`` / ``vjp``, which cannot run a checkpoint.
    """
    try:
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    except RuntimeError as error:
        if "saved tensor hooks" in str(error):
            raise _saved_tensor_hooks_error(error) from error
        raise


# --------------------------------------------------------------------------------------------- block checkpointing
class _CheckpointedForward:
    """The instance ``forward`` of a checkpointed block: recomputes the block with the tensors it held at call time."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.recomputing = 0

    def original(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        if self.recomputing or not torch.is_grad_enabled():
            return self.original(*args, **kwargs)
        names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
        tensors = [p for _, p in module.named_parameters()] + [b for _, b in module.named_buffers()]
        inputs = [a for a in args if isinstance(a, Tensor)] + [t for t in kwargs.values() if isinstance(t, Tensor)]
        if not any(t.requires_grad for t in tensors + inputs):
            return self.original(*args, **kwargs)
        n_args = len(args)

        def run(*flat: Any) -> Any:
            # the block with exactly the captured tensors (fast weights inside functional_call), also when recomputed
            self.recomputing += 1
            try:
                with _reparametrize_module(module, dict(zip(names, flat[n_args:])), tie_weights=True):
                    return self.original(*flat[:n_args], **kwargs)
            finally:
                self.recomputing -= 1

        return checkpoint_function(run, *args, *tensors)

    def __repr__(self) -> str:
        return f"checkpointed forward of {type(self.module).__name__}"


def _is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _CheckpointedForward)


def default_checkpoint_targets() -> tuple[type, ...]:
    """The block types :func:`enable_activation_checkpointing` wraps by default: MONAI's ``ResidualUnit`` and
    ``Convolution`` (the down and up blocks of ``monai.networks.nets.UNet``, :func:`~monai_metalearn.networks.
    unet_backbone`), ``ResNetBlock`` / ``ResNetBottleneck`` and DenseNet's dense layers and transitions. The conv
    blocks of :class:`~monai_metalearn.networks.ConvEncoder3D` (the children of its ``blocks``) are wrapped too."""
    from monai.networks.blocks import Convolution, ResidualUnit
    from monai.networks.nets.densenet import _DenseLayer, _Transition
    from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

    return (ResidualUnit, Convolution, ResNetBlock, ResNetBottleneck, _DenseLayer, _Transition)


def _check_targets(targets: Sequence[Target] | None) -> tuple[Target, ...] | None:
    if targets is None:
        return None
    if isinstance(targets, (str, type)):
        targets = [targets]
    out = tuple(targets)
    for t in out:
        if isinstance(t, str):
            continue
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise ConfigError(
                f"activation checkpointing targets must be nn.Module subclasses or name patterns, got {t!r}"
            )
    if not out:
        raise ConfigError("activation checkpointing targets is empty; pass None for the default blocks")
    return out


def _targets_of(model: nn.Module, targets: tuple[Target, ...] | None) -> list[tuple[str, nn.Module]]:
    """Outermost submodules (the model included) matching ``targets``, as ``(qualified name, module)``."""
    from .encoders import ConvEncoder3D

    types = tuple(t for t in targets if isinstance(t, type)) if targets is not None else default_checkpoint_targets()
    patterns = tuple(t for t in targets if isinstance(t, str)) if targets is not None else ()
    # by default the children of every ConvEncoder3D's ``blocks`` are targets too
    block_lists = {id(m.blocks) for m in model.modules() if isinstance(m, ConvEncoder3D)} if targets is None else set()
    found: list[tuple[str, nn.Module]] = []

    def visit(name: str, module: nn.Module, in_block_list: bool) -> None:
        if in_block_list or isinstance(module, types) or any(fnmatch.fnmatchcase(name, p) for p in patterns):
            found.append((name, module))
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child, id(module) in block_lists)

    visit("", model, False)
    return found


def enable_activation_checkpointing(model: nn.Module, targets: Sequence[Target] | None = None) -> nn.Module:
    """Checkpoint the blocks of ``model`` (in place): each keeps only its inputs in the forward pass and is
    recomputed, with the weights it ran with, during the backward pass.

    Exact under :func:`torch.func.functional_call` (fast weights) and for second-order gradients, see the module
    docstring. Without gradients (``torch.no_grad()``, inference) the blocks run as usual. Calling it again wraps only
    blocks that are not wrapped yet.

    Args:
        model: the network (modified in place and returned).
        targets: what to wrap: module types (``isinstance``) and/or :mod:`fnmatch` patterns of qualified module names
            (``"model.1.*"``, ``"blocks.[0-2]"``); only the outermost match of a branch is wrapped. ``None`` (default):
            :func:`default_checkpoint_targets` and the conv blocks of every
            :class:`~monai_metalearn.networks.ConvEncoder3D` inside ``model``.

    Returns:
        ``model``.

    Raises:
        ConfigError: ``targets`` holds something other than module types and strings, or nothing in ``model``
            matches it.

    Example::

        backbone = enable_activation_checkpointing(unet_backbone(feature_channels=16))
        checkpointed_modules(backbone)  # ['model.0', 'model.1.submodule.0', ...]
    """
    checked = _check_targets(targets)
    found = _targets_of(model, checked)
    if not found:
        what = "the default blocks (MONAI UNet/ResNet/DenseNet blocks, ConvEncoder3D blocks)" if checked is None else (
            f"targets={list(checked)}"
        )
        raise ConfigError(
            f"activation checkpointing: no submodule of {type(model).__name__} matches {what}; pass targets (module "
            "types or name patterns) to enable_activation_checkpointing"
        )
    for _, module in found:
        if not _is_checkpointed(module):
            module.forward = _CheckpointedForward(module)  # an instance attribute: class and parameter names unchanged
    return model


def disable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_activation_checkpointing` on every block of ``model`` (in place); returns ``model``."""
    for module in model.modules():
        if _is_checkpointed(module):
            del module.forward
    return model


def checkpointed_modules(model: nn.Module) -> list[str]:
    """Qualified names of the checkpointed blocks of ``model`` (``""`` for ``model`` itself)."""
    return [name for name, module in model.named_modules() if _is_checkpointed(module)]


def activation_checkpointing_mode(value: Any, key: str = "activation_checkpointing") -> str:
    """The :data:`ACTIVATION_CHECKPOINTING` value of a config entry: ``False``/``None`` -> ``"none"``, ``True`` ->
    ``"all"``, strings case-insensitive.

    Args:
        value: the entry.
        key: its name, for the error message.

    Raises:
        ConfigError: any other value.
    """
    if value is None or value is False:
        return "none"
    if value is True:
        return "all"
    if isinstance(value, str) and value.lower() in ACTIVATION_CHECKPOINTING:
        return value.lower()
    raise ConfigError(f"{key} must be a bool or one of {list(ACTIVATION_CHECKPOINTING)}, got {value!r}")


# --------------------------------------------------------------------------------------------- channels_last_3d
def to_channels_last_3d(x: Any) -> Any:
    """``x`` in ``torch.channels_last_3d`` memory format if it is a 5-D tensor, else unchanged (values equal)."""
    if isinstance(x, Tensor) and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _channels_last_pre_hook(module: nn.Module, args: tuple) -> tuple:
    return tuple(to_channels_last_3d(a) for a in args)


def is_channels_last_3d(model: nn.Module) -> bool:
    """Whether :func:`enable_channels_last_3d` was applied to ``model``."""
    return any(hook is _channels_last_pre_hook for hook in model._forward_pre_hooks.values())


def enable_channels_last_3d(model: nn.Module) -> nn.Module:
    """Store the 5-D parameters and buffers of ``model`` in ``torch.channels_last_3d`` and convert its 5-D inputs
    (a forward pre-hook, also under :func:`torch.func.functional_call`), in place; returns ``model``.

    Pays on CUDA (cuDNN's NDHWC kernels, tensor cores under AMP), not on the CPU (see the module docstring). The
    format survives ``model.to(device)`` and ``load_state_dict`` (``copy_`` keeps it). Calling it again does nothing.

    Args:
        model: the network.

    Returns:
        ``model``.
    """
    model._apply(to_channels_last_3d)  # what Module.to(memory_format=...) does, for the 5-D tensors only
    if not is_channels_last_3d(model):
        model.register_forward_pre_hook(_channels_last_pre_hook)
    return model
