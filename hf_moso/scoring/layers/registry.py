"""Registry of per-layer gradient rules: which layer types have one, and how a rule is called."""

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from ..row_gradients import RowGradient


@dataclass
class ModuleCall:
    """
    One call of a module in the forward pass of a batch of B rows, with the gradient of the summed row losses
    with respect to its output.

    Rows do not interact in eval mode, so `output_grad[z]` is the gradient of row z's own loss.
    """

    args: tuple
    kwargs: dict
    output_grad: torch.Tensor

    def input(self, position: int = 0, name: str = "input") -> torch.Tensor:
        """Return the argument at `position`, or the keyword argument `name` when it was passed by keyword."""
        if len(self.args) > position:
            return self.args[position]
        if name in self.kwargs:
            return self.kwargs[name]
        raise ValueError(f"The module was called without its {name!r} argument (position {position}).")


def rows_by_positions(tensor: torch.Tensor, trailing: int) -> torch.Tensor:
    """View (B, *S, *F) with `trailing` feature dimensions F as (B, S, *F), S the product of the position dims."""
    split = tensor.dim() - trailing
    return tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:split]), *tensor.shape[split:])


def rows_by_channels(tensor: torch.Tensor) -> torch.Tensor:
    """View (B, C, *L) as (B, C, L), L the product of the position dims (1 when there are none)."""
    return tensor.reshape(tensor.shape[0], tensor.shape[1], math.prod(tensor.shape[2:]))


LayerRuleFunction = Callable[[nn.Module, ModuleCall, Collection[str]], dict[str, RowGradient]]
"""`rule(module, call, names)` returns every row's gradient of each parameter in `names` (names local to `module`)."""

UnsupportedCheck = Callable[[nn.Module], str | None]
"""Returns why a module of a registered type cannot use the rule (a configuration it does not handle), or None."""


@dataclass(frozen=True)
class LayerRule:
    """A registered rule: the layer types it handles, the function, and the configurations it leaves to a fallback."""

    layer_types: tuple[type[nn.Module], ...]
    function: LayerRuleFunction
    unsupported: UnsupportedCheck = field(default=lambda module: None)

    @property
    def name(self) -> str:
        return self.function.__name__


LAYER_RULES: dict[type[nn.Module], LayerRule] = {}
"""Layer type -> rule, filled by `register_layer_rule`."""


def register_layer_rule(*layer_types: type[nn.Module], unsupported: UnsupportedCheck | None = None):
    """
    Register the decorated function as the rule of `layer_types`.

    Example:
        >>> @register_layer_rule(MyLinear)
        ... def my_linear_row_gradients(module, call, names):
        ...     ...
    """
    if not layer_types:
        raise ValueError("`register_layer_rule` needs at least one layer type.")

    def decorate(function: LayerRuleFunction) -> LayerRuleFunction:
        rule = LayerRule(layer_types, function, unsupported or (lambda module: None))
        for layer_type in layer_types:
            LAYER_RULES[layer_type] = rule
        return function

    return decorate


def find_layer_rule(module: nn.Module) -> tuple[LayerRule | None, str]:
    """
    Return the rule for `module` and an empty reason, or None and the reason why no rule applies.

    A subclass of a registered type uses the parent's rule only when it keeps the parent's `forward`: a subclass
    that computes something else would make the rule's formula wrong.
    """
    module_type = type(module)
    for parent in module_type.__mro__:
        rule = LAYER_RULES.get(parent)
        if rule is None:
            continue
        if parent is not module_type and module_type.forward is not parent.forward:
            return None, f"{module_type.__name__} subclasses {parent.__name__} but overrides `forward`"
        reason = rule.unsupported(module)
        if reason:
            return None, reason
        return rule, ""
    return None, f"no rule for {module_type.__name__} (layers with a rule: {', '.join(supported_layers())})"


def supported_layers() -> list[str]:
    """Names of the layer types that have a rule, sorted, as error messages and docs list them."""
    return sorted({f"{layer_type.__module__}.{layer_type.__qualname__}" for layer_type in LAYER_RULES})
