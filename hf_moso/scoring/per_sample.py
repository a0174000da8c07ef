"""Reference backend: the gradient of every row, one row at a time."""

import numpy as np
import torch
from torch import nn

from ..parameters import ScoredParameters
from ..row_loss import row_losses
from .base import BatchFactory, GradientStatistics, GradientStatisticsBackend, NonFiniteLossError


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

    def compute(
        self, model: nn.Module, batches: BatchFactory, num_rows: int, parameters: ScoredParameters
    ) -> GradientStatistics:
        gradient_sum = [torch.zeros_like(tensor, dtype=torch.float64) for tensor in parameters.tensors]
        position = 0
        for batch in batches():
            losses = row_losses(model, batch)
            self._check_finite(losses, position)
            for total, grad in zip(gradient_sum, _gradients(losses.sum(), parameters, retain_graph=False)):
                total += grad.to(torch.float64)
            position += losses.shape[0]
        if position != num_rows:
            raise RuntimeError(f"The batches held {position} rows, expected {num_rows}.")
        gradient_mean = [total / num_rows for total in gradient_sum]

        mean_dot = np.zeros((num_rows, parameters.num_groups), dtype=np.float64)
        squared_norm = np.zeros((num_rows, parameters.num_groups), dtype=np.float64)
        position = 0
        for batch in batches():
            losses = row_losses(model, batch)
            size = losses.shape[0]
            for index in range(size):
                gradients = _gradients(losses[index], parameters, retain_graph=index < size - 1)
                for grad, mean, group in zip(gradients, gradient_mean, parameters.groups):
                    grad = grad.to(torch.float64)
                    mean_dot[position + index, group] += float(torch.sum(grad * mean))
                    squared_norm[position + index, group] += float(torch.sum(grad * grad))
            position += size

        # A row whose own gradient is not finite also spoils gbar, so name the rows by |g_z|^2 first.
        bad = np.flatnonzero(~np.isfinite(squared_norm).all(axis=1))
        if bad.size == 0:
            bad = np.flatnonzero(~np.isfinite(mean_dot).all(axis=1))
        if bad.size:
            raise NonFiniteLossError(bad.tolist(), what="gradient")
        return GradientStatistics(mean_dot=mean_dot, squared_norm=squared_norm)

    @staticmethod
    def _check_finite(losses: torch.Tensor, offset: int) -> None:
        finite = torch.isfinite(losses.detach())
        if not bool(finite.all()):
            rows = (offset + torch.nonzero(~finite).flatten()).tolist()
            raise NonFiniteLossError(rows)
