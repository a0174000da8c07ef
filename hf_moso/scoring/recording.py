"""
Recording of module calls during a forward pass, and delivery of their output gradients during the backward pass.

Each call of a routed module gets its tensor outputs wrapped in `GradientTap`, an identity whose backward hands
the output gradient to the recorder. Every tap also takes a scalar `anchor`, so `torch.autograd.grad(loss,
anchor)` runs the backward pass only as far down as the earliest tapped output: no parameter gradient is computed
and nothing below the scored layers is differentiated.
"""

import contextlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .routing import ModuleRoute, ScoringPlan


class GradientTap(torch.autograd.Function):
    """Identity on a module output whose backward passes the output gradient to `receive` before moving on."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, anchor: torch.Tensor, receive: Callable[[torch.Tensor], None]):
        ctx.receive = receive
        ctx.anchor_dtype = anchor.dtype
        # A copy, because autograd forbids in-place changes (`hidden += residual`) to a view returned by a custom
        # Function; the original output is usually freed right away.
        return output.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.receive(grad)
        return grad, grad.new_zeros((), dtype=ctx.anchor_dtype), None


@dataclass
class RecordedCall:
    """One call of a routed module: its arguments and the gradients of its tapped outputs as they arrive."""

    route: ModuleRoute
    args: tuple
    kwargs: dict
    waiting: int
    output_grads: dict[int, torch.Tensor] = field(default_factory=dict)

    def release(self) -> None:
        """Drop the references to activations and gradients once the call's row gradients are computed."""
        self.args, self.kwargs, self.output_grads = (), {}, {}


class UnitRecorder:
    """
    Hooks the routed modules of `plan` for the forward pass of one batch of `batch_size` rows.

    `on_complete(call)` runs during the backward pass as soon as every tapped output of a call with a layer rule
    has its gradient. Calls of fallback modules are kept in `fallback_calls` for after the backward pass.
    `calls_per_parameter` counts, per scored parameter index, the recorded calls that contribute to it. A routed
    module whose output has no batch dimension of `batch_size` cannot be split into rows, and is listed in
    `not_row_wise`.
    """

    def __init__(
        self,
        plan: ScoringPlan,
        batch_size: int,
        anchor: torch.Tensor,
        on_complete: Callable[[RecordedCall], None],
    ):
        self.plan = plan
        self.batch_size = batch_size
        self.anchor = anchor
        self.on_complete = on_complete
        self.calls: list[RecordedCall] = []
        self.calls_per_parameter: dict[int, int] = defaultdict(int)
        self.not_row_wise: dict[str, str] = {}
        self.recording = False
        self.receiving = False

    @contextlib.contextmanager
    def hooks(self):
        """Register the hooks on every routed module for the duration of the block."""
        handles = []
        try:
            for route in self.plan.routes:
                if route.rule is not None and isinstance(route.module, nn.Embedding):
                    handles.append(route.module.register_forward_pre_hook(self._expand_broadcast_indices))
                handles.append(
                    route.module.register_forward_hook(self._make_forward_hook(route), with_kwargs=True)
                )
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def forward_pass(self):
        """Record the calls made inside the block (and not those of a recomputation during the backward pass)."""
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    @contextlib.contextmanager
    def backward_pass(self):
        """Deliver output gradients only inside the block, not in later backward passes over the same graph."""
        self.receiving = True
        try:
            yield
        finally:
            self.receiving = False

    def _expand_broadcast_indices(self, module: nn.Module, args: tuple):
        # Position ids built with batch dimension 1 broadcast over the batch later, which adds up the gradients of all
        # rows. Looking them up once per row keeps each row's gradient apart and gives the same sum.
        if not self.recording or not args or not torch.is_tensor(args[0]):
            return None
        indices = args[0]
        if self.batch_size > 1 and indices.dim() >= 2 and indices.shape[0] == 1:
            return (indices.expand(self.batch_size, *indices.shape[1:]), *args[1:])
        return None

    def _make_forward_hook(self, route: ModuleRoute):
        def hook(module, args, kwargs, output):
            if not self.recording or route.name in self.not_row_wise:
                return None
            leaves, spec = pytree.tree_flatten(output)
            tapped = [
                position
                for position, leaf in enumerate(leaves)
                if torch.is_tensor(leaf) and leaf.requires_grad and leaf.is_floating_point()
            ]
            if not tapped:
                return None
            if route.rule is not None and len(leaves) != 1:
                self.not_row_wise[route.name] = f"it returned {len(leaves)} values, the layer rule expects one tensor"
                return None
            for position in tapped:
                leaf = leaves[position]
                if leaf.dim() == 0 or leaf.shape[0] != self.batch_size:
                    self.not_row_wise[route.name] = (
                        f"an output has shape {tuple(leaf.shape)}, without a leading batch dimension of "
                        f"{self.batch_size} rows"
                    )
                    return None

            call = RecordedCall(route=route, args=args, kwargs=kwargs, waiting=len(tapped))
            self.calls.append(call)
            for index in route.parameters.values():
                self.calls_per_parameter[index] += 1
            for position in tapped:
                leaves[position] = GradientTap.apply(leaves[position], self.anchor, self._receiver(call, position))
            return pytree.tree_unflatten(leaves, spec)

        return hook

    def _receiver(self, call: RecordedCall, position: int):
        def receive(grad: torch.Tensor) -> None:
            if not self.receiving or position in call.output_grads:
                return
            call.output_grads[position] = grad
            call.waiting -= 1
            if call.waiting == 0 and call.route.rule is not None:
                self.on_complete(call)

        return receive

    def close(self) -> None:
        """
        Drop the recorded calls and the completion callback once the batch is done.

        The autograd graph keeps each `GradientTap` backward context, and through its receiver this recorder, alive
        for as long as any tensor of the graph is referenced. The calls' activations and what `on_complete` reaches
        reference such tensors. That cycle runs through the graph, where Python's garbage collector cannot see it,
        so without `close` every batch's activations would stay in memory.
        """
        for call in self.calls:
            call.release()
        self.calls = []
        self.on_complete = None

    @property
    def fallback_calls(self) -> list[RecordedCall]:
        return [call for call in self.calls if call.route.rule is None and call.output_grads]
