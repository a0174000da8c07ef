"""The MoSo estimator: per-row gradient statistics combined over weight snapshots."""

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..distributed import is_main_process
from ..parameters import ScoredParameters
from ..sharding import check_supported_sharding, is_fsdp_model, unshard_for_scoring
from ..snapshots import Snapshot, load_snapshot, snapshot_shapes
from .base import BatchFactory, GradientStatistics, GradientStatisticsBackend
from .multiprocess import check_row_shares, shared_statistics
from .partial_results import PartialResults
from .per_sample import PerSampleGradientBackend
from .resumable import resumable_statistics


logger = logging.get_logger(__name__)


def moso_snapshot_scores(statistics: GradientStatistics, learning_rates: list[float], num_rows: int) -> np.ndarray:
    r"""
    Combine one snapshot's statistics into each row's term of the MoSo sum.

    With gbar the mean row gradient and g_z the gradient of row z, the gradient of the loss on the other N - 1 rows
    is (N gbar - g_z) / (N - 1), so per parameter group g with learning rate eta_g

        term(z) = sum_g eta_g * (N * (gbar . g_z)_g - |g_z|_g^2) / (N - 1)

    Returns a float64 array of shape `(N,)`.
    """
    rates = np.asarray(learning_rates, dtype=np.float64)[: statistics.mean_dot.shape[1]]
    per_group = (num_rows * statistics.mean_dot - statistics.squared_norm) / (num_rows - 1)
    return per_group @ rates


def _check_compatible(model_state: dict[str, torch.Tensor], snapshot_state: dict[str, torch.Tensor], step: int):
    missing = sorted(set(model_state) - set(snapshot_state))
    mismatched = [
        f"{name} {tuple(snapshot_state[name].shape)} vs {tuple(tensor.shape)}"
        for name, tensor in model_state.items()
        if name in snapshot_state and snapshot_state[name].shape != tensor.shape
    ]
    if missing or mismatched:
        details = []
        if missing:
            details.append(f"missing from the snapshot: {missing[:5]} (total {len(missing)})")
        if mismatched:
            details.append(f"shape differs (snapshot vs model): {mismatched[:5]} (total {len(mismatched)})")
        raise ValueError(
            f"The snapshot of step {step} does not match the model ({'; '.join(details)}). Score with the model "
            "architecture that recorded the snapshots."
        )


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters())
    state.update({name: tensor for name, tensor in model.named_buffers() if name not in state})
    return state


@torch.no_grad()
def _load_into(model_state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        target = model_state.get(name)
        if target is not None:
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))

    # An enclosing autocast context caches its low-precision copies of the weights until it exits, and in-place
    # changes do not invalidate them: without this, forward passes would keep using the previous weights.
    torch.clear_autocast_cache()


