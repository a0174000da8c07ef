"""MoSo scores on `datasets.Dataset` rows: a `moso_score` column and pruning by it."""

import numpy as np
from datasets import Dataset, Value

from .selection import select_rows


SCORE_COLUMN = "moso_score"


def add_moso_scores(dataset: Dataset, scores: np.ndarray, column: str = SCORE_COLUMN) -> Dataset:
    """
    Return `dataset` with a float64 column of one score per row, in dataset row order.

    Every other column, feature and value is unchanged.

    Example:
        >>> scored = add_moso_scores(Dataset.from_dict({"x": [1, 2]}), np.array([0.5, -1.0]))
        >>> scored.features["moso_score"].dtype, scored["moso_score"]
        ('float64', [0.5, -1.0])
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(dataset),):
        raise ValueError(
            f"Got {scores.size} scores for a dataset of {len(dataset)} rows; give exactly one score per row."
        )
    if column in dataset.column_names:
        raise ValueError(
            f"The dataset already has a column {column!r}. Remove it first with "
            f"`dataset.remove_columns({column!r})`, or choose another column name."
        )
    return dataset.add_column(column, scores.tolist(), feature=Value("float64"))


def resolve_label_column(dataset: Dataset, label_column: str | None) -> str:
    """Return `label_column`, or `label`/`labels` when it is `None`; raise when the column does not exist."""
    if label_column is None:
        for candidate in ("label", "labels"):
            if candidate in dataset.column_names:
                return candidate
        raise ValueError(
            f"No label column found: the dataset has columns {dataset.column_names} but neither 'label' nor 'labels'. "
            "Pass `label_column=` with the name of the column that holds the class."
        )
    if label_column not in dataset.column_names:
        raise ValueError(
            f"Label column {label_column!r} not found; the dataset has columns {dataset.column_names}."
        )
    return label_column


def prune_dataset(
    dataset: Dataset,
    scores: np.ndarray,
    keep: float | int,
    class_balanced: bool = False,
    label_column: str | None = None,
) -> Dataset:
    """
    Keep the highest-scoring rows of `dataset` and add their float64 `moso_score` column.

    Args:
        dataset: the scored dataset (without a `moso_score` column).
        scores: one score per row, in dataset order.
        keep: a fraction in (0, 1] (float) or a row count (int).
        class_balanced: give every class a quota proportional to its size and fill it with its own best rows.
        label_column: column with the class of each row, used when `class_balanced` is set. Defaults to `label`
            or `labels`.

    Returns:
        The kept rows in their original order, with every original column and feature unchanged.
    """
    labels = None
    if class_balanced:
        column = resolve_label_column(dataset, label_column)
        labels = np.asarray(dataset[column])
        if labels.ndim != 1:
            raise ValueError(
                f"Class-balanced pruning needs one class per row, but column {column!r} holds values of shape "
                f"{labels.shape[1:]} per row."
            )
    kept = select_rows(scores, keep, labels=labels, class_balanced=class_balanced)
    return add_moso_scores(dataset, scores).select(kept)
