"""MoSo (Moving-one-Sample-out) data pruning for the Hugging Face stack."""

__version__ = "0.1.0"

from .config import MoSoConfig
from .dataset import SCORE_COLUMN, add_moso_scores, prune_dataset
from .parameters import ScoredParameters, select_parameters
from .scoring import (
    GradientStatistics,
    GradientStatisticsBackend,
    NonFiniteLossError,
    PerSampleGradientBackend,
    compute_moso_scores,
)
from .selection import class_quotas, keep_count, select_rows
from .snapshots import Manifest, Snapshot, SnapshotRecorder, read_manifest
from .trainer import MoSoTrainer
