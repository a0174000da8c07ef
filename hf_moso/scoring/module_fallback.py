r"""
Row gradients of a module that has no layer rule, from `torch.func` on that module alone.

Given the module's inputs for a batch of B rows and the gradient b of the summed row losses with respect to its
outputs, the gradient of row z with respect to a parameter theta of the module is

    g_z = d/dtheta sum(module(x_z) * b_z)

where x_z is row z of every input that has a leading batch dimension (other inputs are passed unchanged). This is
a vector-Jacobian product of the module on one row, mapped over the rows with `torch.func.vmap`. Modules that
`vmap` cannot run (data-dependent control flow, random operations) go through the rows one at a time instead.
"""

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils import _pytree as pytree
from transformers.utils import logging

from .row_gradients import DenseRowGradient


logger = logging.get_logger(__name__)


def _has_rows(value, batch_size: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch_size


def _tensor_outputs(output) -> list:
    return pytree.tree_leaves(output)


class ModuleRowGradients:
    """
    Computes the row gradients of the named parameters of one module from its recorded calls.

    `vmap` is tried first. After it fails once on a module, that module is handled one row at a time, and the
    switch is logged once.
    """

    def __init__(self, module: nn.Module, module_name: str):
        self.module = module
        self.module_name = module_name
        self.use_vmap = True

    def __call__(
        self, names: list[str], args: tuple, kwargs: dict, output_grads: dict[int, torch.Tensor], batch_size: int
    ) -> dict[str, DenseRowGradient]:
        """
        Return the row gradients of the parameters `names` for one call of the module.

        Args:
            names: local names of the module's parameters to differentiate.
            args, kwargs: the call's arguments.
            output_grads: gradient for each tensor output, keyed by its position among the output's pytree leaves.
            batch_size: B; inputs and output gradients with this leading dimension are split into rows.
        """
        leaves, spec = pytree.tree_flatten((args, kwargs))
        # Detached, so that the row gradients are plain values and not functions of the recorded activations.
        leaves = [leaf.detach() if torch.is_tensor(leaf) else leaf for leaf in leaves]
        row_positions = [index for index, leaf in enumerate(leaves) if _has_rows(leaf, batch_size)]
        parameters = {name: self.module._parameters[name].detach() for name in names}
        positions = sorted(output_grads)
        grads = [output_grads[position] for position in positions]

        if self.use_vmap:
            try:
                values = self._vmapped(parameters, leaves, spec, row_positions, positions, grads)
            except Exception as error:  # noqa: BLE001 - any failure of vmap means "use the loop", and is logged
                self.use_vmap = False
                logger.info(
                    f"torch.func.vmap cannot run `{self.module_name}` ({type(self.module).__name__}): "
                    f"{type(error).__name__}: {error}. Its row gradients are computed one row at a time."
                )
            else:
                return {name: DenseRowGradient(values[name]) for name in names}
        values = self._row_by_row(parameters, leaves, spec, row_positions, positions, grads, batch_size)
        return {name: DenseRowGradient(values[name]) for name in names}

    def _row_output_product(self, parameters, leaves, spec, row_positions, row_leaves, positions, row_grads):
        """sum over the tapped outputs of module(row) * gradient, for one row given with a batch dimension of 1."""
        leaves = list(leaves)
        for position, value in zip(row_positions, row_leaves):
            leaves[position] = value
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        outputs = _tensor_outputs(functional_call(self.module, parameters, args, kwargs))
        total = 0.0
        for position, row_grad in zip(positions, row_grads):
            total = total + (outputs[position] * row_grad).sum()
        return total

    def _vmapped(self, parameters, leaves, spec, row_positions, positions, grads) -> dict[str, torch.Tensor]:
        def row_product(parameters, row_leaves, row_grads):
            row_leaves = [value.unsqueeze(0) for value in row_leaves]
            row_grads = [value.unsqueeze(0) for value in row_grads]
            return self._row_output_product(parameters, leaves, spec, row_positions, row_leaves, positions, row_grads)

        mapped = [leaves[position] for position in row_positions]
        return vmap(grad(row_product), in_dims=(None, 0, 0))(parameters, mapped, grads)

    def _row_by_row(self, parameters, leaves, spec, row_positions, positions, grads, batch_size):
        rows = {name: [] for name in parameters}
        with torch.enable_grad():
            for row in range(batch_size):
                trainable = {name: tensor.clone().requires_grad_(True) for name, tensor in parameters.items()}
                row_leaves = [leaves[position][row : row + 1] for position in row_positions]
                row_grads = [value[row : row + 1] for value in grads]
                total = self._row_output_product(
                    trainable, leaves, spec, row_positions, row_leaves, positions, row_grads
                )
                names = list(trainable)
                values = torch.autograd.grad(total, [trainable[name] for name in names], allow_unused=True)
                for name, value in zip(names, values):
                    rows[name].append(torch.zeros_like(trainable[name]) if value is None else value)
        return {
            name: torch.stack(values) if values else parameters[name].new_zeros((0, *parameters[name].shape))
            for name, values in rows.items()
        }
