import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_moso import MoSoConfig, MoSoTrainer, NonFiniteLossError
from models import TinyCNN, cpu_config, image_dataset, pad_collator, tiny_bert, token_dataset


# Training settings of the runs in this file; each test may override some.
TRAINING = {
    "per_device_train_batch_size": 4,
    "num_train_epochs": 1,
    "learning_rate": 1e-2,
    "moso_num_snapshots": 2,
    "moso_batch_size": 3,
}


def _config(tmp_path, **overrides):
    return cpu_config(tmp_path / "out", **{**TRAINING, **overrides})


@pytest.fixture(scope="module")
def trained_bert(tmp_path_factory):
    """A tiny BERT trained on rows with an extra text column that the Trainer removes before the forward pass."""
    tmp_path = tmp_path_factory.mktemp("bert")
    dataset = token_dataset(num_rows=13, extra_column=True)
    trainer = MoSoTrainer(
        model=tiny_bert(),
        args=_config(tmp_path, num_train_epochs=2),
        train_dataset=dataset,
        data_collator=pad_collator,
    )
    trainer.train()
    return trainer


def test_scores_follow_rows_after_shuffle(trained_bert):
    dataset = trained_bert.train_dataset
    scores = trained_bert.compute_moso_scores()
    shuffled = dataset.shuffle(seed=3)
    shuffled_scores = trained_bert.compute_moso_scores(shuffled)

    # The text column identifies each row, whatever order the dataset is in.
    by_text = dict(zip(dataset["text"], scores))
    expected = np.array([by_text[text] for text in shuffled["text"]])
    assert not np.allclose(shuffled_scores, scores)
    np.testing.assert_allclose(shuffled_scores, expected, rtol=1e-6)


def test_scores_ignore_removed_column(trained_bert):
    dataset = trained_bert.train_dataset
    scores = trained_bert.compute_moso_scores()
    without_text = trained_bert.compute_moso_scores(dataset.remove_columns("text"))
    np.testing.assert_allclose(without_text, scores, rtol=1e-6)


def test_scores_independent_of_batch_size(trained_bert):
    scores = trained_bert.compute_moso_scores()
    trained_bert.args.moso_batch_size = 13
    try:
        whole_batch = trained_bert.compute_moso_scores(trained_bert.train_dataset.select(range(13)))
    finally:
        trained_bert.args.moso_batch_size = 3
    np.testing.assert_allclose(whole_batch, scores, rtol=1e-5)


def test_scoring_restores_model(trained_bert):
    before = {name: tensor.detach().clone() for name, tensor in trained_bert.model.state_dict().items()}
    trained_bert.model.train()
    trained_bert.compute_moso_scores(trained_bert.train_dataset.select(range(5)))
    assert trained_bert.model.training
    for name, tensor in trained_bert.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_score_dataset_and_filter(trained_bert):
    scored = trained_bert.score_dataset()
    assert scored.column_names == ["input_ids", "label", "text", "moso_score"]
    assert scored.features["moso_score"].dtype == "float64"
    threshold = float(np.median(scored["moso_score"]))
    kept = scored.filter(lambda row: row["moso_score"] > threshold)
    assert 0 < len(kept) < len(scored)
    assert all(score > threshold for score in kept["moso_score"])


def test_prune_keeps_top_rows_per_class(trained_bert):
    scores = trained_bert.compute_moso_scores()
    pruned = trained_bert.prune(keep=0.5, class_balanced=True)
    dataset = trained_bert.train_dataset

    assert len(pruned) == round(0.5 * len(dataset))
    assert pruned.features.copy().pop("moso_score") is not None
    for name, feature in dataset.features.items():
        assert pruned.features[name] == feature
    by_text = dict(zip(dataset["text"], scores))
    assert pruned["moso_score"] == [by_text[text] for text in pruned["text"]]

    labels = np.array(dataset["label"])
    pruned_labels = np.array(pruned["label"])
    for label in np.unique(labels):
        assert (pruned_labels == label).sum() >= 1


def test_empty_dataset_rejected(trained_bert):
    with pytest.raises(ValueError, match="empty"):
        trained_bert.compute_moso_scores(trained_bert.train_dataset.select([]))


def test_single_row_rejected(trained_bert):
    with pytest.raises(ValueError, match="at least 2 rows"):
        trained_bert.compute_moso_scores(trained_bert.train_dataset.select([0]))


