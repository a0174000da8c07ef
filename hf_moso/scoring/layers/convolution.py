"""Rule for `torch.nn.Conv1d` and `torch.nn.Conv2d`."""

from collections.abc import Collection

import torch
from torch import nn
from torch.nn import functional as F

from ..row_gradients import (
    ConvolutionRowGradient,
    DenseRowGradient,
    OuterProductRowGradient,
    RowGradient,
    prefers_gram,
)
from .registry import ModuleCall, register_layer_rule, rows_by_channels


def _padded_2d(module: nn.Conv1d | nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    """Return the input padded as the layer pads it, as (B, C, H, W); a 1D input gets height 1."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    padded = F.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
    return padded.unsqueeze(2) if isinstance(module, nn.Conv1d) else padded


def _geometry_2d(module: nn.Conv1d | nn.Conv2d) -> tuple[tuple[int, int], ...]:
    """Kernel size, dilation and stride of the layer in two dimensions."""
    if isinstance(module, nn.Conv1d):
        return (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
    return tuple(module.kernel_size), tuple(module.dilation), tuple(module.stride)


@register_layer_rule(nn.Conv1d, nn.Conv2d)
def convolution_row_gradients(
    module: nn.Conv1d | nn.Conv2d, call: ModuleCall, names: Collection[str]
) -> dict[str, RowGradient]:
    r"""
    Row gradients of a convolution with G groups, written as a linear layer over the unfolded input.

    Shapes: input x (B, C, *spatial), output gradients b (B, O, *L) flattened to L output positions, weight
    W (O, C/G, *k) viewed as (G, O/G, C/G * K) with K = prod(k), bias c (O,). Unfolding x (with the layer's
    padding, stride and dilation) gives the patch p_l (G, C/G * K) read by output position l.

        g_W(z)[g] = sum_l b[z, g, :, l] p[z, g, l]^T                      (O/G, C/G * K)
        g_c(z)    = sum_l b[z, :, l]                                      (O,)             materialized

    The weight takes the Gram form (outer products of the unfolded patches) when L^2 (O/G + C/G * K) is at most
    L (O/G)(C/G * K), which holds for few output positions. Otherwise, as for most images, it forms g_W(z) with
    the convolution's own weight-gradient kernel, one group per row (`ConvolutionRowGradient`), without unfolding.
    """
    output_grad = rows_by_channels(call.output_grad)
    batch, channels_out, positions = output_grad.shape
    gradients: dict[str, RowGradient] = {}
    if "weight" in names:
        groups = module.groups
        padded = _padded_2d(module, call.input())
        kernel, dilation, stride = _geometry_2d(module)
        size_p, size_q = channels_out // groups, module.weight.shape[1:].numel()
        if prefers_gram(positions, size_p, size_q):
            patches = F.unfold(padded, kernel_size=kernel, dilation=dilation, padding=0, stride=stride)
            left = output_grad.reshape(batch, groups, size_p, positions).transpose(-1, -2)
            right = patches.reshape(batch, groups, size_q, positions).transpose(-1, -2)
            gradients["weight"] = OuterProductRowGradient(left, right, module.weight.shape)
        else:
            output_grad_2d = call.output_grad.unsqueeze(2) if isinstance(module, nn.Conv1d) else call.output_grad
            gradients["weight"] = ConvolutionRowGradient(
                padded, output_grad_2d, module.weight.shape, stride, dilation, groups
            )
    if "bias" in names:
        gradients["bias"] = DenseRowGradient(output_grad.sum(dim=2))
    return gradients
