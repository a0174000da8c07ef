import numpy as np
import pytest
import torch

from hf_moso import MoSoTrainer, PerLayerBackend, PerSampleGradientBackend
from models import TinyCNN, cpu_config, image_dataset, pad_collator, tiny_bert, token_dataset
from reference import brute_force_scores


def _cross_entropy_rows(model, batch):
    return torch.nn.functional.cross_entropy(model(**batch).logits, batch["labels"], reduction="none")


BACKENDS = {"per_sample": PerSampleGradientBackend, "per_layer": PerLayerBackend}


# Training settings of the runs in this file; each test may override some.
TRAINING = {
    "per_device_train_batch_size": 4,
    "num_train_epochs": 2,
    "learning_rate": 5e-2,
    "moso_num_snapshots": 3,
    "moso_batch_size": 5,
}


def _config(tmp_path, **overrides):
    return cpu_config(tmp_path / "out", **{**TRAINING, **overrides})


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bert_scores_match_brute_force(tmp_path, backend):
    dataset = token_dataset(num_rows=11)
    model = tiny_bert()
    trainer = MoSoTrainer(
        model=model,
        args=_config(tmp_path),
        train_dataset=dataset,
        data_collator=pad_collator,
        scoring_backend=BACKENDS[backend](),
    )
    trainer.train()

    scores = trainer.compute_moso_scores()

    rows = [pad_collator([dataset[index]]) for index in range(len(dataset))]
    expected = brute_force_scores(model, rows, trainer.args.moso_snapshot_folder)
    assert scores.dtype == np.float64
    assert scores.shape == (len(dataset),)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("backend", [*BACKENDS, "per_layer_row_loss_function"])
def test_cnn_scores_match_brute_force(tmp_path, backend):
    dataset = image_dataset(num_rows=10)
    model = TinyCNN()
    if backend == "per_layer_row_loss_function":
        options = {"row_loss_function": _cross_entropy_rows}
    else:
        options = {"scoring_backend": BACKENDS[backend]()}
    trainer = MoSoTrainer(model=model, args=_config(tmp_path, moso_batch_size=4), train_dataset=dataset, **options)
    trainer.train()

    scores = trainer.compute_moso_scores()

    rows = [
        {"pixel_values": dataset[index]["pixel_values"][None], "labels": dataset[index]["label"][None]}
        for index in range(len(dataset))
    ]
    expected = brute_force_scores(model, rows, trainer.args.moso_snapshot_folder)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-12 * np.abs(expected).max())


def test_default_backend_is_per_layer(tmp_path):
    trainer = MoSoTrainer(model=TinyCNN(), args=_config(tmp_path), train_dataset=image_dataset(num_rows=4))
    assert isinstance(trainer.scoring_backend, PerLayerBackend)
    with pytest.raises(ValueError, match="row_loss_function"):
        MoSoTrainer(
            model=TinyCNN(),
            args=_config(tmp_path),
            train_dataset=image_dataset(num_rows=4),
            scoring_backend=PerSampleGradientBackend(),
            row_loss_function=_cross_entropy_rows,
        )


def test_activation_checkpointing_in_training(tmp_path):
    dataset = token_dataset(num_rows=9)
    model = tiny_bert(dropout=0.0)
    args = _config(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    trainer = MoSoTrainer(model=model, args=args, train_dataset=dataset, data_collator=pad_collator)
    trainer.train()

    scores = trainer.compute_moso_scores()

    rows = [pad_collator([dataset[index]]) for index in range(len(dataset))]
    expected = brute_force_scores(model, rows, trainer.args.moso_snapshot_folder)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-12 * np.abs(expected).max())


def test_head_preset_scores_match_brute_force(tmp_path):
    dataset = token_dataset(num_rows=9)
    model = tiny_bert()
    args = _config(tmp_path, moso_parameters=["preset:head"])
    trainer = MoSoTrainer(model=model, args=args, train_dataset=dataset, data_collator=pad_collator)
    trainer.train()

    scores = trainer.compute_moso_scores()

    rows = [pad_collator([dataset[index]]) for index in range(len(dataset))]
    expected = brute_force_scores(
        model, rows, trainer.args.moso_snapshot_folder, parameter_names=["classifier.weight", "classifier.bias"]
    )
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-12 * np.abs(expected).max())