def compute_moso_scores(
    model: nn.Module,
    batches: BatchFactory,
    num_rows: int,
    snapshot_folder: str,
    snapshots: list[Snapshot],
    parameters: ScoredParameters,
    backend: GradientStatisticsBackend | None = None,
    show_progress: bool = True,
    partial_results: PartialResults | None = None,
    row_indices: Sequence[int] | None = None,
) -> np.ndarray:
    r"""
    Compute the MoSo score of every row:

        M(z) = (1/T) * sum_t sum_g eta_{t,g} * grad L(S\z, w_t)_g . grad l(z, w_t)_g

    over the T snapshots w_t and the optimizer parameter groups g with learning rates eta_{t,g}.

    The model is put in eval mode and loaded with each snapshot's weights in turn; its own weights and training
    mode are restored afterwards, also when an error is raised.

    Args:
        model: the trained model; its architecture must match the snapshots.
        batches: returns a fresh iterator over the batches of the `num_rows` rows, in row order.
        num_rows: N, the number of scored rows (at least 2).
        snapshot_folder: folder of the snapshot files.
        snapshots: the snapshots to average over (from the folder's manifest).
        parameters: the scored parameters of `model`.
        backend: how per-row gradient statistics are computed. Defaults to `PerSampleGradientBackend`.
        show_progress: show a progress bar over snapshots.
        partial_results: where to save each finished piece (the gradient sum and chunks of rows of a snapshot, then
            the snapshot's statistics) and find the pieces of an interrupted call with the same key; see
            `PartialResults`. The folder is kept afterwards, so delete it once the scores are stored.
        row_indices: the dataset positions of the rows that `batches()` yields on this process, in that order,
            for scoring with several processes (see `process_row_shard`). The gradient sums of all processes are
            added up so that gbar is the mean over all `num_rows` rows, and the per-row statistics are gathered
            and checked to cover every row exactly once. Every process must then call this function, and every
            process returns all the scores. `None`: `batches()` yields all rows, and no collective runs.

    A model sharded with FSDP2 (`fully_shard`) is scored through an unsharded copy on every process (see
    `unsharded_copy`), which gives the scores of the plain model.

    Returns:
        float64 array of shape `(num_rows,)`, in row order.
    """
    if num_rows < 2:
        raise ValueError(
            f"MoSo needs at least 2 rows, got {num_rows}: the score compares each row with the mean gradient of the "
            "other rows."
        )
    if not snapshots:
        raise ValueError("No snapshot to score with. Train with `MoSoTrainer` first so that snapshots are recorded.")
    for snapshot in snapshots:
        if len(snapshot.learning_rates) < parameters.num_groups:
            raise ValueError(
                f"The snapshot of step {snapshot.step} records {len(snapshot.learning_rates)} learning rate(s) but "
                f"the scored parameters belong to {parameters.num_groups} optimizer parameter groups."
            )
    backend = backend if backend is not None else PerSampleGradientBackend()
    if row_indices is not None and partial_results is not None:
        raise NotImplementedError(
            "Resumable scoring (`partial_results`) runs in one process, and rows split between processes "
            "(`row_indices`) cannot be resumed. Score without `partial_results` on several processes, or with it on "
            "one process."
        )
    check_supported_sharding(model)
    if is_fsdp_model(model):
        model, parameters = unshard_for_scoring(model, parameters)
    logger.info(
        f"Scoring {num_rows} rows over {len(snapshots)} snapshots and {parameters.numel():,} parameters with the "
        f"{backend.name} backend."
    )

    model_state = _model_state(model)

    # Read every snapshot header first, so that a missing snapshot or another architecture fails before hours of
    # scoring instead of in the middle. Checksums are verified when each snapshot is loaded.
    scored_state = {name: model_state[name] for name in parameters.names}
    for snapshot in snapshots:
        shapes = snapshot_shapes(snapshot_folder, snapshot)
        _check_compatible(
            scored_state, {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}, snapshot.step
        )
    if row_indices is not None:
        row_indices = check_row_shares(row_indices, num_rows, snapshots, parameters, parameters.tensors[0].device)
    if partial_results is not None:
        partial_results.open(num_rows, parameters.names, backend.name, type(model).__name__)

    trained_state = {name: tensor.detach().clone() for name, tensor in model_state.items()}
    was_training = model.training
    scores = np.zeros(num_rows, dtype=np.float64)
    try:
        model.eval()
        progress = logging.tqdm(snapshots, desc="MoSo snapshots", disable=not show_progress or not is_main_process())
        for snapshot in progress:
            statistics = None if partial_results is None else partial_results.load_statistics(snapshot)
            if statistics is not None:
                logger.info(f"Reusing the saved statistics of the snapshot of step {snapshot.step}.")
                scores += moso_snapshot_scores(statistics, snapshot.learning_rates, num_rows)
                continue
            tensors = load_snapshot(snapshot_folder, snapshot)
            _check_compatible({name: model_state[name] for name in parameters.names}, tensors, snapshot.step)
            _load_into(model_state, tensors)
            with torch.enable_grad():
                if row_indices is not None:
                    statistics = shared_statistics(model, batches, parameters, backend, num_rows, row_indices)
                elif partial_results is None:
                    statistics = backend.compute(model, batches, num_rows, parameters)
                else:
                    statistics = resumable_statistics(
                        model, batches, num_rows, parameters, backend, snapshot, partial_results
                    )
            if statistics.mean_dot.shape[0] != num_rows:
                raise RuntimeError(f"The batches held {statistics.mean_dot.shape[0]} rows, expected {num_rows}.")
            scores += moso_snapshot_scores(statistics, snapshot.learning_rates, num_rows)
    finally:
        _load_into(model_state, trained_state)
        model.train(was_training)
        if partial_results is not None:
            partial_results.close()

    return scores / len(snapshots)
