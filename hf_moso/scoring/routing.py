"""Routing of each scored parameter to a layer rule, to `torch.func` on its module, or to one row at a time."""

from dataclasses import dataclass, field

from torch import nn
from transformers.utils import logging

from ..parameters import ScoredParameters
from .layers import LayerRule, find_layer_rule
from .module_fallback import ModuleRowGradients


logger = logging.get_logger(__name__)


@dataclass
class ModuleRoute:
    """
    A module that owns scored parameters, hooked during the forward pass.

    `parameters` maps the module's local parameter names to their index in `ScoredParameters`. `rule` is None for a
    module without a layer rule, whose row gradients come from `fallback` (`torch.func` on the module alone).
    """

    name: str
    module: nn.Module
    parameters: dict[str, int]
    rule: LayerRule | None
    fallback: ModuleRowGradients | None = None


@dataclass
class ScoringPlan:
    """
    The path of every scored parameter of one model.

    `routes` lists the hooked modules. `row_fallback` contains the indices of parameters scored one row at a time
    (a backward pass per row), for gradients that no module call accounts for. `validated` turns True once the
    first batch has shown that the per-layer gradients of every routed parameter add up to the autograd gradient,
    and `row_loss_checked` once a user-given row loss function has matched the model's own loss.
    """

    routes: list[ModuleRoute]
    row_fallback: list[int] = field(default_factory=list)
    validated: bool = False
    row_loss_checked: bool = False

    def demote(self, indices: set[int], names: list[str], reason: str) -> None:
        """Move the parameters `indices` to the row-at-a-time path, logging the move once."""
        indices = indices - set(self.row_fallback)
        if not indices:
            return
        for route in self.routes:
            route.parameters = {local: index for local, index in route.parameters.items() if index not in indices}
        self.routes = [route for route in self.routes if route.parameters]
        self.row_fallback = sorted(set(self.row_fallback) | indices)
        shown = ", ".join(names[index] for index in sorted(indices))
        logger.warning(
            f"Scoring {shown} one row at a time (a backward pass per row, much slower): {reason}. The scores stay "
            "exact."
        )


def build_plan(model: nn.Module, parameters: ScoredParameters) -> ScoringPlan:
    """
    Route every scored parameter through each module that registers it.

    A weight tied between two modules (input embeddings and a language-model head) is registered by both, so both
    calls contribute to its row gradients and the parameter is still scored once. Modules without a rule are logged
    once, with the reason, when the plan is built.
    """
    index_of = {id(tensor): index for index, tensor in enumerate(parameters.tensors)}
    routes = []
    for name, module in model.named_modules():
        owned = {
            local: index_of[id(tensor)]
            for local, tensor in module._parameters.items()
            if tensor is not None and id(tensor) in index_of
        }
        if not owned:
            continue
        rule, reason = find_layer_rule(module)
        route = ModuleRoute(name=name or type(model).__name__, module=module, parameters=owned, rule=rule)
        if rule is None:
            route.fallback = ModuleRowGradients(module, route.name)
            logger.info(
                f"`{route.name}` ({type(module).__name__}): {reason}, so the row gradients of its parameters "
                f"{sorted(owned)} come from torch.func on this module alone."
            )
        routes.append(route)

    plan = ScoringPlan(routes=routes)
    routed = {index for route in routes for index in route.parameters.values()}
    orphans = set(range(len(parameters.tensors))) - routed
    if orphans:
        plan.demote(orphans, parameters.names, "no module registers these parameters")
    return plan
