"""Selection of the parameters whose gradients MoSo scores."""

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ScoredParameters:
    """
    The parameters that enter the gradients of the MoSo score, with the optimizer parameter group of each.

    `names[i]` is the name of `tensors[i]` in `model.named_parameters()` (which lists a tied weight once, under its
    first name, so a tied weight is scored once) and `groups[i]` the index of the optimizer parameter group that
    updates it, which selects the learning rate applied to it.
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
        patterns: `fnmatch` patterns on parameter names; a parameter is selected when any pattern matches. `None`
            selects every parameter with `requires_grad=True`.
        parameter_groups: optimizer parameter group of each parameter name, as recorded in the snapshot manifest.
            `None` puts every parameter in group 0.

    Raises:
        ValueError: when nothing is selected, or when a selected parameter has no recorded optimizer group (the
            optimizer never updated it, so no learning rate applies to it).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> select_parameters(model, ["1.*"]).names
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
        selected = [(name, tensor) for name, tensor in named if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
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
