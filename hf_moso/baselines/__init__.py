"""
Baseline data-pruning scores with the conventions of MoSo: one float64 score per row in dataset row order, higher
means keep. Store them with `add_moso_scores(dataset, scores, column=...)` and prune with
`prune_dataset(dataset, scores, keep=...)`, exactly as MoSo scores.
"""

from .el2n import EL2N_COLUMN, compute_el2n_scores
from .forgetting import FORGETTING_COLUMN, ForgettingCallback
from .grand import GRAND_COLUMN, compute_grand_scores
from .random import RANDOM_COLUMN, random_scores
from .snapshot_selection import early_snapshots
