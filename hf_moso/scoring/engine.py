"""The MoSo estimator: per-row gradient statistics combined over weight snapshots."""

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..parameters import ScoredParameters
from ..snapshots import Snapshot, load_snapshot
from .base import BatchFactory, GradientStatistics, GradientStatisticsBackend
from .per_sample import PerSampleGradientBackend


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


def compute_moso_scores(
    model: nn.Module,
    batches: BatchFactory,
    num_rows: int,
    snapshot_folder: str,
    snapshots: list[Snapshot],
    parameters: ScoredParameters,
    backend: GradientStatisticsBackend | None = None,
    show_progress: bool = True,
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
    logger.info(
        f"Scoring {num_rows} rows over {len(snapshots)} snapshots and {parameters.numel():,} parameters with the "
        f"{backend.name} backend."
    )

    model_state = _model_state(model)
    trained_state = {name: tensor.detach().clone() for name, tensor in model_state.items()}
    was_training = model.training
    scores = np.zeros(num_rows, dtype=np.float64)
    try:
        model.eval()
        for snapshot in logging.tqdm(snapshots, desc="MoSo snapshots", disable=not show_progress):
            tensors = load_snapshot(snapshot_folder, snapshot)
            _check_compatible({name: model_state[name] for name in parameters.names}, tensors, snapshot.step)
            _load_into(model_state, tensors)
            with torch.enable_grad():
                statistics = backend.compute(model, batches, num_rows, parameters)
            if statistics.mean_dot.shape[0] != num_rows:
                raise RuntimeError(f"The batches held {statistics.mean_dot.shape[0]} rows, expected {num_rows}.")
            scores += moso_snapshot_scores(statistics, snapshot.learning_rates, num_rows)
    finally:
        _load_into(model_state, trained_state)
        model.train(was_training)

    return scores / len(snapshots)
