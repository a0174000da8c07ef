"""Selection of the parameters whose gradients MoSo scores."""

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ScoredParameters:
    """
    The parameters that enter the gradients of the MoSo score, with the optimizer parameter group of each.

    `names[i]` is the name of `tensors[i]` in `model.named_parameters()`. That listing names a tied weight once,
    under its first name, so a tied weight is scored once. `groups[i]` is the index of the optimizer parameter group
    that updates the tensor, which selects the learning rate applied to it.
    """

    names: list[str]
    tensors: list[nn.Parameter]
    groups: list[int]

    @property
    def num_groups(self) -> int:
        return max(self.groups) + 1

    def numel(self) -> int:
        return sum(tensor.numel() for tensor in self.tensors)


def select_parameters(
    model: nn.Module, patterns: list[str] | None = None, parameter_groups: dict[str, int] | None = None
) -> ScoredParameters:
    """
    Select the scored parameters of `model`.

    Args:
        model: the model whose `named_parameters()` are selected from.
        patterns: `fnmatch` patterns on parameter names, and presets written `preset:NAME` or `preset:NAME:K` (see
            `PARAMETER_PRESETS`); a parameter is selected when any pattern or preset selects it. `None` selects every
            parameter with `requires_grad=True`.
        parameter_groups: optimizer parameter group of each parameter name, as recorded in the snapshot manifest.
            `None` puts every parameter in group 0.

    Raises:
        ValueError: when nothing is selected, or when a selected parameter has no recorded optimizer group (the
            optimizer never updated it, so no learning rate applies to it).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> select_parameters(model, ["1.*"]).names
        ['1.weight', '1.bias']
        >>> select_parameters(model, ["preset:head"]).names
        ['1.weight', '1.bias']
    """
    named = list(model.named_parameters())
    if patterns is None:
        selected = [(name, tensor) for name, tensor in named if tensor.requires_grad]
        if not selected:
            raise ValueError(
                "The model has no trainable parameter (every `requires_grad` is False), so there is nothing to score. "
                "Unfreeze parameters or name them in `moso_parameters`."
            )
    else:
        name_patterns = [pattern for pattern in patterns if not pattern.startswith(PRESET_PREFIX)]
        from_presets = set()
        for pattern in patterns:
            if pattern.startswith(PRESET_PREFIX):
                from_presets |= resolve_preset(model, pattern)
        selected = [
            (name, tensor)
            for name, tensor in named
            if name in from_presets or any(fnmatch.fnmatchcase(name, p) for p in name_patterns)
        ]
        if not selected:
            examples = ", ".join(name for name, _ in named[:5])
            raise ValueError(
                f"No parameter name matches `moso_parameters`={patterns}. Patterns use fnmatch syntax on the names of "
                f"`model.named_parameters()`, for example: {examples}."
            )

    if parameter_groups is None:
        groups = [0] * len(selected)
    else:
        missing = [name for name, _ in selected if name not in parameter_groups]
        if missing:
            raise ValueError(
                f"The optimizer did not update the selected parameters {missing[:5]} (total {len(missing)}), so no "
                "learning rate is recorded for them. Leave them out of `moso_parameters`, or make them trainable "
                "before training."
            )
        groups = [parameter_groups[name] for name, _ in selected]

    return ScoredParameters(
        names=[name for name, _ in selected], tensors=[tensor for _, tensor in selected], groups=groups
    )


def optimizer_parameter_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Map each parameter name of `model` that `optimizer` updates to the index of its parameter group."""
    group_of_tensor = {}
    for index, group in enumerate(optimizer.param_groups):
        for tensor in group["params"]:
            group_of_tensor[id(tensor)] = index
    return {name: group_of_tensor[id(tensor)] for name, tensor in model.named_parameters() if id(tensor) in group_of_tensor}


# ----------------------------------------------------------------------------------------------------------------
# Presets

PRESET_PREFIX = "preset:"

PresetFunction = Callable[[nn.Module, int | None], set[str]]
"""`preset(model, k)` returns the names (in `model.named_parameters()`) of the trainable parameters it selects."""


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, tensor) for name, tensor in model.named_parameters() if tensor.requires_grad]


def _qualified_name(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _task_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper, or `model` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and getattr(model, "peft_config", None) is not None:
        return get_base_model()
    return model


def head_preset(model: nn.Module, k: int | None) -> set[str]:
    """
    Select the trainable parameters of the task head: those outside the backbone (`model.base_model` of a transformers
    model, such as `bert` in `BertForSequenceClassification`), or for another module the parameters of its last
    registered direct child that has trainable parameters.
    """
    task_model = _task_model(model)
    backbone = getattr(task_model, "base_model", None)
    if isinstance(backbone, nn.Module) and backbone is not task_model:
        task_prefix = _qualified_name(model, task_model)
        backbone_prefix = _qualified_name(model, backbone)
        return {
            name
            for name, _ in _trainable(model)
            if _under(name, task_prefix) and not _under(name, backbone_prefix)
        }
    if backbone is task_model:
        raise ValueError(
            f"{type(task_model).__name__} is a backbone without a task head, so `preset:head` selects nothing. Use "
            "a model with a head (for example `AutoModelForSequenceClassification`) or name the parameters."
        )
    children = [
        (name, child) for name, child in model.named_children() if any(p.requires_grad for p in child.parameters())
    ]
    if not children:
        return set()
    last = children[-1][0]
    return {name for name, _ in _trainable(model) if _under(name, last)}


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the repeated blocks: the `nn.ModuleList` of at least two same-class modules with the most parameters."""
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(child) for child in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            candidates.append((size, name, module))
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no `nn.ModuleList` of repeated blocks, so `preset:last_blocks` does not "
            "apply. Select the parameters with name patterns instead."
        )
    size, name, module = max(candidates, key=lambda candidate: candidate[0])
    return name, module


