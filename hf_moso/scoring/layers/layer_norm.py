"""Rules for `torch.nn.LayerNorm` and `torch.nn.RMSNorm`."""

from collections.abc import Collection

import torch
from torch import nn
from torch.nn import functional as F

from ..row_gradients import DenseRowGradient, RowGradient
from .registry import ModuleCall, register_layer_rule, rows_by_positions


def _affine_row_gradients(
    normalized: torch.Tensor, output_grad: torch.Tensor, shape: tuple[int, ...], names: Collection[str]
) -> dict[str, RowGradient]:
    gradients: dict[str, RowGradient] = {}
    if "weight" in names:
        gradients["weight"] = DenseRowGradient(rows_by_positions(output_grad * normalized, len(shape)).sum(dim=1))
    if "bias" in names:
        gradients["bias"] = DenseRowGradient(rows_by_positions(output_grad, len(shape)).sum(dim=1))
    return gradients


@register_layer_rule(nn.LayerNorm)
def layer_norm_row_gradients(module: nn.LayerNorm, call: ModuleCall, names: Collection[str]) -> dict[str, RowGradient]:
    r"""
    Row gradients of y_s = xhat_s * w + c, with xhat_s = (x_s - mean(x_s)) / sqrt(var(x_s) + eps) over the
    normalized dimensions D.

    Shapes: input x (B, *S, *D), output gradients b (B, *S, *D), weight w (*D), bias c (*D).

        g_w(z) = sum_s b[z, s] * xhat[z, s]                               (*D)   materialized
        g_c(z) = sum_s b[z, s]                                            (*D)   materialized
    """
    shape = tuple(module.normalized_shape)
    normalized = F.layer_norm(call.input(), shape, eps=module.eps)
    return _affine_row_gradients(normalized, call.output_grad, shape, names)


@register_layer_rule(nn.RMSNorm)
def rms_norm_row_gradients(module: nn.RMSNorm, call: ModuleCall, names: Collection[str]) -> dict[str, RowGradient]:
    r"""
    Row gradients of y_s = xhat_s * w, with xhat_s = x_s / sqrt(mean(x_s^2) + eps) over the normalized
    dimensions D (eps defaults to the machine epsilon of the input dtype, as in `torch.nn.RMSNorm`).

    Shapes: input x (B, *S, *D), output gradients b (B, *S, *D), weight w (*D).

        g_w(z) = sum_s b[z, s] * xhat[z, s]                               (*D)   materialized
    """
    shape = tuple(module.normalized_shape)
    normalized = F.rms_norm(call.input(), shape, eps=module.eps)
    return _affine_row_gradients(normalized, call.output_grad, shape, names)
