"""Rule for `torch.nn.GroupNorm`."""

from collections.abc import Collection

from torch import nn
from torch.nn import functional as F

from ..row_gradients import DenseRowGradient, RowGradient
from .registry import ModuleCall, register_layer_rule, rows_by_channels


@register_layer_rule(nn.GroupNorm)
def group_norm_row_gradients(module: nn.GroupNorm, call: ModuleCall, names: Collection[str]) -> dict[str, RowGradient]:
    r"""
    Row gradients of y[c, l] = xhat[c, l] * w[c] + c_bias[c], with xhat normalized over each group of channels and
    all positions l of one row.

    Shapes: input x (B, C, *L), output gradients b (B, C, *L) flattened to (B, C, L), weight w (C,), bias (C,).

        g_w(z)[c] = sum_l b[z, c, l] * xhat[z, c, l]                      (C,)   materialized
        g_bias(z)[c] = sum_l b[z, c, l]                                   (C,)   materialized
    """
    output_grad = call.output_grad
    gradients: dict[str, RowGradient] = {}
    if "weight" in names:
        normalized = F.group_norm(call.input(), module.num_groups, eps=module.eps)
        gradients["weight"] = DenseRowGradient(rows_by_channels(output_grad * normalized).sum(dim=2))
    if "bias" in names:
        gradients["bias"] = DenseRowGradient(rows_by_channels(output_grad).sum(dim=2))
    return gradients
