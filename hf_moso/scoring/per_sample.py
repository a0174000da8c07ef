"""Reference backend: the gradient of every row, one row at a time."""

import numpy as np
import torch
from torch import nn

from ..parameters import ScoredParameters
from ..row_loss import row_losses
from .base import (
    BatchFactory,
    GradientStatistics,
    GradientStatisticsBackend,
    raise_on_non_finite_losses,
    raise_on_non_finite_rows,
)


def _gradients(output: torch.Tensor, parameters: ScoredParameters, retain_graph: bool) -> list[torch.Tensor]:
    gradients = torch.autograd.grad(output, parameters.tensors, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(tensor) if grad is None else grad for grad, tensor in zip(gradients, parameters.tensors)]


class PerSampleGradientBackend(GradientStatisticsBackend):
    """
    Compute the statistics from explicit per-row gradients, as the published MoSo code does.

    Pass 1 sums the gradients of all rows: one backward pass per batch of sum_z l(z), which equals sum_z g_z
    because rows do not interact in eval mode. Pass 2 takes the gradient g_z of each row's loss from the batch's
    forward pass, one backward pass per row, and reduces it against gbar at once, so no more than one row's
    gradient is held at a time. Products are accumulated in float64.
    """

    name = "per_sample"

    def gradient_sum(self, model: nn.Module, batches: BatchFactory, parameters: ScoredParameters) -> list[torch.Tensor]:
        gradient_sum = [torch.zeros_like(tensor, dtype=torch.float64) for tensor in parameters.tensors]
        position = 0
        for batch in batches():
            losses = row_losses(model, batch)
            raise_on_non_finite_losses(losses, position)
            for total, grad in zip(gradient_sum, _gradients(losses.sum(), parameters, retain_graph=False)):
                total += grad.to(torch.float64)
            position += losses.shape[0]
        return gradient_sum

    def row_statistics(
        self, model: nn.Module, batches: BatchFactory, parameters: ScoredParameters, gradient_mean: list[torch.Tensor]
    ) -> GradientStatistics:
        mean_dot, squared_norm = [], []
        for batch in batches():
            losses = row_losses(model, batch)
            size = losses.shape[0]
            batch_dot = np.zeros((size, parameters.num_groups), dtype=np.float64)
            batch_norm = np.zeros((size, parameters.num_groups), dtype=np.float64)
            for index in range(size):
                gradients = _gradients(losses[index], parameters, retain_graph=index < size - 1)
                for grad, mean, group in zip(gradients, gradient_mean, parameters.groups):
                    grad = grad.to(torch.float64)
                    batch_dot[index, group] += float(torch.sum(grad * mean))
                    batch_norm[index, group] += float(torch.sum(grad * grad))
            mean_dot.append(batch_dot)
            squared_norm.append(batch_norm)

        empty = np.zeros((0, parameters.num_groups), dtype=np.float64)
        mean_dot = np.concatenate(mean_dot) if mean_dot else empty
        squared_norm = np.concatenate(squared_norm) if squared_norm else empty
        raise_on_non_finite_rows(mean_dot, squared_norm)
        return GradientStatistics(mean_dot=mean_dot, squared_norm=squared_norm)
