"""The recorded snapshots that a snapshot-based baseline score averages over, and running code at their weights."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..scoring.engine import _check_compatible, _load_into, _model_state
from ..snapshots import Manifest, Snapshot, load_snapshot


def early_snapshots(manifest: Manifest, snapshot_steps: list[int] | None = None, fraction: float = 0.5) -> list[Snapshot]:
    """
    Return the snapshots to average over: those of `snapshot_steps`, or else those of the first `fraction` of training.

    EL2N and GraNd (Paul et al., NeurIPS 2021) are computed early in training, when the scores of easy and hard rows
    differ most. By default this keeps every snapshot whose step is at most `fraction * max_steps`, and at least the
    first snapshot.

    Raises:
        ValueError: when there is no snapshot, when `fraction` is not in (0, 1], or when a requested step was not
            recorded (the message lists the recorded steps).
    """
    recorded = manifest.snapshots
    if not recorded:
        raise ValueError("The manifest lists no snapshot. Train with `MoSoTrainer` first so that snapshots are recorded.")

    if snapshot_steps is not None:
        by_step = {snapshot.step: snapshot for snapshot in recorded}
        missing = [step for step in snapshot_steps if step not in by_step]
        if missing or not snapshot_steps:
            raise ValueError(
                f"`snapshot_steps`={list(snapshot_steps)} names steps without a snapshot ({missing}); the recorded "
                f"steps are {sorted(by_step)}."
            )
        return [by_step[step] for step in sorted(set(snapshot_steps))]

    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction!r}.")
    max_steps = manifest.max_steps if manifest.max_steps else max(snapshot.step for snapshot in recorded)
    chosen = [snapshot for snapshot in recorded if snapshot.step <= fraction * max_steps]
    return chosen or [recorded[0]]


@contextmanager
def snapshot_weights(model: nn.Module, folder: str, snapshot: Snapshot) -> Iterator[nn.Module]:
    """
    Load the weights of `snapshot` into `model` in eval mode for the duration of the block.

    The model's own weights and training mode are restored afterwards, also when the block raises.
    """
    model_state = _model_state(model)
    tensors = load_snapshot(folder, snapshot)
    _check_compatible(dict(model.named_parameters()), tensors, snapshot.step)
    trained_state = {name: tensor.detach().clone() for name, tensor in model_state.items()}
    was_training = model.training
    try:
        _load_into(model_state, tensors)
        model.eval()
        yield model
    finally:
        _load_into(model_state, trained_state)
        model.train(was_training)


def average_over_snapshots(
    model: nn.Module, folder: str, snapshots: list[Snapshot], num_rows: int, score: Callable[[], np.ndarray]
) -> np.ndarray:
    """
    Average the per-row scores that `score()` returns while `model` has each snapshot's weights loaded (in eval mode).

    Raises:
        RuntimeError: when one call of `score()` returns other than `num_rows` values, the number of dataset rows.
    """
    total = np.zeros(num_rows, dtype=np.float64)
    for snapshot in snapshots:
        with snapshot_weights(model, folder, snapshot):
            per_row = score()
        if per_row.shape[0] != num_rows:
            raise RuntimeError(f"The scoring batches held {per_row.shape[0]} rows, expected {num_rows}.")
        total += per_row
    return total / len(snapshots)


def classification_logits_and_labels(outputs, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Return the logits `(B, C)` and integer labels `(B,)` of a single-label classification batch.

    Raises:
        ValueError: when the batch has no `labels` or the model returns no logits of shape `(B, C)`.
    """
    labels = batch.get("labels")
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if labels is None or logits is None:
        raise ValueError(
            "This score needs a classification model that returns `logits` and a batch with `labels` (keys: "
            f"{sorted(batch)}). Check that the dataset has a `label` column and that the collator passes it on."
        )
    if logits.dim() != 2 or labels.dim() != 1 or labels.is_floating_point() or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"This score is defined for single-label classification: logits of shape (rows, classes) and integer "
            f"labels of shape (rows,); got logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
            f"({labels.dtype})."
        )
    return logits, labels
