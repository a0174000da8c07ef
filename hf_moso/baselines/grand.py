"""GraNd: the norm of each row's loss gradient early in training (Paul et al., NeurIPS 2021)."""

import numpy as np
import torch
from transformers.utils import logging

from ..parameters import select_parameters
from ..scoring.per_sample import PerSampleGradientBackend
from ..snapshots import read_manifest
from .snapshot_selection import average_over_snapshots, early_snapshots


logger = logging.get_logger(__name__)

GRAND_COLUMN = "grand_score"


def compute_grand_scores(
    trainer, dataset=None, snapshot_steps: list[int] | None = None, fraction: float = 0.5
) -> np.ndarray:
    """
    Compute the GraNd score of every row of `dataset` (default: the training dataset) from the MoSo snapshots.

        GraNd(z) = (1/T) * sum_t || grad_w l(z, w_t) ||_2

    over the snapshots w_t of `snapshot_steps`, or else over those of the first `fraction` of training (see
    `early_snapshots`). The gradient is taken over the same parameters as the MoSo score (`moso_parameters`), in
    eval mode, with the trainer's scoring backend, so |g_z|^2 is the `squared_norm` statistic MoSo uses, summed over
    parameter groups. Paul et al. average over independent initializations at one early step; this averages over
    the snapshots of one run instead. Higher means keep, as for MoSo.

    Args:
        trainer: a `MoSoTrainer` that has trained (its snapshot folder contains the snapshots).
        dataset: the rows to score; defaults to the trainer's training dataset.
        snapshot_steps: optimizer steps of recorded snapshots to average over.
        fraction: with `snapshot_steps` unset, average over the snapshots of steps <= `fraction * max_steps`.

    Returns:
        float64 array of shape `(len(dataset),)`, in dataset row order.

    Example:
        ```python
        trainer.train()
        scored = add_moso_scores(trainer.train_dataset, compute_grand_scores(trainer), column=GRAND_COLUMN)
        ```
    """
    dataset = trainer._resolve_dataset(dataset)
    folder = trainer.args.moso_snapshot_folder
    manifest = read_manifest(folder)
    snapshots = early_snapshots(manifest, snapshot_steps, fraction)
    model = trainer.accelerator.unwrap_model(trainer.model)
    parameters = select_parameters(model, trainer.args.moso_parameters, manifest.parameter_groups)
    backend = trainer.scoring_backend if trainer.scoring_backend is not None else PerSampleGradientBackend()
    dataloader = trainer._scoring_dataloader(dataset)
    logger.info(f"GraNd over {len(dataset)} rows at the snapshots of steps {[s.step for s in snapshots]}.")

    def batches():
        for batch in dataloader:
            yield trainer._prepare_inputs(batch)

    # Against a zero mean gradient, `row_statistics` skips the mean pass and still returns |g_z|^2 per group.
    zero_mean = [torch.zeros_like(tensor, dtype=torch.float64) for tensor in parameters.tensors]

    @torch.enable_grad()
    def gradient_norms() -> np.ndarray:
        statistics = backend.row_statistics(model, batches, parameters, zero_mean)
        return np.sqrt(statistics.squared_norm.sum(axis=1))

    return average_over_snapshots(model, folder, snapshots, len(dataset), gradient_norms)
