"""Rule for `torch.nn.BatchNorm1d`, `BatchNorm2d` and `BatchNorm3d` in eval mode."""

from collections.abc import Collection

import torch
from torch import nn

from ..row_gradients import DenseRowGradient, RowGradient
from .registry import ModuleCall, register_layer_rule, rows_by_channels


def _unsupported_batch_norm(module: nn.modules.batchnorm._BatchNorm) -> str | None:
    if module.training or module.running_mean is None:
        return "it normalizes with batch statistics (training mode or no running statistics), so rows interact"
    return None


@register_layer_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, unsupported=_unsupported_batch_norm)
def batch_norm_row_gradients(
    module: nn.modules.batchnorm._BatchNorm, call: ModuleCall, names: Collection[str]
) -> dict[str, RowGradient]:
    r"""
    Row gradients of y[c, l] = xhat[c, l] * w[c] + bias[c] with the running statistics of eval mode,
    xhat[c, l] = (x[c, l] - running_mean[c]) / sqrt(running_var[c] + eps).

    Shapes: input x (B, C, *L), output gradients b (B, C, *L) flattened to (B, C, L), weight w (C,), bias (C,).

        g_w(z)[c]    = sum_l b[z, c, l] * xhat[z, c, l]                   (C,)   materialized
                     = sum_l b[z, c, l] (x[z, c, l] - running_mean[c]) / sqrt(running_var[c] + eps)
        g_bias(z)[c] = sum_l b[z, c, l]                                   (C,)   materialized

    The sum over l is a batched dot product, so the only (B, C, L) temporary is x - running_mean.
    """
    output_grad = rows_by_channels(call.output_grad)
    gradients: dict[str, RowGradient] = {}
    if "weight" in names:
        inputs = rows_by_channels(call.input())
        scale = torch.rsqrt(module.running_var + module.eps).to(inputs.dtype)
        centered = inputs - module.running_mean.to(inputs.dtype).unsqueeze(-1)
        gradients["weight"] = DenseRowGradient(torch.einsum("bcl,bcl->bc", output_grad, centered) * scale)
    if "bias" in names:
        gradients["bias"] = DenseRowGradient(output_grad.sum(dim=2))
    return gradients