def test_keep_out_of_range_rejected(trained_bert):
    for keep in (0.0, 1.5, 14, -1):
        with pytest.raises(ValueError, match="keep"):
            trained_bert.prune(keep=keep)


def test_missing_label_column_rejected(trained_bert):
    dataset = trained_bert.train_dataset.rename_column("label", "category")
    with pytest.raises(ValueError, match="label_column"):
        trained_bert.prune(keep=0.5, class_balanced=True, dataset=dataset)


def test_non_finite_loss_names_row(tmp_path):
    dataset = image_dataset(num_rows=8)
    trainer = MoSoTrainer(model=TinyCNN(), args=_config(tmp_path), train_dataset=dataset)
    trainer.train()

    pixels = torch.stack([row["pixel_values"] for row in dataset])
    pixels[5, 0, 2, 2] = float("nan")
    labels = [int(row["label"]) for row in dataset]
    broken = Dataset.from_dict({"pixel_values": pixels.tolist(), "label": labels})
    broken = broken.with_format("torch")
    with pytest.raises(NonFiniteLossError, match=r"row\(s\) 5 ") as error:
        trainer.compute_moso_scores(broken)
    assert error.value.rows == [5]


def test_plain_training_arguments_rejected(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match="MoSoConfig"):
        MoSoTrainer(model=TinyCNN(), args=args, train_dataset=image_dataset())


def test_missing_snapshots_rejected(tmp_path):
    trainer = MoSoTrainer(model=TinyCNN(), args=_config(tmp_path), train_dataset=image_dataset())
    with pytest.raises(FileNotFoundError, match="manifest"):
        trainer.compute_moso_scores()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"moso_num_snapshots": 0}, "moso_num_snapshots"),
        ({"moso_snapshot_steps": []}, "moso_snapshot_steps"),
        ({"moso_snapshot_steps": [0, 3]}, "moso_snapshot_steps"),
        ({"moso_snapshot_steps": [2, 2]}, "duplicate"),
        ({"moso_parameters": []}, "moso_parameters"),
        ({"moso_batch_size": 0}, "moso_batch_size"),
    ],
)
def test_config_validation(tmp_path, overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _config(tmp_path, **overrides)


def test_config_defaults(tmp_path):
    config = MoSoConfig(output_dir=str(tmp_path / "run"), report_to="none")
    assert config.moso_num_snapshots == 10
    assert config.moso_snapshot_folder == str(tmp_path / "run" / "moso")
    assert config.moso_scoring_batch_size == config.per_device_eval_batch_size


def test_snapshot_steps_beyond_training_rejected(tmp_path):
    trainer = MoSoTrainer(
        model=TinyCNN(), args=_config(tmp_path, max_steps=2, moso_snapshot_steps=[1, 5]), train_dataset=image_dataset()
    )
    with pytest.raises(ValueError, match=r"\[5\]"):
        trainer.train()


def test_parameter_patterns_select_head(tmp_path):
    dataset = image_dataset(num_rows=8)
    trainer = MoSoTrainer(model=TinyCNN(), args=_config(tmp_path, moso_parameters=["head.*"]), train_dataset=dataset)
    trainer.train()
    head_scores = trainer.compute_moso_scores()
    trainer.args.moso_parameters = None
    all_scores = trainer.compute_moso_scores()
    assert head_scores.shape == all_scores.shape == (8,)
    assert not np.allclose(head_scores, all_scores)

    trainer.args.moso_parameters = ["decoder.*"]
    with pytest.raises(ValueError, match="No parameter name matches"):
        trainer.compute_moso_scores(dataset.select(range(6)))


def test_unknown_parameter_pattern_rejected_at_init(tmp_path):
    # The check comes before training, so a typo does not cost a training run.
    with pytest.raises(ValueError, match=r"No parameter name matches `moso_parameters`=\['decoder.\*'\]"):
        MoSoTrainer(model=TinyCNN(), args=_config(tmp_path, moso_parameters=["decoder.*"]))


def test_dataset_without_labels_rejected(trained_bert):
    dataset = trained_bert.train_dataset.remove_columns("label")
    with pytest.raises(ValueError, match="returned no loss"):
        trained_bert.compute_moso_scores(dataset)
