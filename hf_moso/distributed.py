"""
Collective operations that let several processes score the rows of one dataset together.

Every function here works without `torch.distributed` too: with one process (or no process group) the collectives
are no-ops, so callers need no separate code path. With a process group, every process must call the same
functions in the same order, as with any collective operation.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a `torch.distributed` process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def num_processes() -> int:
    """Number of processes in the default process group, 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def process_index() -> int:
    """Rank of this process in the default process group, 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Whether this process writes files and shows progress bars (rank 0)."""
    return process_index() == 0


def wait_for_everyone() -> None:
    """Block until every process reaches this call."""
    if is_distributed():
        dist.barrier()


def process_row_shard(
    num_rows: int, batch_size: int, num_processes: int | None = None, process_index: int | None = None
) -> range:
    """
    Return the dataset positions that one process scores: a contiguous run of whole scoring batches.

    Rows 0..N-1 form K = ceil(N / batch_size) batches in order, and process p of P takes batches
    floor(K p / P) to floor(K (p + 1) / P) - 1. Every batch a process forms is thus the batch a single process
    would form (same rows, same padding), so the per-row numbers do not depend on the number of processes, and no
    row is repeated to even out the shares. A process gets no row when there are fewer batches than processes.

    Args:
        num_rows: N, the number of rows of the dataset.
        batch_size: rows per scoring batch.
        num_processes: P; defaults to the size of the default process group (1 without one).
        process_index: p; defaults to the rank of this process (0 without a process group).

    Example:
        With 9 rows, batch size 4 and 2 processes (batches 0-3, 4-7 and 8), process 0 takes one batch and
        process 1 the other two:

        >>> process_row_shard(9, 4, num_processes=2, process_index=0)
        range(0, 4)
        >>> process_row_shard(9, 4, num_processes=2, process_index=1)
        range(4, 9)
    """
    if num_processes is None:
        num_processes = dist.get_world_size() if is_distributed() else 1
    if process_index is None:
        process_index = dist.get_rank() if is_distributed() else 0
    if num_rows < 0:
        raise ValueError(f"`num_rows` must be at least 0, got {num_rows}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"`process_index` must be in [0, {num_processes}), got {process_index}.")

    num_batches = -(-num_rows // batch_size)
    first_batch = num_batches * process_index // num_processes
    end_batch = num_batches * (process_index + 1) // num_processes
    return range(min(first_batch * batch_size, num_rows), min(end_batch * batch_size, num_rows))


def _collective_device(device: torch.device) -> torch.device:
    # gloo reduces CPU tensors; other backends (NCCL, ...) reduce tensors on the accelerator of this process.
    # NOTE: the tests run gloo on CPU only; the accelerator branch has not been run on a GPU.
    if "gloo" in str(dist.get_backend()):
        return torch.device("cpu")
    if device.type != "cpu":
        return device
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor, in place, by its sum over all processes (no-op with one process)."""
    if not is_distributed():
        return
    for tensor in tensors:
        device = _collective_device(tensor.device)
        buffer = tensor.to(device)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        if buffer is not tensor:
            tensor.copy_(buffer)


def all_gather_objects(value: Any) -> list[Any]:
    """Return the picklable `value` of every process, in rank order (`[value]` with one process)."""
    if not is_distributed():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def check_same_on_every_process(value: Any, description: str) -> None:
    """
    Raise `ValueError` on every process when the processes passed different values.

    Call it before a collective whose shapes depend on `value`, so that a mismatch becomes an error naming what
    each process had instead of a hang or a crash inside the backend.
    """
    values = all_gather_objects(value)
    if any(other != values[0] for other in values[1:]):
        listed = "; ".join(f"process {rank}: {other!r}" for rank, other in enumerate(values))
        raise ValueError(
            f"The processes disagree on {description} ({listed}). Every process must score the same dataset with the "
            "same snapshots: build them the same way on every process."
        )


def _all_gather_padded(local: torch.Tensor, counts: list[int], device: torch.device) -> list[torch.Tensor]:
    # gloo aborts the job when the gathered tensors differ in length, so every process pads to the longest share.
    longest = max(counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return [tensor[:count].cpu() for tensor, count in zip(gathered, counts)]


def _describe_shares(indices_by_process: list[np.ndarray]) -> str:
    shares = []
    for rank, indices in enumerate(indices_by_process):
        if indices.size:
            shares.append(f"process {rank}: {indices.size} rows, positions {indices.min()} to {indices.max()}")
        else:
            shares.append(f"process {rank}: no row")
    return "; ".join(shares)


def gather_row_arrays(
    row_indices: Sequence[int] | np.ndarray,
    arrays: Sequence[np.ndarray],
    num_rows: int,
    device: torch.device | str = "cpu",
) -> list[np.ndarray]:
    """
    Collect per-row arrays from every process, in dataset row order, on every process.

    Each process passes the dataset positions of the rows it scored and arrays whose first dimension runs over
    those rows, in the same order. The shares may differ in length and may be empty. The result holds each array
    with `num_rows` rows, row i at position i.

    Args:
        row_indices: dataset positions of this process's rows, each in `[0, num_rows)`.
        arrays: arrays of shape `(len(row_indices), ...)`; the trailing shapes and dtypes must agree between
            processes.
        num_rows: N, the number of rows of the dataset.
        device: where the collective runs for backends other than gloo (the model's device).

    Raises:
        RuntimeError: on every process, when some row is held by no process or by more than one. The message
            lists the rows and what each process held.

    Example:
        With 2 processes, process 0 passing `row_indices=[2, 0]` with `arrays=[np.array([20.0, 0.0])]` and process
        1 passing `[1]` with `[np.array([10.0])]`, both processes get `[array([0., 10., 20.])]`.
    """
    local_indices = torch.as_tensor(np.asarray(row_indices, dtype=np.int64).reshape(-1))
    local_arrays = [torch.from_numpy(np.ascontiguousarray(array)) for array in arrays]
    for array in local_arrays:
        if array.shape[0] != local_indices.shape[0]:
            raise ValueError(
                f"An array has {array.shape[0]} rows but `row_indices` lists {local_indices.shape[0]} positions."
            )

    if is_distributed():
        device = _collective_device(torch.device(device))
        count = torch.tensor([local_indices.shape[0]], dtype=torch.int64, device=device)
        counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, count)
        counts = [int(count.item()) for count in counts]
        indices_by_process = [tensor.numpy() for tensor in _all_gather_padded(local_indices, counts, device)]
        arrays_by_process = [_all_gather_padded(array, counts, device) for array in local_arrays]
    else:
        indices_by_process = [local_indices.numpy()]
        arrays_by_process = [[array] for array in local_arrays]

    indices = np.concatenate(indices_by_process)
    outside = indices[(indices < 0) | (indices >= num_rows)]
    occurrences = np.bincount(indices[(indices >= 0) & (indices < num_rows)], minlength=num_rows)
    missing = np.flatnonzero(occurrences == 0)
    repeated = np.flatnonzero(occurrences > 1)
    if outside.size or missing.size or repeated.size:
        problems = []
        if outside.size:
            problems.append(f"positions outside [0, {num_rows}): {outside[:10].tolist()}")
        if missing.size:
            problems.append(f"rows held by no process: {missing[:10].tolist()} (total {missing.size})")
        if repeated.size:
            problems.append(f"rows held more than once: {repeated[:10].tolist()} (total {repeated.size})")
        raise RuntimeError(
            f"The processes' rows do not cover the {num_rows} rows exactly once ({'; '.join(problems)}). What each "
            f"process held: {_describe_shares(indices_by_process)}. Give every process a disjoint share, for example "
            "with `process_row_shard`."
        )

    ordered = []
    for pieces in arrays_by_process:
        values = torch.cat(pieces).numpy()
        result = np.empty_like(values)
        result[indices] = values
        ordered.append(result)
    return ordered

