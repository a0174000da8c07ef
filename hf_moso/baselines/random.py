"""Random scores: the baseline every pruning score has to beat."""

import numpy as np


RANDOM_COLUMN = "random_score"


def random_scores(num_rows: int, seed: int = 0) -> np.ndarray:
    """
    Draw one score per row uniformly from [0, 1) with NumPy's PCG64 generator seeded with `seed`.

    Keeping the k highest scores keeps a uniformly random subset of k rows, and with `class_balanced=True` a
    uniformly random subset of each class. The same `num_rows` and `seed` give the same scores on every platform.

    Returns:
        float64 array of shape `(num_rows,)`.

    Example:
        >>> scores = random_scores(4, seed=0)
        >>> scores.dtype, scores.shape
        (dtype('float64'), (4,))
    """
    if isinstance(num_rows, bool) or not isinstance(num_rows, (int, np.integer)) or num_rows < 0:
        raise ValueError(f"`num_rows` must be a non-negative int, got {num_rows!r}; pass `len(dataset)`.")
    return np.random.default_rng(seed).random(int(num_rows), dtype=np.float64)
