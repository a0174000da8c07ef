"""Checks of invalid input in the library: labels, emptied classes, missing losses, non-finite rows in chunks."""

import logging

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import save_file
from torch import nn
from transformers import BertConfig, BertForTokenClassification

from hf_moso import PartialResults, PerSampleGradientBackend, compute_moso_scores
from hf_moso.labels import check_labels
from hf_moso.parameters import select_parameters
from hf_moso.scoring import NonFiniteLossError
from hf_moso.selection import select_rows
from hf_moso.snapshots import Snapshot, file_sha256, snapshot_state
from models import pad_collator, tiny_bert, token_dataset


# Labels against the model's loss.


@pytest.mark.parametrize(
    "labels, message",
    [
        ([0, 3, 1, 5], "row 1 has 3, row 3 has 5"),
        ([0, -1], "row 1 has -1"),
        (["yes", "no"], "class_encode_column('label')"),
        ([0, None, 2], "Row(s) 1 have no label (null)"),
        ([[0, 1], [1, 2]], "contains a list per row"),
    ],
)
def test_sequence_labels_rejected(labels, message):
    with pytest.raises(ValueError) as error:
        check_labels(Dataset.from_dict({"label": labels}), "label", tiny_bert(num_labels=3))

    assert message in str(error.value)


def test_sequence_labels_accepted():
    check_labels(Dataset.from_dict({"label": [0, 1, 2, 2]}), "label", tiny_bert(num_labels=3))


def test_regression_labels_must_be_finite():
    with pytest.raises(ValueError, match=r"Row\(s\) 2 have a NaN or infinite label"):
        check_labels(Dataset.from_dict({"label": [0.5, 1.0, float("inf")]}), "label", tiny_bert(num_labels=1))

    check_labels(Dataset.from_dict({"label": [0.5, 1.0, -2.0]}), "label", tiny_bert(num_labels=1))


def test_token_labels_allow_ignore_index():
    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_labels=4)
    model = BertForTokenClassification(config)

    check_labels(Dataset.from_dict({"labels": [[0, 3, -100], [1, -100]]}), "labels", model)
    with pytest.raises(ValueError, match="row 1 has 4"):
        check_labels(Dataset.from_dict({"labels": [[0, 3, -100], [4, -100]]}), "labels", model)


def test_labels_follow_selected_rows():
    dataset = Dataset.from_dict({"label": [0, 1, 9, 2]}).select([3, 2])

    with pytest.raises(ValueError, match="row 1 has 9"):
        check_labels(dataset, "label", tiny_bert(num_labels=3))


# Class-balanced pruning that would empty a class.


def test_emptied_class_rejected():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    labels = np.array([0, 0, 0, 0, 0, 1])

    with pytest.raises(ValueError, match=r"leaves no row of class\(es\) \[1\]") as error:
        select_rows(scores, keep=2, labels=labels, class_balanced=True)

    assert "Keep at least 6 rows" in str(error.value)
    assert "allow_empty_classes=True" in str(error.value)


def test_emptied_class_allowed_with_warning(caplog):
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    labels = np.array([0, 0, 0, 0, 0, 1])

    with caplog.at_level(logging.WARNING, logger="hf_moso"):
        kept = select_rows(scores, keep=2, labels=labels, class_balanced=True, allow_empty_classes=True)

    assert kept.tolist() == [0, 1]
    assert "leaves no row of class(es) [1]" in caplog.text


# The engine on a model that returns no loss, and non-finite rows inside a chunk.


def _snapshot_of(model: nn.Module, folder) -> Snapshot:
    path = folder / "snapshot.safetensors"
    save_file(snapshot_state(model), str(path))
    return Snapshot(step=1, learning_rate=0.1, learning_rates=[0.1], file=path.name, sha256=file_sha256(str(path)))


class NoLossModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, features, labels=None):
        return {"logits": self.linear(features)}


def test_model_without_loss_rejected(tmp_path):
    model = NoLossModel()
    rows = {"features": torch.randn(4, 3), "labels": torch.tensor([0, 1, 0, 1])}

    with pytest.raises(ValueError, match="The model returned no loss"):
        compute_moso_scores(
            model,
            lambda: iter([rows]),
            num_rows=4,
            snapshot_folder=str(tmp_path),
            snapshots=[_snapshot_of(model, tmp_path)],
            parameters=select_parameters(model),
            show_progress=False,
        )


class SecondChunkNotFinite(PerSampleGradientBackend):
    """Reports row 1 of its second `row_statistics` call as not finite, counted within that call."""

    def __init__(self):
        self.calls = 0

    def row_statistics(self, model, batches, parameters, gradient_mean):
        self.calls += 1
        statistics = super().row_statistics(model, batches, parameters, gradient_mean)
        if self.calls == 2:
            raise NonFiniteLossError([1], what="gradient")
        return statistics


def test_non_finite_row_named_by_dataset_position(tmp_path):
    dataset = token_dataset(num_rows=8)
    model = tiny_bert()

    def batches():
        for start in range(0, 8, 2):
            yield pad_collator([dataset[index] for index in range(start, start + 2)])

    with pytest.raises(NonFiniteLossError) as error:
        compute_moso_scores(
            model,
            batches,
            num_rows=8,
            snapshot_folder=str(tmp_path),
            snapshots=[_snapshot_of(model, tmp_path)],
            parameters=select_parameters(model),
            backend=SecondChunkNotFinite(),
            show_progress=False,
            partial_results=PartialResults(str(tmp_path / "partial"), "rows", chunk_rows=4),
        )

    assert error.value.rows == [5]
    assert error.value.what == "gradient"
    assert "row(s) 5 is not finite" in str(error.value)
