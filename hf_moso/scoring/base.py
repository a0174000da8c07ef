"""Interface of the backends that compute per-row gradient statistics at one snapshot."""

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..parameters import ScoredParameters


BatchFactory = Callable[[], Iterable[Mapping]]
"""A callable that returns a fresh iterator over the batches of the scored rows, in row order, on the model's device."""


class NonFiniteLossError(ValueError):
    """Raised when the loss or the gradient of some rows is NaN or infinite; `rows` lists their positions."""

    def __init__(self, rows: list[int], what: str = "loss"):
        self.rows = rows
        self.what = what
        shown = ", ".join(str(row) for row in rows[:10])
        more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
        super().__init__(
            f"The {what} of row(s) {shown}{more} is not finite (NaN or inf). Inspect or remove these rows of the "
            "dataset (positions count from 0 in dataset order), or check the model weights of the snapshot."
        )


@dataclass
class GradientStatistics:
    """
    The two per-row numbers MoSo needs at one snapshot w, per optimizer parameter group g.

    With g_z the gradient of the row loss l(z, w) over the scored parameters of group g and gbar the mean of g_z
    over all N rows:

    - `mean_dot[z, g]` = gbar . g_z
    - `squared_norm[z, g]` = |g_z|^2

    Both arrays have shape `(N, G)` and dtype float64.
    """

    mean_dot: np.ndarray
    squared_norm: np.ndarray


class GradientStatisticsBackend(ABC):
    """
    Computes `GradientStatistics` for every row at the model's current weights, in two passes over the rows.

    `gradient_sum` returns sum_z g_z (the engine divides by N, after adding up the sums of all processes when rows
    are split between processes), then `row_statistics` reduces each row's gradient against that mean. A backend
    may take any route to these numbers (per-row gradients, per-layer products of activations and output
    gradients, ...) as long as every row's numbers match the definition to floating-point accuracy and do not
    depend on how rows are batched or padded. The model is already in eval mode with gradients enabled.
    """

    name: str = "base"

    @abstractmethod
    def gradient_sum(self, model: nn.Module, batches: BatchFactory, parameters: ScoredParameters) -> list[torch.Tensor]:
        """
        Return sum_z g_z over the rows that `batches()` yields, one float64 tensor per scored parameter.

        Raises:
            NonFiniteLossError: when the loss of some rows is not finite; positions count from 0 in `batches()`
                order.
        """

    @abstractmethod
    def row_statistics(
        self, model: nn.Module, batches: BatchFactory, parameters: ScoredParameters, gradient_mean: list[torch.Tensor]
    ) -> GradientStatistics:
        """Return the statistics of every row that `batches()` yields, in that order, against `gradient_mean`."""

    def compute(
        self, model: nn.Module, batches: BatchFactory, num_rows: int, parameters: ScoredParameters
    ) -> GradientStatistics:
        """Run both passes over `num_rows` rows held by this process alone."""
        gradient_sum = self.gradient_sum(model, batches, parameters)
        return self.row_statistics(model, batches, parameters, [total / num_rows for total in gradient_sum])


def raise_on_non_finite_rows(mean_dot: np.ndarray, squared_norm: np.ndarray) -> None:
    """Raise `NonFiniteLossError` naming the rows whose statistics are NaN or infinite."""
    # A row whose own gradient is not finite also spoils gbar, so name the rows by |g_z|^2 first.
    bad = np.flatnonzero(~np.isfinite(squared_norm).all(axis=1))
    if bad.size == 0:
        bad = np.flatnonzero(~np.isfinite(mean_dot).all(axis=1))
    if bad.size:
        raise NonFiniteLossError(bad.tolist(), what="gradient")


def raise_on_non_finite_losses(losses: torch.Tensor, offset: int) -> None:
    """Raise `NonFiniteLossError` naming the rows (counted from `offset`) whose loss is NaN or infinite."""
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        raise NonFiniteLossError((offset + torch.nonzero(~finite).flatten()).tolist())
