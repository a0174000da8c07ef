"""
Sharded models: full tensors of FSDP2 parameters, and an unsharded copy of an FSDP2 model for scoring.

torch FSDP2 (`torch.distributed.fsdp.fully_shard`) keeps each parameter as a `DTensor` of which every process
holds one shard, and gathers the full parameters in hooks around each module's forward and backward pass. Those
hooks are collective operations, so every process would have to run the same number of forward and backward
passes in lockstep. MoSo's per-row passes differ between processes (each scores its own rows, one backward pass
per row for the per-row backend), so scoring runs on an unsharded copy of the model instead.
"""

import dataclasses
import functools
import inspect
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn

from .parameters import ScoredParameters


# FSDP2 stores its state in module attributes whose names start with this prefix (torch 2.13,
# `torch.distributed._composable.contract`) and marks managed modules with the two flags below.
_COMPOSABLE_STATE_PREFIX = "__composable_api_state_key"
_FSDP_FLAGS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
# Sets of hook ids that qualify the hooks of the dictionaries above.
_HOOK_ID_DICTS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _dtensor_class():
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _fsdp_module_class():
    if not dist.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def is_sharded_tensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a `DTensor`, whose data is spread over several processes."""
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """
    Return the whole of `tensor` as a plain tensor on this process, detached from autograd.

    For a `DTensor` this gathers the shards of every process, a collective operation that every process must
    call in the same order. Other tensors are returned detached, without a copy.
    """
    if is_sharded_tensor(tensor):
        with torch.no_grad():
            return tensor.full_tensor().detach()
    return tensor.detach()


def is_fsdp_model(model: nn.Module) -> bool:
    """Whether `model` or one of its submodules is wrapped by FSDP2, or has a `DTensor` parameter."""
    fsdp_module = _fsdp_module_class()
    if fsdp_module is not None and any(isinstance(module, fsdp_module) for module in model.modules()):
        return True
    return any(is_sharded_tensor(tensor) for tensor in model.parameters())


def check_supported_sharding(model: nn.Module) -> None:
    """
    Raise `NotImplementedError` for a model wrapped by FSDP1 (`FullyShardedDataParallel`), whose flattened
    parameters do not map back to named per-layer tensors.
    """
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise NotImplementedError(
            "MoSo cannot score a model wrapped by FSDP1 (`FullyShardedDataParallel`). Use FSDP2 instead: "
            "`torch.distributed.fsdp.fully_shard`, `fsdp_version: 2` in the Accelerate configuration file, or "
            "`fsdp_config={'version': 2}` in the training arguments (the default of transformers 5)."
        )


def _original_class(module: nn.Module) -> type:
    # FSDP2 swaps each wrapped module's class for a subclass of (FSDPModule, original class).
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None or not isinstance(module, fsdp_module):
        return type(module)
    return next(cls for cls in type(module).__mro__ if issubclass(cls, nn.Module) and not issubclass(cls, fsdp_module))


def _is_fsdp_hook(hook) -> bool:
    function = inspect.unwrap(hook.func if isinstance(hook, functools.partial) else hook)
    function = getattr(function, "__func__", function)
    return getattr(function, "__module__", "").startswith("torch.distributed.fsdp")


def _copy_tensor(tensor: torch.Tensor, copies: dict[int, torch.Tensor]) -> torch.Tensor:
    # Tied tensors are one object in the model, so they stay one object in the copy.
    if id(tensor) not in copies:
        data = full_tensor(tensor).clone()
        if isinstance(tensor, nn.Parameter):
            data = nn.Parameter(data, requires_grad=tensor.requires_grad)
        copies[id(tensor)] = data
    return copies[id(tensor)]


def _copy_module(module: nn.Module, copies: dict[int, object]) -> nn.Module:
    if id(module) in copies:
        return copies[id(module)]
    cls = _original_class(module)
    copy = cls.__new__(cls)
    copies[id(module)] = copy

    attributes = {}
    for name, value in module.__dict__.items():
        if name.startswith(_COMPOSABLE_STATE_PREFIX) or name in _FSDP_FLAGS:
            continue
        if inspect.ismethod(value) and value.__self__ is module:
            # A forward replaced on the instance (Accelerate's mixed-precision wrapper) must call the copy.
            value = value.__func__.__get__(copy, cls)
        attributes[name] = value

    attributes["_parameters"] = {
        name: None if tensor is None else _copy_tensor(tensor, copies) for name, tensor in module._parameters.items()
    }
    attributes["_buffers"] = {
        name: None if tensor is None else _copy_tensor(tensor, copies) for name, tensor in module._buffers.items()
    }
    attributes["_modules"] = {
        name: None if child is None else _copy_module(child, copies) for name, child in module._modules.items()
    }
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            attributes[name] = OrderedDict(
                (key, hook) for key, hook in module.__dict__[name].items() if not _is_fsdp_hook(hook)
            )
    kept_hooks = {key for name in _HOOK_DICTS for key in attributes.get(name, {})}
    for name in _HOOK_ID_DICTS:
        if name in module.__dict__:
            entries = module.__dict__[name]
            if isinstance(entries, dict):
                attributes[name] = type(entries)((key, flag) for key, flag in entries.items() if key in kept_hooks)
            else:
                attributes[name] = type(entries)(key for key in entries if key in kept_hooks)

    copy.__dict__.update(attributes)
    return copy


def unsharded_copy(model: nn.Module) -> nn.Module:
    """
    Build a plain copy of an FSDP2 model, with every parameter and buffer in full on this process.

    Every module of the copy has its original class (FSDP2's wrapper class removed) and keeps the hooks that FSDP2
    did not register; other attributes (a transformers `config`, say) are shared with `model`. Parameters and
    buffers are new tensors, so changing the copy never changes `model`, and tied weights stay tied. Gathering
    the shards is a collective operation: every process must call this function.

    Memory: the copy holds the whole model on every process, as the per-row backends hold float64 gradient sums
    of every scored parameter anyway (twice the size of a float32 model).

    Example:
        ```python
        # With 2 processes:
        fully_shard(model)
        plain = unsharded_copy(model)  # every process now holds all of `model`'s weights in `plain`
        ```
    """
    return _copy_module(model, {})


def unshard_for_scoring(model: nn.Module, parameters: ScoredParameters) -> tuple[nn.Module, ScoredParameters]:
    """
    Return an unsharded copy of an FSDP2 `model` and the same scored parameters, taken from the copy by name.

    Each process then scores its own rows with no collective operation inside the forward and backward passes, so
    processes with different numbers of rows do not wait on each other, and the scores are those of the plain model.
    """
    # NOTE: tested with `fully_shard` applied by hand under torchrun on CPU. `MoSoTrainer` with Accelerate's FSDP2
    # plugin takes the same path, but that plugin needs a GPU and has not been run.
    copy = unsharded_copy(model)
    named = dict(copy.named_parameters())
    return copy, dataclasses.replace(parameters, tensors=[named[name] for name in parameters.names])
