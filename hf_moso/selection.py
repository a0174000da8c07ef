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
    scores: np.ndarray, keep: float | int, labels: np.ndarray | None = None, class_balanced: bool = False
) -> np.ndarray:
    """
    Choose the rows to keep: the highest scores overall, or per class with `class_balanced=True`.

    Class-balanced selection gives each class the quota of `class_quotas` and fills it only with that class's
    highest-scoring rows.

    Returns:
        The kept positions in ascending order.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"`scores` must be one score per row (1-D), got shape {scores.shape}.")
    if not np.isfinite(scores).all():
        bad = np.flatnonzero(~np.isfinite(scores))[:10].tolist()
        raise ValueError(f"The scores of rows {bad} are not finite; recompute them before pruning.")
    count = keep_count(keep, len(scores))
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
        logger.warning(
            f"Keeping {count} of {len(scores)} rows class-balanced leaves no row of class(es) {emptied}. Keep more "
            "rows to retain every class."
        )

    kept = []
    for index in range(len(classes)):
        members = np.flatnonzero(inverse == index)
        kept.append(members[top_rows(scores[members], int(quotas[index]))])
    return np.sort(np.concatenate(kept))
