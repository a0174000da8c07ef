"""Histogram of MoSo scores as a PNG image, drawn with matplotlib's Agg backend."""

import io

import numpy as np


def score_histogram_png(
    scores: np.ndarray,
    kept_scores: np.ndarray | None = None,
    cutoff: float | None = None,
    cutoff_label: str = "cutoff",
    bins: int | None = None,
    title: str = "MoSo scores",
) -> bytes:
    """
    Draw the histogram of `scores` and return it as PNG bytes.

    All rows are drawn in grey and the kept rows (`kept_scores`) over them in one colour, with the same bin edges,
    so the pruned rows are the grey part of each bar. `cutoff` draws a vertical line, for example at the lowest
    kept score or at the threshold. The figure is drawn on its own Agg canvas, so no pyplot state or display is
    touched and the function is safe to call without a display.

    Args:
        scores: the scores of every row.
        kept_scores: the scores of the rows kept by pruning.
        cutoff: position of a vertical line, in score units.
        cutoff_label: legend text of that line; its value is appended.
        bins: number of equal-width bins. Defaults to the square root of the row count, between 10 and 60.
        title: the title of the plot.

    Example:
        >>> png = score_histogram_png(np.array([0.1, 0.4, 0.2, 0.9]), kept_scores=np.array([0.4, 0.9]))
        >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"`scores` must be a non-empty 1-D array, got shape {scores.shape}.")
    if not np.isfinite(scores).all():
        raise ValueError("`scores` contains values that are not finite; a histogram needs finite scores.")
    if bins is None:
        bins = int(np.clip(np.sqrt(scores.size), 10, 60))
    edges = np.histogram_bin_edges(scores, bins=bins)

    figure = Figure(figsize=(7.0, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.hist(scores, bins=edges, color="#b8b8b8", label=f"all rows ({scores.size})")
    if kept_scores is not None:
        kept_scores = np.asarray(kept_scores, dtype=np.float64)
        axes.hist(kept_scores, bins=edges, color="#1f77b4", label=f"kept rows ({kept_scores.size})")
    if cutoff is not None:
        axes.axvline(cutoff, color="#d62728", linestyle="--", linewidth=1.2, label=f"{cutoff_label} {cutoff:.4g}")
    axes.set_xlabel("MoSo score")
    axes.set_ylabel("rows")
    axes.set_title(title)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()

    buffer = io.BytesIO()
    # No "Software" or date entries, so the same scores give the same bytes.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
