"""Accuracy, the fraction of predictions equal to their references, as an `evaluate` metric that loads offline."""

import datasets
import evaluate


_DESCRIPTION = "Accuracy: the number of predictions equal to their reference divided by the number of predictions."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): true class ids, one per prediction.
    normalize (`bool`, defaults to `True`): return the fraction; `False` returns the count of correct predictions.
    sample_weight (`list[float]`, *optional*): a weight per prediction.
Returns:
    accuracy (`float`): the (weighted) fraction or count of correct predictions.
Example:
    >>> metric = evaluate.load("benchmarks/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
        if sample_weight is None:
            sample_weight = [1.0] * len(predictions)
        elif len(sample_weight) != len(predictions):
            raise ValueError(f"Got {len(sample_weight)} sample weights for {len(predictions)} predictions.")
        correct = sum(weight for p, r, weight in zip(predictions, references, sample_weight) if p == r)
        if not normalize:
            return {"accuracy": float(correct)}
        return {"accuracy": float(correct) / float(sum(sample_weight))}
