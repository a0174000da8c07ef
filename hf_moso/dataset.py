"""
MoSo scores on `datasets` rows: a float64 `moso_score` column and pruning by it.

Both functions take a `datasets.Dataset` or a `datasets.DatasetDict`. For a `DatasetDict` they work on one split
(`split=`) and return a `DatasetDict` in which every other split is the same object as before.
"""

import numpy as np
from datasets import Dataset, DatasetDict, Value
from transformers.utils import logging

from .selection import select_rows


logger = logging.get_logger(__name__)

SCORE_COLUMN = "moso_score"


def select_split(dataset: Dataset | DatasetDict, split: str | None) -> tuple[Dataset, str | None]:
    """
    Return the `Dataset` to score or prune and the name of its split (`None` for a plain `Dataset`).

    A `DatasetDict` with one split uses that split when `split` is `None`.
    """
    if isinstance(dataset, DatasetDict):
        if split is None:
            if len(dataset) != 1:
                raise ValueError(
                    f"The DatasetDict has splits {list(dataset)}; pass `split=` with the split the scores belong to."
                )
            split = next(iter(dataset))
        if split not in dataset:
            raise ValueError(f"Split {split!r} not found; the DatasetDict has splits {list(dataset)}.")
        return dataset[split], split
    if isinstance(dataset, Dataset):
        if split is not None and split != (None if dataset.split is None else str(dataset.split)):
            raise ValueError(
                f"`split`={split!r} selects a split of a DatasetDict, but a Dataset (split {dataset.split}) was "
                "given. Leave `split` unset for a Dataset."
            )
        return dataset, None
    raise TypeError(
        f"Expected a datasets.Dataset or datasets.DatasetDict, got {type(dataset).__name__}. Build one with "
        "`Dataset.from_dict`, `Dataset.from_generator` or `load_dataset`."
    )


def replace_split(dataset: DatasetDict, split: str, part: Dataset) -> DatasetDict:
    """Return a `DatasetDict` with `part` in place of split `split` and the other splits unchanged, in order."""
    return DatasetDict({name: part if name == split else other for name, other in dataset.items()})


def score_array(scores, num_rows: int) -> np.ndarray:
    """Return `scores` as a float64 array of shape `(num_rows,)`; raise when the shape or type is wrong."""
    try:
        array = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"`scores` must be numbers, one per row: {error}") from error
    if array.shape != (num_rows,):
        raise ValueError(
            f"Got {array.size} scores for a dataset of {num_rows} rows (scores of shape {array.shape}); give exactly "
            f"one score per row, as a 1-D sequence of length {num_rows} in dataset row order."
        )
    return array


def _with_score_column(dataset: Dataset, scores: np.ndarray, column: str) -> Dataset:
    if column in dataset.column_names:
        raise ValueError(
            f"The dataset already has a column {column!r}. Remove it first with "
            f"`dataset.remove_columns({column!r})`, or choose another column name."
        )
    # `add_column` flattens an indices mapping (from `select`, `shuffle`, `filter`) first, so the i-th score lands
    # on the i-th row as the dataset presents it, not on the i-th row of the table underneath.
    return dataset.add_column(column, scores.tolist(), feature=Value("float64"))


