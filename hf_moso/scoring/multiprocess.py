"""Gradient statistics of rows split between processes: gradient sums reduced, per-row statistics gathered."""

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from ..distributed import (
    all_gather_objects,
    all_reduce_sum_,
    check_same_on_every_process,
    gather_row_arrays,
    is_distributed,
    process_index,
)
from ..parameters import ScoredParameters
from ..snapshots import Snapshot
from .base import BatchFactory, GradientStatistics, GradientStatisticsBackend, NonFiniteLossError


Result = TypeVar("Result")


def check_row_shares(
    row_indices: Sequence[int],
    num_rows: int,
    snapshots: list[Snapshot],
    parameters: ScoredParameters,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """
    Check, on every process, that the processes score the same rows and snapshots and share the rows exactly once.

    Returns `row_indices` as an int64 array. Raises `ValueError` (every process raises) when the processes disagree
    on `num_rows`, the snapshots or the scored parameters, and `RuntimeError` when some row is held by no process
    or by more than one. Both messages list what each process had.
    """
    indices = np.asarray(row_indices, dtype=np.int64).reshape(-1)
    check_same_on_every_process(
        (num_rows, [(snapshot.step, snapshot.sha256) for snapshot in snapshots], list(parameters.names)),
        "the number of rows, the snapshots (step, sha256) or the scored parameter names",
    )
    gather_row_arrays(indices, [], num_rows, device=device)
    return indices


def _run_on_every_process(step: Callable[[], Result], row_indices: np.ndarray) -> Result:
    """
    Run `step` on this process; when it fails on any process, raise on every process.

    Without this, a process that raised would leave the others waiting forever in the next collective operation.
    A `NonFiniteLossError` names rows by their dataset positions, and when every failure is one, each process
    raises one naming the rows of all processes.
    """
    error = None
    try:
        result = step()
    except NonFiniteLossError as failure:
        error = NonFiniteLossError([int(row_indices[row]) for row in failure.rows], what=failure.what)
        error.__cause__ = failure
    except Exception as failure:  # noqa: BLE001 - re-raised below, after every process learned of it
        error = failure
    if not is_distributed():
        if error is not None:
            raise error
        return result

    summary = None
    if error is not None:
        rows = error.rows if isinstance(error, NonFiniteLossError) else None
        summary = (type(error).__name__, str(error), rows, getattr(error, "what", None))
    failures = [(rank, other) for rank, other in enumerate(all_gather_objects(summary)) if other is not None]
    if not failures:
        return result

    if all(rows is not None for _, (_, _, rows, _) in failures):
        rows = sorted(row for _, (_, _, failed_rows, _) in failures for row in failed_rows)
        merged = NonFiniteLossError(rows, what=failures[0][1][3])
        raise merged from error
    if error is not None:
        raise error
    listed = "; ".join(f"process {rank}: {name}: {message}" for rank, (name, message, _, _) in failures)
    raise RuntimeError(
        f"Scoring failed on another process, so process {process_index()} stops too ({listed}). See that process's "
        "log for the traceback."
    )


def shared_statistics(
    model: nn.Module,
    batches: BatchFactory,
    parameters: ScoredParameters,
    backend: GradientStatisticsBackend,
    num_rows: int,
    row_indices: np.ndarray,
) -> GradientStatistics:
    """
    Compute the statistics of all `num_rows` rows when each process scores the rows at `row_indices`.

    Pass 1: each process sums the float64 gradients of its own rows, the sums are added up over all processes and
    gbar = (sum over all processes) / N, the exact mean over the N rows; no row is counted twice and no mean of a
    partial or padded batch enters. Pass 2: each process computes its rows' statistics against gbar, and the
    statistics are gathered by dataset position, checked to cover every row exactly once and returned in dataset
    order on every process. With one process and no process group the collectives are no-ops, so `row_indices`
    only reorders the rows.

    Raises:
        NonFiniteLossError: on every process when the loss or gradient of some rows is not finite; rows are named
            by dataset position.
        RuntimeError: on every process when another process failed, or when the rows are not covered exactly once.
    """
    local_rows = len(row_indices)
    gradient_sum = _run_on_every_process(lambda: backend.gradient_sum(model, batches, parameters), row_indices)
    all_reduce_sum_(gradient_sum)
    gradient_mean = [total / num_rows for total in gradient_sum]

    statistics = _run_on_every_process(
        lambda: backend.row_statistics(model, batches, parameters, gradient_mean), row_indices
    )
    returned = all_gather_objects((statistics.mean_dot.shape[0], local_rows))
    if any(count != expected for count, expected in returned):
        listed = "; ".join(f"process {rank}: {count} of {expected}" for rank, (count, expected) in enumerate(returned))
        raise RuntimeError(
            f"The {backend.name} backend returned statistics for a different number of rows than the batches of "
            f"the process held (rows returned of rows held: {listed})."
        )

    device = gradient_sum[0].device if gradient_sum else torch.device("cpu")
    mean_dot, squared_norm = gather_row_arrays(
        row_indices, [statistics.mean_dot, statistics.squared_norm], num_rows, device=device
    )
    return GradientStatistics(mean_dot=mean_dot, squared_norm=squared_norm)
