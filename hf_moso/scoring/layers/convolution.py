"""Rule for `torch.nn.Conv1d` and `torch.nn.Conv2d`."""

from collections.abc import Collection

import torch
from torch import nn
from torch.nn import functional as F

from ..row_gradients import DenseRowGradient, OuterProductRowGradient, RowGradient
from .registry import ModuleCall, register_layer_rule, rows_by_channels


def _patches(module: nn.Conv1d | nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    """Return the receptive field of every output position, (B, C_in * prod(kernel), L), padded as the layer pads."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    padded = F.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
    if isinstance(module, nn.Conv1d):
        padded = padded.unsqueeze(2)
        kernel, dilation, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    return F.unfold(padded, kernel_size=kernel, dilation=dilation, padding=0, stride=stride)


@register_layer_rule(nn.Conv1d, nn.Conv2d)
def convolution_row_gradients(
    module: nn.Conv1d | nn.Conv2d, call: ModuleCall, names: Collection[str]
) -> dict[str, RowGradient]:
    r"""
    Row gradients of a convolution with G groups, written as a linear layer over the unfolded input.

    Shapes: input x (B, C, *spatial), output gradients b (B, O, *L) flattened to L output positions, weight
    W (O, C/G, *k) viewed as (G, O/G, C/G * K) with K = prod(k), bias c (O,). Unfolding x (with the layer's
    padding, stride and dilation) gives the patch p_l (G, C/G * K) read by output position l.

        g_W(z)[g] = sum_l b[z, g, :, l] p[z, g, l]^T                      (O/G, C/G * K)   outer-product form
        g_c(z)    = sum_l b[z, :, l]                                      (O,)             materialized

    The squared norm usually materializes g_W(z): L^2 (O/G + C/G * K) is larger than L (O/G)(C/G * K) for the
    many output positions of an image.
    """
    output_grad = rows_by_channels(call.output_grad)
    batch, channels_out, positions = output_grad.shape
    gradients: dict[str, RowGradient] = {}
    if "weight" in names:
        groups = module.groups
        patches = _patches(module, call.input())
        left = output_grad.reshape(batch, groups, channels_out // groups, positions).transpose(-1, -2)
        right = patches.reshape(batch, groups, patches.shape[1] // groups, positions).transpose(-1, -2)
        gradients["weight"] = OuterProductRowGradient(left, right, module.weight.shape)
    if "bias" in names:
        gradients["bias"] = DenseRowGradient(output_grad.sum(dim=2))
    return gradients
