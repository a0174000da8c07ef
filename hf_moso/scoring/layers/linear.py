"""Rule for `torch.nn.Linear`."""

from collections.abc import Collection

from torch import nn

from ..row_gradients import DenseRowGradient, OuterProductRowGradient, RowGradient
from .registry import ModuleCall, register_layer_rule, rows_by_positions


@register_layer_rule(nn.Linear)
def linear_row_gradients(module: nn.Linear, call: ModuleCall, names: Collection[str]) -> dict[str, RowGradient]:
    r"""
    Row gradients of y_s = W a_s + c at every position s of a row, with any number of position dimensions.

    Shapes: inputs a (B, *S, I), output gradients b (B, *S, O), weight W (O, I), bias c (O,); the position
    dimensions are flattened to S.

        g_W(z) = sum_s b[z, s] a[z, s]^T                                   (O, I)   outer-product form
        g_c(z) = sum_s b[z, s]                                             (O,)     materialized

    so that gbar_W . g_W(z) = sum_s b_s^T Gbar a_s and |g_W(z)|^2 = sum_{s,t} (a_s . a_t)(b_s . b_t).
    """
    output_grad = rows_by_positions(call.output_grad, 1)
    gradients: dict[str, RowGradient] = {}
    if "weight" in names:
        inputs = rows_by_positions(call.input(), 1)
        gradients["weight"] = OuterProductRowGradient(
            output_grad.unsqueeze(1), inputs.unsqueeze(1), module.weight.shape
        )
    if "bias" in names:
        gradients["bias"] = DenseRowGradient(output_grad.sum(dim=1))
    return gradients
