"""Rule for the transposed linear layer `Conv1D` of transformers (GPT-2 and related models)."""

from collections.abc import Collection

from transformers.pytorch_utils import Conv1D

from ..row_gradients import DenseRowGradient, OuterProductRowGradient, RowGradient
from .registry import ModuleCall, register_layer_rule, rows_by_positions


@register_layer_rule(Conv1D)
def transformers_conv1d_row_gradients(
    module: Conv1D, call: ModuleCall, names: Collection[str]
) -> dict[str, RowGradient]:
    r"""
    Row gradients of y_s = a_s W + c, the linear layer with its weight stored as (in, out).

    Shapes: inputs a (B, *S, I), output gradients b (B, *S, O), weight W (I, O), bias c (O,).

        g_W(z) = sum_s a[z, s] b[z, s]^T                                   (I, O)   outer-product form
        g_c(z) = sum_s b[z, s]                                             (O,)     materialized
    """
    output_grad = rows_by_positions(call.output_grad, 1)
    gradients: dict[str, RowGradient] = {}
    if "weight" in names:
        inputs = rows_by_positions(call.input(name="x"), 1)
        gradients["weight"] = OuterProductRowGradient(
            inputs.unsqueeze(1), output_grad.unsqueeze(1), module.weight.shape
        )
    if "bias" in names:
        gradients["bias"] = DenseRowGradient(output_grad.sum(dim=1))
    return gradients
