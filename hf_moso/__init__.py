"""MoSo (Moving-one-Sample-out) data pruning for the Hugging Face stack."""

__version__ = "0.1.0"

from .baselines import (
    EL2N_COLUMN,
    FORGETTING_COLUMN,
    GRAND_COLUMN,
    RANDOM_COLUMN,
    ForgettingCallback,
    compute_el2n_scores,
    compute_grand_scores,
    random_scores,
)
from .card import MoSoDatasetCard, create_dataset_card
from .config import MoSoConfig
from .dataset import SCORE_COLUMN, add_moso_scores, prune_dataset
from .distributed import process_row_shard
from .histogram import score_histogram_png
from .hub import push_pruned_dataset, source_dataset_license
from .parameters import ScoredParameters, select_parameters
from .scoring import (
    GradientStatistics,
    GradientStatisticsBackend,
    NonFiniteLossError,
    PartialResults,
    PerLayerBackend,
    PerSampleGradientBackend,
    compute_moso_scores,
)
from .selection import class_quotas, keep_count, select_rows, threshold_count
from .sharding import unsharded_copy
from .snapshots import Manifest, Snapshot, SnapshotRecorder, read_manifest
from .trainer import MoSoTrainer