def add_moso_scores(
    dataset: Dataset | DatasetDict, scores, column: str = SCORE_COLUMN, split: str | None = None
) -> Dataset | DatasetDict:
    """
    Return `dataset` with a float64 column of one score per row, in dataset row order.

    Every other column, feature and value is unchanged. The i-th score goes to the row that `dataset[i]` returns,
    also when the dataset carries an indices mapping after `select`, `shuffle` or `filter`. Scores are stored as
    float64 without rounding, so float32 scores are widened exactly.

    Args:
        dataset: a `Dataset`, or a `DatasetDict` of which split `split` is scored.
        scores: one number per row (a sequence, NumPy array or CPU tensor).
        column: name of the new column.
        split: the split of a `DatasetDict` to score; may be left unset when it has only one split.

    Returns:
        A `Dataset`, or a `DatasetDict` whose other splits are the objects of `dataset`.

    Example:
        >>> scored = add_moso_scores(Dataset.from_dict({"x": [1, 2]}), np.array([0.5, -1.0]))
        >>> scored.features["moso_score"].dtype, scored["moso_score"][:]
        ('float64', [0.5, -1.0])
        >>> splits = DatasetDict({"train": Dataset.from_dict({"x": [1, 2]}), "test": Dataset.from_dict({"x": [3]})})
        >>> add_moso_scores(splits, [0.5, -1.0], split="train")["test"].column_names
        ['x']
    """
    part, split = select_split(dataset, split)
    scored = _with_score_column(part, score_array(scores, len(part)), column)
    return scored if split is None else replace_split(dataset, split, scored)


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
    dataset: Dataset | DatasetDict,
    scores=None,
    keep: float | int | None = None,
    class_balanced: bool = False,
    label_column: str | None = None,
    *,
    threshold: float | None = None,
    split: str | None = None,
    column: str = SCORE_COLUMN,
    allow_empty_classes: bool = False,
) -> Dataset | DatasetDict:
    """
    Keep the highest-scoring rows of `dataset`, with their float64 `moso_score` column.

    Give exactly one of `keep` and `threshold`. Rows are ranked by score and ties are broken by position (the
    earlier row is kept); see `select_rows` for the rules.

    Args:
        dataset: a `Dataset`, or a `DatasetDict` of which split `split` is pruned.
        scores: one score per row, in dataset order. Leave unset to use the scores already in column `column`
            (for example a dataset from `add_moso_scores` or a published scored split).
        keep: a fraction in (0, 1] (float) or a row count (int).
        class_balanced: give every class a quota proportional to its size and fill it with its own best rows.
        label_column: column with the class of each row, used when `class_balanced` is set. Defaults to `label`
            or `labels`.
        threshold: keep the rows whose score is at least this value (with `class_balanced`, keep that many rows
            class-balanced).
        split: the split of a `DatasetDict` to prune; may be left unset when it has only one split.
        column: name of the score column.
        allow_empty_classes: with `class_balanced`, drop a class whose quota rounds to 0 rows with a warning,
            instead of raising a `ValueError`.

    Returns:
        The kept rows in their original order, with every original column, feature and value unchanged plus the
        score column. For a `DatasetDict`, the other splits are the objects of `dataset`.

    Example:
        >>> data = Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 0, 1, 1]})
        >>> prune_dataset(data, [0.3, 0.1, 0.9, 0.5], keep=0.5)["text"][:]
        ['c', 'd']
        >>> prune_dataset(data, [0.3, 0.1, 0.9, 0.5], keep=2, class_balanced=True)["text"][:]
        ['a', 'c']
        >>> prune_dataset(data, [0.3, 0.1, 0.9, 0.5], threshold=0.3)["moso_score"][:]
        [0.3, 0.9, 0.5]
    """
    part, split = select_split(dataset, split)
    if scores is None:
        if column not in part.column_names:
            raise ValueError(
                f"No `scores` given and the dataset has no {column!r} column (columns: {part.column_names}). Pass "
                "`scores=`, or score the dataset first with `add_moso_scores`."
            )
        scored = part
        scores = score_array(part.with_format(None)[column], len(part))
    else:
        scores = score_array(scores, len(part))
        scored = _with_score_column(part, scores, column)

    labels = None
    if class_balanced:
        label_name = resolve_label_column(part, label_column)
        labels = np.asarray(part.with_format(None)[label_name])
        if labels.ndim != 1:
            raise ValueError(
                f"Class-balanced pruning needs one class per row, but column {label_name!r} contains values of shape "
                f"{labels.shape[1:]} per row."
            )
    elif label_column is not None:
        logger.warning(f"`label_column`={label_column!r} is ignored because `class_balanced` is False.")

    kept = select_rows(
        scores,
        keep,
        labels=labels,
        class_balanced=class_balanced,
        threshold=threshold,
        allow_empty_classes=allow_empty_classes,
    )
    pruned = scored.select(kept)
    logger.info(
        f"Kept {len(pruned)} of {len(part)} rows ({'class-balanced' if class_balanced else 'global'} selection"
        f"{'' if split is None else f', split {split!r}'})."
    )
    return pruned if split is None else replace_split(dataset, split, pruned)
