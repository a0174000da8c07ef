"""EL2N: the L2 norm of the early error vector (Paul et al., "Deep Learning on a Data Diet", NeurIPS 2021)."""

import numpy as np
import torch
from torch.nn import functional as F
from transformers.utils import logging

from ..snapshots import read_manifest
from .snapshot_selection import average_over_snapshots, classification_logits_and_labels, early_snapshots


logger = logging.get_logger(__name__)

EL2N_COLUMN = "el2n_score"


def compute_el2n_scores(
    trainer, dataset=None, snapshot_steps: list[int] | None = None, fraction: float = 0.5
) -> np.ndarray:
    """
    Compute the EL2N score of every row of `dataset` (default: the training dataset) from the MoSo snapshots.

        EL2N(z) = (1/T) * sum_t || softmax(f(x_z; w_t)) - onehot(y_z) ||_2

    over the snapshots w_t of `snapshot_steps`, or else over those of the first `fraction` of training (see
    `early_snapshots`). Rows the early model gets badly wrong score high; higher means keep, as for MoSo. The model
    runs in eval mode, so dropout is off.

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
        scored = add_moso_scores(trainer.train_dataset, compute_el2n_scores(trainer), column=EL2N_COLUMN)
        ```
    """
    dataset = trainer._resolve_dataset(dataset)
    folder = trainer.args.moso_snapshot_folder
    snapshots = early_snapshots(read_manifest(folder), snapshot_steps, fraction)
    model = trainer.accelerator.unwrap_model(trainer.model)
    dataloader = trainer._scoring_dataloader(dataset)
    logger.info(f"EL2N over {len(dataset)} rows at the snapshots of steps {[s.step for s in snapshots]}.")

    @torch.no_grad()
    def error_norms() -> np.ndarray:
        norms = []
        for batch in dataloader:
            batch = trainer._prepare_inputs(batch)
            logits, labels = classification_logits_and_labels(model(**batch), batch)
            probabilities = torch.softmax(logits.double(), dim=-1)
            error = probabilities - F.one_hot(labels, probabilities.shape[-1]).double()
            norms.append(torch.linalg.vector_norm(error, dim=-1).cpu().numpy())
        return np.concatenate(norms) if norms else np.zeros(0)

    return average_over_snapshots(model, folder, snapshots, len(dataset), error_norms)
