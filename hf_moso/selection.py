"""Choice of the rows to keep from their scores: global or class-balanced top-k."""

import numbers

import numpy as np
from transformers.utils import logging


logger = logging.get_logger(__name__)


def keep_count(keep: float | int, num_rows: int) -> int:
    """
    Turn `keep` into a number of rows.

    A float in (0, 1] is a fraction of `num_rows`, rounded to the nearest row count (halves round to even, as
    Python's `round` does); an int is a row count between 1 and `num_rows`. `1.0` keeps every row, `1` keeps one.

    Example:
        >>> keep_count(0.5, 9), keep_count(3, 9)
        (4, 3)
    """
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"`keep` must be a fraction in (0, 1] or a row count, got {keep!r}.")
    if isinstance(keep, numbers.Integral):
        if not 1 <= keep <= num_rows:
            raise ValueError(
                f"`keep`={keep} rows is out of range for a dataset of {num_rows} rows. Give a row count between 1 and "
                f"{num_rows}, or a fraction in (0, 1] as a float."
            )
        return int(keep)
    if not (0.0 < keep <= 1.0):
        raise ValueError(
            f"`keep`={keep} is out of range. Give a fraction in (0, 1] as a float, or a row count as an int."
        )
    count = int(round(keep * num_rows))
    if count == 0:
        raise ValueError(
            f"`keep`={keep} of {num_rows} rows rounds to 0 rows. Give a larger fraction or a row count of at least 1."
        )
    return count


def threshold_count(scores: np.ndarray, threshold: float) -> int:
    """
    Count the rows whose score is at least `threshold`.

    Example:
        >>> threshold_count(np.array([0.5, -1.0, 2.0]), 0.5)
        2
    """
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"`threshold` must be a number (the lowest score to keep), got {threshold!r}.")
    if not np.isfinite(threshold):
        raise ValueError(f"`threshold` must be a finite score, got {threshold!r}.")
    count = int(np.count_nonzero(scores >= threshold))
    if count == 0:
        raise ValueError(
            f"No row has a score of at least `threshold`={threshold}; the highest score is "
            f"{float(scores.max())!r}. Give a lower threshold, or a fraction or row count with `keep`."
        )
    return count


def top_rows(scores: np.ndarray, count: int) -> np.ndarray:
    """
    Positions of the `count` highest scores; among equal scores the earlier position wins. Returned in ascending
    position order.
    """
    order = np.lexsort((np.arange(len(scores)), -scores))
    return np.sort(order[:count])


def class_quotas(class_sizes: np.ndarray, count: int) -> np.ndarray:
    """
    Split `count` rows between classes in proportion to their sizes, by the largest-remainder method.

    Each class c gets floor(count * n_c / N) rows, and the rows left over go one each to the classes with the
    largest remainders (ties to the earlier class). No quota exceeds its class size.

    Example:
        >>> class_quotas(np.array([5, 3, 2]), 5).tolist()
        [3, 1, 1]
    """
    total = int(class_sizes.sum())
    exact = class_sizes.astype(np.float64) * count / total
    quotas = np.floor(exact).astype(np.int64)

    # Exact integer remainders avoid float ties: count * n_c mod N.
    remainders = (class_sizes.astype(np.int64) * count) % total
    leftover = count - int(quotas.sum())
    order = np.lexsort((np.arange(len(class_sizes)), -remainders))
    quotas[order[:leftover]] += 1
    return quotas


def select_rows(
    scores: np.ndarray,
    keep: float | int | None = None,
    labels: np.ndarray | None = None,
    class_balanced: bool = False,
    threshold: float | None = None,
    allow_empty_classes: bool = False,
) -> np.ndarray:
    """
    Choose the rows to keep: the highest scores overall, or per class with `class_balanced=True`.

    Give exactly one of `keep` (a fraction in (0, 1] as a float, or a row count as an int) and `threshold`. A
    threshold keeps every row whose score is at least `threshold`. With `class_balanced=True` the threshold only
    sets how many rows are kept: the number of rows at or above it. Each class then gets the quota of
    `class_quotas` and fills it only with that class's highest-scoring rows. So a class may keep rows below the
    threshold while another drops rows above it.

    Ties are broken by position: the earlier row is kept.

    When class-balanced quotas would leave some class without any row, a `ValueError` names the classes and a
    row count that keeps every class; with `allow_empty_classes=True` a warning is logged instead and those
    classes are dropped.

    Returns:
        The kept positions in ascending order.

    Example:
        >>> scores, labels = np.array([0.3, 0.1, 0.9, 0.5]), np.array([0, 0, 1, 1])
        >>> select_rows(scores, keep=2).tolist()
        [2, 3]
        >>> select_rows(scores, threshold=0.3).tolist()
        [0, 2, 3]
        >>> select_rows(scores, keep=2, labels=labels, class_balanced=True).tolist()
        [0, 2]
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"`scores` must be one score per row (1-D), got shape {scores.shape}.")
    if not np.isfinite(scores).all():
        bad = np.flatnonzero(~np.isfinite(scores))[:10].tolist()
        raise ValueError(f"The scores of rows {bad} are not finite; recompute them before pruning.")
    if (keep is None) == (threshold is None):
        raise ValueError(
            f"Give exactly one of `keep` (got {keep!r}) and `threshold` (got {threshold!r}): a fraction or row count "
            "to keep, or the lowest score to keep."
        )
    count = keep_count(keep, len(scores)) if threshold is None else threshold_count(scores, threshold)
    if not class_balanced:
        return top_rows(scores, count)

    if labels is None:
        raise ValueError("Class-balanced pruning needs the label of every row; pass `labels`.")
    labels = np.asarray(labels)
    if labels.shape != scores.shape:
        raise ValueError(f"Got {labels.shape[0] if labels.ndim else 0} labels for {len(scores)} scores.")
    classes, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    quotas = class_quotas(sizes, count)

    emptied = [classes[index].item() for index in np.flatnonzero(quotas == 0)]
    if emptied:
        # Every class keeps a row once count * n_c / N >= 1 for the smallest class n_c, by the floor in the quotas.
        enough = -(-len(scores) // int(sizes.min()))
        message = (
            f"Keeping {count} of {len(scores)} rows class-balanced leaves no row of class(es) {emptied}. Keep at "
            f"least {enough} rows to retain every class"
        )
        if not allow_empty_classes:
            raise ValueError(f"{message}, or pass `allow_empty_classes=True` to drop those classes.")
        logger.warning(f"{message}; dropping them because `allow_empty_classes` is set.")

    kept = []
    for index in range(len(classes)):
        members = np.flatnonzero(inverse == index)
        kept.append(members[top_rows(scores[members], int(quotas[index]))])
    return np.sort(np.concatenate(kept))