def last_blocks_preset(model: nn.Module, k: int | None) -> set[str]:
    """
    Select the trainable parameters of the last k repeated blocks (default 1) and of every module registered after
    them: the final norm, the pooler and the task head.
    """
    k = 1 if k is None else k
    list_name, blocks = _block_list(model)
    if k > len(blocks):
        raise ValueError(f"`preset:last_blocks:{k}` asks for {k} blocks, but `{list_name}` has {len(blocks)}.")
    first = len(blocks) - k
    block_prefixes = [f"{list_name}.{index}" if list_name else str(index) for index in range(len(blocks))]
    selected, after_blocks = set(), False
    for name, _ in model.named_parameters():
        if any(_under(name, prefix) for prefix in block_prefixes[first:]):
            selected.add(name)
            after_blocks = True
        elif after_blocks and not _under(name, list_name):
            selected.add(name)
    trainable = {name for name, _ in _trainable(model)}
    return selected & trainable


def adapters_preset(model: nn.Module, k: int | None) -> set[str]:
    """Select the trainable parameters of PEFT adapter layers (`lora_A`, `lora_B`, ... of the `peft` tuner layers)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return set()
    names = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for layer_name in module.adapter_layer_names:
            prefix = f"{module_name}.{layer_name}" if module_name else layer_name
            names |= {name for name, _ in _trainable(model) if _under(name, prefix)}
    return names


def trainable_preset(model: nn.Module, k: int | None) -> set[str]:
    """Select every trainable parameter (`requires_grad=True`), the same as leaving `moso_parameters` unset."""
    return {name for name, _ in _trainable(model)}


PARAMETER_PRESETS: dict[str, PresetFunction] = {
    "trainable": trainable_preset,
    "head": head_preset,
    "last_blocks": last_blocks_preset,
    "adapters": adapters_preset,
}
"""Preset name -> function; `preset:last_blocks:K` passes K, the other presets take no number."""

PRESETS_WITH_COUNT = {"last_blocks"}


def parse_preset(entry: str) -> tuple[str, int | None]:
    """
    Split `preset:NAME` or `preset:NAME:K` into the preset name and K.

    Raises:
        ValueError: for an unknown name or a K that is not a positive int, listing the valid presets.
    """
    parts = entry[len(PRESET_PREFIX) :].split(":")
    name = parts[0]
    valid = ", ".join(
        f"preset:{preset}" + ("[:K]" if preset in PRESETS_WITH_COUNT else "") for preset in PARAMETER_PRESETS
    )
    if name not in PARAMETER_PRESETS or len(parts) > 2:
        raise ValueError(f"Unknown parameter preset {entry!r}. Valid presets: {valid}.")
    if len(parts) == 1:
        return name, None
    if name not in PRESETS_WITH_COUNT or not parts[1].isdigit() or int(parts[1]) < 1:
        raise ValueError(
            f"Invalid parameter preset {entry!r}: only `last_blocks` takes a count, a positive int. Valid presets: "
            f"{valid}."
        )
    return name, int(parts[1])


def resolve_preset(model: nn.Module, entry: str) -> set[str]:
    """
    Return the names of the trainable parameters of `model` that the preset `entry` selects.

    Raises:
        ValueError: for an invalid preset, or one that selects nothing in this model.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(num_hidden_layers=2, hidden_size=8,
        ...     num_attention_heads=2, intermediate_size=16, vocab_size=30))
        >>> sorted(resolve_preset(model, "preset:head"))
        ['classifier.bias', 'classifier.weight']
    """
    name, count = parse_preset(entry)
    selected = PARAMETER_PRESETS[name](model, count)
    if not selected:
        raise ValueError(
            f"The parameter preset {entry!r} selects no trainable parameter of {type(model).__name__}. Check that the "
            "model has what the preset names (a task head, PEFT adapters, ...) and that it is trainable, or select "
            "the parameters with name patterns."
        )
    return selected
