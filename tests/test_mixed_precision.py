"""Scores under bf16: ranked like float32 scores, finite, and free of any loss scale."""

import numpy as np
import pytest
import torch

from hf_moso import MoSoConfig, MoSoTrainer
from models import pad_collator, tiny_bert, token_dataset


NUM_ROWS = 48


def _spearman(first: np.ndarray, second: np.ndarray) -> float:
    # Ties are improbable between continuous scores, so tied ranks are not averaged.
    first_ranks = np.argsort(np.argsort(first))
    second_ranks = np.argsort(np.argsort(second))
    return float(np.corrcoef(first_ranks, second_ranks)[0, 1])


def _config(folder, **overrides) -> MoSoConfig:
    values = dict(
        output_dir=str(folder),
        per_device_train_batch_size=8,
        num_train_epochs=2,
        learning_rate=1e-2,
        moso_num_snapshots=3,
        moso_batch_size=16,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return MoSoConfig(**values)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run torch on one thread: on a small shared machine, more threads make these tiny models much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory, one_thread):
    """A float32 training run and its scores."""
    folder = tmp_path_factory.mktemp("float32")
    trainer = MoSoTrainer(
        model=tiny_bert(), args=_config(folder), train_dataset=token_dataset(NUM_ROWS), data_collator=pad_collator
    )
    trainer.train()
    return trainer, trainer.compute_moso_scores()


def test_bf16_scoring_ranks_like_float32(tmp_path, float32_run):
    float32_trainer, float32_scores = float32_run
    args = _config(tmp_path, bf16=True, moso_snapshot_dir=float32_trainer.args.moso_snapshot_folder)
    trainer = MoSoTrainer(model=tiny_bert(), args=args, data_collator=pad_collator)

    scores = trainer.compute_moso_scores(token_dataset(NUM_ROWS))

    assert np.isfinite(scores).all()
    # The forward passes did run in bf16: the scores are close to the float32 ones, but not equal.
    assert np.abs(scores - float32_scores).max() > 1e-6 * np.abs(float32_scores).max()
    assert _spearman(scores, float32_scores) >= 0.99


def test_bf16_training_ranks_like_float32(tmp_path, float32_run):
    _, float32_scores = float32_run
    trainer = MoSoTrainer(
        model=tiny_bert(),
        args=_config(tmp_path, bf16=True),
        train_dataset=token_dataset(NUM_ROWS),
        data_collator=pad_collator,
    )
    trainer.train()

    scores = trainer.compute_moso_scores()

    assert np.isfinite(scores).all()
    assert _spearman(scores, float32_scores) >= 0.99


def test_bf16_weights_rank_like_float32(tmp_path, float32_run):
    float32_trainer, float32_scores = float32_run
    model = tiny_bert().to(torch.bfloat16)
    args = _config(tmp_path, moso_snapshot_dir=float32_trainer.args.moso_snapshot_folder)
    trainer = MoSoTrainer(model=model, args=args, data_collator=pad_collator)

    scores = trainer.compute_moso_scores(token_dataset(NUM_ROWS))

    assert scores.dtype == np.float64
    assert np.isfinite(scores).all()
    assert _spearman(scores, float32_scores) >= 0.99


def test_loss_scale_never_enters_scores(tmp_path, float32_run):
    float32_trainer, float32_scores = float32_run
    args = _config(tmp_path, moso_snapshot_dir=float32_trainer.args.moso_snapshot_folder)
    trainer = MoSoTrainer(model=tiny_bert(), args=args, data_collator=pad_collator)
    # A scaler as fp16 training on a GPU would hold, with a scale far from 1.
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

    scores = trainer.compute_moso_scores(token_dataset(NUM_ROWS))

    np.testing.assert_allclose(scores, float32_scores, rtol=1e-6, atol=0)
