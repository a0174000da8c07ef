import copy

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from hf_moso import (
    EL2N_COLUMN,
    ForgettingCallback,
    MoSoTrainer,
    add_moso_scores,
    compute_el2n_scores,
    compute_grand_scores,
    prune_dataset,
    random_scores,
)
from hf_moso.baselines import early_snapshots
from hf_moso.snapshots import load_snapshot, read_manifest
from models import cpu_config, pad_collator, tiny_bert, token_dataset


# Training settings of the runs in this file; each test may override some.
TRAINING = {
    "per_device_train_batch_size": 4,
    "num_train_epochs": 2,
    "learning_rate": 5e-2,
    "moso_num_snapshots": 4,
    "moso_batch_size": 5,
}


def _config(tmp_path, **overrides):
    return cpu_config(tmp_path / "out", **{**TRAINING, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BERT trained with snapshots and forgetting checks on rows with a text column the Trainer removes."""
    tmp_path = tmp_path_factory.mktemp("baselines")
    forgetting = ForgettingCallback(num_checks=4, batch_size=5)
    trainer = MoSoTrainer(
        model=tiny_bert(),
        args=_config(tmp_path),
        train_dataset=token_dataset(num_rows=14, extra_column=True),
        data_collator=pad_collator,
        callbacks=[forgetting],
    )
    trainer.train()
    return trainer, forgetting


def _rows(trainer):
    """Each training row as a batch of one, in dataset order, without the text column."""
    dataset = trainer.train_dataset.remove_columns("text")
    return [pad_collator([dataset[index]]) for index in range(len(dataset))]


def _snapshot_model(trainer, snapshot):
    model = copy.deepcopy(trainer.model)
    model.load_state_dict(load_snapshot(trainer.args.moso_snapshot_folder, snapshot), strict=False)
    return model.eval()


def test_random_scores_reproducible():
    first = random_scores(50, seed=3)
    assert first.dtype == np.float64
    assert first.shape == (50,)
    np.testing.assert_array_equal(first, random_scores(50, seed=3))
    assert not np.array_equal(first, random_scores(50, seed=4))
    assert ((first >= 0.0) & (first < 1.0)).all()


def test_random_scores_reject_bad_count():
    with pytest.raises(ValueError, match="num_rows"):
        random_scores(-1)
    with pytest.raises(ValueError, match="num_rows"):
        random_scores(2.5)


def test_early_snapshots_default_and_explicit(trained):
    trainer, _ = trained
    manifest = read_manifest(trainer.args.moso_snapshot_folder)
    steps = [snapshot.step for snapshot in manifest.snapshots]
    assert steps == [1, 3, 5, 7]
    assert [s.step for s in early_snapshots(manifest)] == [1, 3]
    assert [s.step for s in early_snapshots(manifest, fraction=1.0)] == steps
    assert [s.step for s in early_snapshots(manifest, snapshot_steps=[7, 3])] == [3, 7]
    with pytest.raises(ValueError, match="recorded steps are"):
        early_snapshots(manifest, snapshot_steps=[2])
    with pytest.raises(ValueError, match="fraction"):
        early_snapshots(manifest, fraction=0.0)


def test_el2n_matches_row_by_row_reference(trained):
    trainer, _ = trained
    manifest = read_manifest(trainer.args.moso_snapshot_folder)
    snapshots = early_snapshots(manifest, snapshot_steps=[1, 5])
    expected = np.zeros(len(trainer.train_dataset))
    for snapshot in snapshots:
        model = _snapshot_model(trainer, snapshot)
        with torch.no_grad():
            for index, row in enumerate(_rows(trainer)):
                probabilities = torch.softmax(model(**row).logits[0].double(), dim=-1).tolist()
                label = int(row["labels"][0])
                error = [p - (1.0 if k == label else 0.0) for k, p in enumerate(probabilities)]
                expected[index] += sum(e * e for e in error) ** 0.5 / len(snapshots)

    scores = compute_el2n_scores(trainer, snapshot_steps=[1, 5])
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_el2n_restores_weights_and_mode(trained):
    trainer, _ = trained
    before = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    trainer.model.train()
    compute_el2n_scores(trainer)
    assert trainer.model.training
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_grand_matches_row_by_row_reference(trained):
    trainer, _ = trained
    manifest = read_manifest(trainer.args.moso_snapshot_folder)
    snapshots = early_snapshots(manifest, snapshot_steps=[3, 7])
    expected = np.zeros(len(trainer.train_dataset))
    for snapshot in snapshots:
        model = _snapshot_model(trainer, snapshot)
        parameters = [tensor for tensor in model.parameters() if tensor.requires_grad]
        for index, row in enumerate(_rows(trainer)):
            logits = model(input_ids=row["input_ids"], attention_mask=row["attention_mask"]).logits
            loss = F.cross_entropy(logits, row["labels"])
            gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
            squared = sum(float((g.double() ** 2).sum()) for g in gradients if g is not None)
            expected[index] += squared**0.5 / len(snapshots)

    scores = compute_grand_scores(trainer, snapshot_steps=[3, 7])
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_forgetting_counts_hand_made_history():
    callback = ForgettingCallback(num_checks=4)
    callback.correct = [
        np.array([True, True, False, False, True]),
        np.array([False, True, True, False, True]),
        np.array([True, False, False, False, True]),
        np.array([False, False, True, False, True]),
    ]
    # Row 0 forgets twice, row 1 once, row 2 once, row 3 is never learned, row 4 never forgets.
    np.testing.assert_array_equal(callback.scores(), [2.0, 1.0, 1.0, 4.0, 0.0])
    assert callback.scores().dtype == np.float64


def test_forgetting_checks_follow_row_order(trained):
    trainer, forgetting = trained
    assert forgetting.checked_steps == [2, 4, 6, 8]
    assert len(forgetting.correct) == 4

    # The last check ran after the final step, so it must equal the trained model's predictions in row order.
    model = trainer.model.eval()
    with torch.no_grad():
        predicted = [int(model(**row).logits.argmax(dim=-1)) for row in _rows(trainer)]
    labels = trainer.train_dataset["label"]
    np.testing.assert_array_equal(forgetting.correct[-1], np.array(predicted) == np.array(labels))

    scores = forgetting.scores()
    assert scores.shape == (len(trainer.train_dataset),)
    assert forgetting.check_seconds > 0.0


def test_forgetting_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_checks"):
        ForgettingCallback(num_checks=1)
    with pytest.raises(ValueError, match="check_steps"):
        ForgettingCallback(check_steps=[3])
    with pytest.raises(ValueError, match="at least 2"):
        ForgettingCallback().scores()


def test_baseline_scores_prune_like_moso(trained):
    trainer, _ = trained
    dataset = trainer.train_dataset
    scores = compute_el2n_scores(trainer)
    scored = add_moso_scores(dataset, scores, column=EL2N_COLUMN)
    assert scored.features[EL2N_COLUMN].dtype == "float64"
    kept = prune_dataset(dataset, scores, keep=0.5, column=EL2N_COLUMN)
    assert len(kept) == 7
    assert min(kept[EL2N_COLUMN]) >= np.sort(scores)[-7]
