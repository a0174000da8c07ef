import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value

from hf_moso import class_quotas, keep_count, prune_dataset, select_rows


def test_keep_fraction_and_count():
    assert keep_count(0.5, 10) == 5
    assert keep_count(1.0, 7) == 7
    assert keep_count(0.3, 10) == 3
    assert keep_count(3, 10) == 3
    assert keep_count(10, 10) == 10


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, 0, 11, -2, float("nan")])
def test_keep_out_of_range_rejected(keep):
    with pytest.raises(ValueError, match="keep"):
        keep_count(keep, 10)


@pytest.mark.parametrize("keep", [True, "0.5", None])
def test_keep_wrong_type_rejected(keep):
    with pytest.raises(TypeError, match="keep"):
        keep_count(keep, 10)


def test_fraction_rounding_to_zero_rejected():
    with pytest.raises(ValueError, match="rounds to 0 rows"):
        keep_count(0.01, 10)


def test_global_selection_exact_count_and_highest():
    scores = np.array([0.1, 0.9, -0.3, 0.5, 0.7, 0.2])
    kept = select_rows(scores, 3)
    assert kept.tolist() == [1, 3, 4]


def test_ties_broken_by_row_position():
    scores = np.array([1.0, 2.0, 1.0, 1.0, 2.0, 1.0])
    assert select_rows(scores, 3).tolist() == [0, 1, 4]
    assert select_rows(scores, 4).tolist() == [0, 1, 2, 4]


def test_largest_remainder_quotas():
    # 7 * (5, 3, 2) / 10 = (3.5, 2.1, 1.4): floors (3, 2, 1), one row left for the largest remainder.
    assert class_quotas(np.array([5, 3, 2]), 7).tolist() == [4, 2, 1]
    # 6 * (4, 4, 2) / 10 = (2.4, 2.4, 1.2): floors (2, 2, 1), the tie goes to the earlier class.
    assert class_quotas(np.array([4, 4, 2]), 6).tolist() == [3, 2, 1]
    quotas = class_quotas(np.array([86, 1000, 1200, 1300, 900, 966]), 1636)
    assert quotas.sum() == 1636
    assert (quotas <= np.array([86, 1000, 1200, 1300, 900, 966])).all()


def test_class_balanced_never_borrows_rows():
    # Class 1 has the best scores overall, but it only gets its own quota.
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    scores = np.array([0.0, 0.1, 0.2, 0.3, 9.0, 8.0, 7.0, 6.0, -5.0, -4.0])
    kept = select_rows(scores, 5, labels=labels, class_balanced=True)

    quotas = class_quotas(np.array([4, 4, 2]), 5)
    for label, quota in enumerate(quotas):
        assert (labels[kept] == label).sum() == quota
    assert kept.tolist() == [2, 3, 4, 5, 9]


def test_class_balanced_keeps_best_within_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=200)
    scores = rng.normal(size=200)
    kept = select_rows(scores, 0.3, labels=labels, class_balanced=True)
    assert len(kept) == 60
    for label in range(4):
        members = np.flatnonzero(labels == label)
        kept_members = np.intersect1d(kept, members)
        dropped = np.setdiff1d(members, kept)
        if len(kept_members) and len(dropped):
            assert scores[kept_members].min() >= scores[dropped].max()


def _labelled_dataset():
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"]), "weight": Value("float32")})
    return Dataset.from_dict(
        {"text": [f"t{i}" for i in range(6)], "label": [0, 1, 0, 1, 1, 0], "weight": [0.5] * 6}, features=features
    )


def test_prune_dataset_keeps_columns_and_features():
    dataset = _labelled_dataset()
    scores = np.array([0.3, 0.1, 0.9, 0.4, 0.2, 0.8])
    pruned = prune_dataset(dataset, scores, 3)

    assert pruned["text"] == ["t2", "t3", "t5"]
    assert pruned["moso_score"] == [0.9, 0.4, 0.8]
    assert pruned.features["moso_score"] == Value("float64")
    for name, feature in dataset.features.items():
        assert pruned.features[name] == feature
    assert dataset.column_names == ["text", "label", "weight"]


def test_prune_dataset_class_balanced():
    dataset = _labelled_dataset()
    scores = np.array([0.3, 0.1, 0.9, 0.4, 0.2, 0.8])
    pruned = prune_dataset(dataset, scores, 4, class_balanced=True)
    assert sorted(pruned["label"]) == [0, 0, 1, 1]
    assert pruned["text"] == ["t2", "t3", "t4", "t5"]


def test_prune_dataset_missing_label_column():
    dataset = _labelled_dataset().rename_column("label", "category")
    with pytest.raises(ValueError, match=r"neither 'label' nor 'labels'.*label_column"):
        prune_dataset(dataset, np.zeros(6), 3, class_balanced=True)
    with pytest.raises(ValueError, match="'topic' not found"):
        prune_dataset(dataset, np.zeros(6), 3, class_balanced=True, label_column="topic")


def test_prune_dataset_wrong_score_count():
    with pytest.raises(ValueError, match="5 scores for a dataset of 6 rows"):
        prune_dataset(_labelled_dataset(), np.zeros(5), 3)
