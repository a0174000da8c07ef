from .base import GradientStatistics, GradientStatisticsBackend, NonFiniteLossError
from .engine import compute_moso_scores, moso_snapshot_scores
from .partial_results import PartialResults
from .per_sample import PerSampleGradientBackend
from .per_layer import PerLayerBackend
