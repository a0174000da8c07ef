import numpy as np
import pytest
import torch

from hf_moso import MoSoConfig, MoSoTrainer
from models import TinyCNN, image_dataset, pad_collator, tiny_bert, token_dataset
from reference import brute_force_scores


def _config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=5e-2,
        moso_num_snapshots=3,
        moso_batch_size=5,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    values.update(overrides)
    return MoSoConfig(**values)


def test_bert_scores_match_brute_force(tmp_path):
    dataset = token_dataset(num_rows=11)
    model = tiny_bert()
    trainer = MoSoTrainer(model=model, args=_config(tmp_path), train_dataset=dataset, data_collator=pad_collator)
    trainer.train()

    scores = trainer.compute_moso_scores()

    rows = [pad_collator([dataset[index]]) for index in range(len(dataset))]
    expected = brute_force_scores(model, rows, trainer.args.moso_snapshot_folder)
    assert scores.dtype == np.float64
    assert scores.shape == (len(dataset),)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-12 * np.abs(expected).max())


def test_cnn_scores_match_brute_force(tmp_path):
    dataset = image_dataset(num_rows=10)
    model = TinyCNN()
    trainer = MoSoTrainer(model=model, args=_config(tmp_path, moso_batch_size=4), train_dataset=dataset)
    trainer.train()

    scores = trainer.compute_moso_scores()

    rows = [
        {"pixel_values": dataset[index]["pixel_values"][None], "labels": dataset[index]["label"][None]}
        for index in range(len(dataset))
    ]
    expected = brute_force_scores(model, rows, trainer.args.moso_snapshot_folder)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-12 * np.abs(expected).max())
