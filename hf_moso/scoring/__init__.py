from .base import GradientStatistics, GradientStatisticsBackend, NonFiniteLossError
from .engine import compute_moso_scores, moso_snapshot_scores
from .per_sample import PerSampleGradientBackend
