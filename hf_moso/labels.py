"""Checks of a dataset's label column against the model that computes the loss from it."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from torch import nn

from .row_loss import IGNORE_INDEX, SEQUENCE_LOSS_TYPES, SHIFTED_TOKEN_LOSS_TYPES, TOKEN_LOSS_TYPES


def _rows(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask)
    shown = ", ".join(str(row) for row in rows[:10])
    return shown + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")


def _as_array(column) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _class_count(model: nn.Module) -> tuple[int, str] | None:
    """Number of valid class ids for the model's loss and the config field it comes from."""
    config = getattr(model, "config", None)
    loss_type = getattr(model, "loss_type", None)
    if config is None:
        return None
    if loss_type in {"ForMaskedLM"} | SHIFTED_TOKEN_LOSS_TYPES:
        vocab_size = getattr(config, "vocab_size", None)
        if vocab_size is None and hasattr(config, "get_text_config"):
            vocab_size = getattr(config.get_text_config(), "vocab_size", None)
        return (vocab_size, "vocab_size") if vocab_size else None
    return config.num_labels, "num_labels"


def _check_integer_ids(values: pa.Array, rows: np.ndarray, count: int, field: str, column: str, allow_ignored: bool):
    if not pa.types.is_integer(values.type):
        raise ValueError(
            f"Labels in column {column!r} are of type {values.type}, but the model expects class ids (integers "
            f"0 to {count - 1}). Map them to ids first, for example with `dataset.class_encode_column({column!r})`."
        )
    ids = values.to_numpy(zero_copy_only=False)
    invalid = (ids < 0) | (ids >= count)
    if allow_ignored:
        invalid &= ids != IGNORE_INDEX
    if invalid.any():
        bad_ids, bad_rows = ids[invalid], rows[invalid]
        shown = ", ".join(f"row {row} has {value}" for row, value in zip(bad_rows[:5], bad_ids[:5]))
        more = f" ({len(bad_ids)} invalid labels in all)" if len(bad_ids) > 5 else ""
        ignored = f" or {IGNORE_INDEX} (ignored)" if allow_ignored else ""
        fix = "Fix those labels."
        if bad_ids.max() >= count:
            fix = f"Fix those labels, or score with a model trained with {field} of at least {int(bad_ids.max()) + 1}."
        raise ValueError(
            f"Labels in column {column!r} are out of range for the model ({field}={count}, so 0 to {count - 1}"
            f"{ignored}): {shown}{more}. {fix}"
        )


def check_labels(dataset: Dataset, label_column: str, model: nn.Module) -> None:
    """
    Check that every label of `dataset[label_column]` is valid for the loss of `model`, before any gradient runs.

    For transformers models the rules follow the model's loss. Sequence classification with one label per row
    needs integer class ids 0 to `num_labels - 1`. Regression and multi-label rows need finite numbers, with
    `num_labels` values per row for multi-label. Token classification needs ids 0 to `num_labels - 1` or -100
    per token, and masked and causal language models need ids 0 to `vocab_size - 1` or -100. For other models
    only missing and non-finite labels are rejected. Out-of-range ids would otherwise fail inside the loss, where
    CUDA reports only a device-side assertion.

    Raises:
        ValueError: naming the column, the first invalid value, the rows that hold it and the fix.

    Example:
        ```python
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
        check_labels(Dataset.from_dict({"label": [0, 3]}), "label", model)
        # ValueError: Label 3 in column 'label' (row(s) 1) is out of range: the model has num_labels=3, ...
        ```
    """
    if label_column not in dataset.column_names:
        raise ValueError(f"Label column {label_column!r} not found; the dataset has columns {dataset.column_names}.")
    array = _as_array(dataset.with_format("arrow")[label_column])
    if array.null_count:
        raise ValueError(
            f"Row(s) {_rows(array.is_null().to_numpy(zero_copy_only=False))} have no label (null) in column "
            f"{label_column!r}. Fill in or drop those rows."
        )

    nested = (
        pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type)
    )
    if nested:
        values = pc.list_flatten(array)
        rows = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        if values.null_count:
            mask = np.zeros(len(array), dtype=bool)
            mask[rows[values.is_null().to_numpy(zero_copy_only=False)]] = True
            raise ValueError(f"Row(s) {_rows(mask)} contain a null label in column {label_column!r}. Fix those rows.")
    else:
        values = array
        rows = np.arange(len(array))

    if pa.types.is_floating(values.type):
        finite = np.isfinite(values.to_numpy(zero_copy_only=False))
        if not finite.all():
            mask = np.zeros(len(array), dtype=bool)
            mask[rows[~finite]] = True
            raise ValueError(
                f"Row(s) {_rows(mask)} have a NaN or infinite label in column {label_column!r}. Fix or drop those "
                "rows."
            )

    loss_type = getattr(model, "loss_type", None)
    classes = _class_count(model)
    if classes is None or loss_type is None:
        return
    count, field = classes

    if loss_type in SEQUENCE_LOSS_TYPES:
        problem_type = model.config.problem_type
        if problem_type is None:
            # The rule of the sequence-classification heads of transformers: float labels are multi-label targets.
            if count == 1:
                problem_type = "regression"
            elif pa.types.is_floating(values.type):
                problem_type = "multi_label_classification"
            else:
                problem_type = "single_label_classification"
        if problem_type == "single_label_classification":
            if nested:
                raise ValueError(
                    f"Column {label_column!r} contains a list per row, but the model classifies each row into one of "
                    f"{count} classes. Give one class id per row, or set `problem_type` to "
                    "'multi_label_classification' in the model config."
                )
            _check_integer_ids(values, rows, count, field, label_column, allow_ignored=False)
        elif problem_type == "multi_label_classification":
            lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False) if nested else np.ones(len(array))
            if (lengths != count).any():
                raise ValueError(
                    f"Row(s) {_rows(lengths != count)} of column {label_column!r} do not contain {count} values, one "
                    f"per label of the multi-label model ({field}={count}). Give a 0/1 vector of length {count} per "
                    "row."
                )
        elif not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
            raise ValueError(
                f"Labels in column {label_column!r} are of type {values.type}; a regression model needs numbers."
            )
    elif loss_type in TOKEN_LOSS_TYPES | SHIFTED_TOKEN_LOSS_TYPES:
        _check_integer_ids(values, rows, count, field, label_column, allow_ignored=True)
