"""Interface of the backends that compute per-row gradient statistics at one snapshot."""

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from torch import nn

from ..parameters import ScoredParameters


BatchFactory = Callable[[], Iterable[Mapping]]
"""A callable that returns a fresh iterator over the batches of the scored rows, in row order, on the model's device."""


class NonFiniteLossError(ValueError):
    """Raised when the loss or the gradient of some rows is NaN or infinite; `rows` lists their positions."""

    def __init__(self, rows: list[int], what: str = "loss"):
        self.rows = rows
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
    Computes `GradientStatistics` for every row at the model's current weights.

    A backend may take any route to the two numbers (per-row gradients, per-layer products of activations and
    output gradients, ...) as long as every row's numbers match the definition to floating-point accuracy and do
    not depend on how rows are batched or padded. The model is already in eval mode.
    """

    name: str = "base"

    @abstractmethod
    def compute(
        self, model: nn.Module, batches: BatchFactory, num_rows: int, parameters: ScoredParameters
    ) -> GradientStatistics:
        """Return the statistics of the `num_rows` rows that `batches()` yields, in that order."""
